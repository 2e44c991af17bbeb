"""The SGLang engine's translations, without SGLang: options -> sglang.Engine arguments (and what is refused),
saw requests -> SGLang sampling parameters, SGLang's streamed outputs -> saw events, the KV spec's env round trip."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from saw_sglang.config import ENV, KVSpec, spec_from_env
from saw_sglang.engine import engine_args, event, kv_spec, model_folder, sampling_params, tokenizer_folder
from saw_worker.engine.request import Finish, GenerateParams, GrammarSpec, RequestError, SamplingOptions
from saw_worker.options import KVOptions, ModelOptions, PoolOptions, WorkerOptions

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 100}))
    return tmp_path


def opts(folder: Path, **kv: object) -> WorkerOptions:
    return WorkerOptions(model=ModelOptions(name=str(folder), load_format="dummy", engine="sglang"),
                         kv=KVOptions(name="int4-bdr", **kv))  # type: ignore[arg-type]


def test_engine_args_carry_the_options(folder: Path) -> None:
    args = engine_args(opts(folder), folder, folder / "tok")
    assert args["attention_backend"] == "saw" and args["load_format"] == "dummy"
    assert args["skip_tokenizer_init"] and args["incremental_streaming_output"]
    assert args["tokenizer_path"] == str(folder / "tok")
    assert (args["page_size"], args["max_running_requests"], args["chunked_prefill_size"]) == (16, 256, 8192)
    assert not args["disable_cuda_graph"] and not args["disable_radix_cache"]


@pytest.mark.parametrize("kv,flag", [({"window": 16}, "--window"), ({"sinks": 4}, "--sinks"),
                                     ({"bf16_layers": frozenset({0})}, "--bf16-layers")])
def test_options_the_sglang_engine_cannot_honour_are_refused(folder: Path, kv: dict[str, object], flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        engine_args(opts(folder, **kv), folder, folder)


def test_a_folder_without_config_is_refused(folder: Path, tmp_path: Path) -> None:
    assert model_folder(str(folder)) == folder
    with pytest.raises(ValueError, match="HF folder"):
        model_folder(str(tmp_path / "nothing"))


def test_a_moe_config_folder_is_served_from_dummy_weights_in_a_fixed_pool() -> None:
    """configs/qwen3-30b-a3b (Qwen3-MoE, which --engine saw refuses: tests/worker/test_loader.py) goes to SGLang as
    it is; --kv-cache-memory becomes SGLang's max_total_tokens in saw's format: 48 layers x 4 KV heads x 136 bytes
    (int4-bdr at head_dim 128: 64 code bytes + fp16 scale and lo, for K and for V) a token."""
    folder = REPO / "configs/qwen3-30b-a3b"
    args = engine_args(replace(opts(folder), pool=PoolOptions(kv_cache_memory=1 << 30)), folder, folder)
    assert (args["model_path"], args["load_format"]) == (str(folder), "dummy")
    assert args["max_total_tokens"] == (1 << 30) // (48 * 4 * 136) and args["mem_fraction_static"] == 0.9
    assert "max_total_tokens" not in engine_args(opts(folder), folder, folder)


def test_the_grammar_backends_tokenizer_folder_is_the_routers_tokenizer(folder: Path, tmp_path: Path) -> None:
    """SGLang does not tokenize (the router does); its grammar backend reads tokenizer_path: the model's own
    tokenizer files, else the byte-level fallback the router uses for a dummy model, written out."""
    from saw_worker.loader.tokenizer import byte_level_fallback, folder_tokenizer, tokenizer_from_hf_folder

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    routers = folder_tokenizer(folder, 100)
    written = tokenizer_folder(folder, routers, scratch)
    assert written == scratch
    assert tokenizer_from_hf_folder(written).tokenizer_json == byte_level_fallback(100).tokenizer_json
    assert routers.eos_token_ids == tokenizer_from_hf_folder(written).eos_token_ids
    (folder / "tokenizer.json").write_text(byte_level_fallback(100).tokenizer_json)
    assert tokenizer_folder(folder, folder_tokenizer(folder, 100), scratch) == folder


def test_sampling_parameters() -> None:
    p = GenerateParams("r", [1, 2], max_new_tokens=5, min_new_tokens=1, stop_token_ids=frozenset({7, 3}),
                       sampling=SamplingOptions(temperature=0.7, top_p=0.9, top_k=0, logit_bias=((4, 2.0),)))
    s = sampling_params(p)
    assert s["top_k"] == -1 and s["stop_token_ids"] == [3, 7] and "sampling_seed" not in s
    assert s["logit_bias"] == {"4": 2.0} and (s["temperature"], s["top_p"], s["min_new_tokens"]) == (0.7, 0.9, 1)
    choice = sampling_params(replace(p, grammar=GrammarSpec("choice", json.dumps(["yes", 'no "x"']))))
    assert choice["ebnf"] == 'root ::= "yes" | "no \\"x\\""'
    assert json.loads(sampling_params(replace(p, grammar=GrammarSpec("json_object")))["json_schema"]) == {
        "type": "object"}
    # SGLang applies seeds only in its deterministic mode: a seeded sampled request is refused, a greedy one served
    with pytest.raises(RequestError, match="seed"):
        sampling_params(replace(p, sampling=replace(p.sampling, seed=11)))
    assert "sampling_seed" not in sampling_params(replace(p, sampling=SamplingOptions(seed=11)))
    strict = sampling_params(replace(p, grammar=GrammarSpec("json_schema", '{"type": "object"}', strict=True)))
    assert strict["json_schema"] == '{"type": "object"}'  # SGLang compiles every schema strictly


def test_streamed_outputs_become_events() -> None:
    p = GenerateParams("r", [1, 2], max_new_tokens=3, return_logprobs=True, top_logprobs=1)
    mid = event({"output_ids": [5], "meta_info": {"finish_reason": None, "output_token_logprobs": [(-0.5, 5, None)],
                                                  "output_top_logprobs": [[(-0.5, 5, None)]]}}, p)
    assert mid.token_ids == [5] and mid.finish is None and mid.logprobs[0].top == [(5, -0.5)]
    last = event({"output_ids": [6], "meta_info": {"finish_reason": {"type": "length", "length": 3},
                                                   "prompt_tokens": 2, "completion_tokens": 3, "cached_tokens": 1}},
                 replace(p, return_logprobs=False, top_logprobs=0))
    assert (last.finish, last.prompt_tokens, last.completion_tokens, last.cached_tokens) == (Finish.LENGTH, 2, 3, 1)
    bad = event({"output_ids": [], "meta_info": {"finish_reason": {"type": "abort", "status_code": 400,
                                                                   "message": "too long"}}}, p)
    assert bad.finish is Finish.ABORT and bad.refused and bad.error == "too long"


def test_kv_spec_round_trips_through_the_environment() -> None:
    spec = KVSpec("int4", 32, False)
    assert spec_from_env({ENV: spec.to_env()}) == spec
    assert spec_from_env({}) == KVSpec()
    assert spec.format(128).name == "int4" and KVSpec("int4-bdr", 256).format(64).hadamard_order == 64
    # no order given: the format's default for the head dim, as --engine saw picks it
    assert spec_from_env({ENV: KVSpec().to_env()}) == KVSpec()
    assert (KVSpec().format(64).hadamard_order, KVSpec().format(128).hadamard_order) == (32, 128)
    with pytest.raises(ValueError, match=ENV):
        spec_from_env({ENV: "int4"})
    with pytest.raises(ValueError, match="unknown KV format"):
        KVSpec("fp8")


def test_the_k_levers_follow_the_format_defaults_and_the_calibration_source(folder: Path) -> None:
    """As --engine saw: K centering and the K scale on for the INT4 formats unless turned off; measured by the
    backend on the worker's calibration prompt (its length travels in the spec) unless a file gives them."""
    spec = kv_spec(opts(folder), calibration_tokens=400)
    assert spec.format(128).describe() == "int4-bdr:b128+center+scale" and spec.measures_calibration(128)
    assert spec_from_env({ENV: spec.to_env()}) == spec and spec.calibration_tokens == 400
    plain = kv_spec(opts(folder, k_center=False, k_scale=False))
    assert plain.format(128).describe() == "int4-bdr:b128" and not plain.measures_calibration(128)
    assert not kv_spec(opts(folder, k_mean_file="k.pt")).measures_calibration(128)
    assert kv_spec(opts(folder, k_scale=False)).format(64).describe() == "int4-bdr:b32+center"
    assert not KVSpec("bf16").measures_calibration(128) and KVSpec("bf16").format(128).describe() == "bf16"
    engine_args(opts(folder, k_center=True, k_scale=True, k_mean_file="k.pt"), folder, folder)  # taken, not refused
    with pytest.raises(ValueError, match="not a saw KV spec"):
        spec_from_env({ENV: json.dumps({"kv": "int4", "window": 16})})


def test_without_sglang_the_error_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from saw_sglang.engine import require_sglang

    monkeypatch.setitem(sys.modules, "sglang", None)  # import sglang raises ImportError
    with pytest.raises(RuntimeError, match="--engine sglang needs SGLang 0.5.11"):
        require_sglang()


def test_a_dead_sglang_process_is_seen() -> None:
    import os
    import subprocess

    from saw_sglang.engine import _alive

    child = subprocess.Popen(["true"])
    child.wait()
    assert _alive(os.getpid()) and not _alive(child.pid)
