"""The worker's flags come from the option dataclasses; the SGLang-fork aliases resolve in the worker only."""

from __future__ import annotations

import dataclasses

import pytest

from saw_worker.cli import main, options_from_argv, parser
from saw_worker.flags import flag_name
from saw_worker.options import (
    DecodeOptions,
    KVOptions,
    ModelOptions,
    PoolOptions,
    SchedulerOptions,
    ServerOptions,
    WorkerOptions,
)


def test_no_flags_give_the_dataclass_defaults() -> None:
    assert options_from_argv([], {}) == WorkerOptions()


def test_every_field_has_a_flag() -> None:
    argv = ["--model", "m", "--load-format", "dummy", "--device", "cpu", "--context-length", "64", "--dtype", "float32",
            "--engine", "sglang", "--no-cpu-int4-weights", "--no-cpu-int8-weights",
            "--no-cpu-gguf-blocks",
            "--kv", "int4", "--hadamard-order", "64", "--rotate-v", "--k-center=false", "--no-k-scale",
            "--k-scale-alpha", "0.25", "--window", "8", "--sinks", "2", "--bf16-layers", "0,1", "--k-mean-file", "f",
            "--mem-fraction", "0.5", "--kv-cache-memory", "64MiB", "--page-size", "8",
            "--max-running-requests", "4", "--max-prefill-tokens", "32", "--reserve-decode-tokens", "0",
            "--no-prefix-cache", "--disable-cuda-graph", "--cpu-compile", "--overlap", "no",
            "--host", "0.0.0.0", "--port", "1", "--unix-socket", "s", "--log-level", "debug", "--token-file", "t"]
    assert options_from_argv(argv, {}) == WorkerOptions(
        ModelOptions("m", "dummy", "cpu", 64, "float32", "sglang", False, False, False),
        KVOptions("int4", 64, True, False, False, 0.25, 8, 2, frozenset({0, 1}), "f"),
        PoolOptions(0.5, 64 << 20, 8),
        SchedulerOptions(4, 32, 0, False),
        DecodeOptions(cuda_graphs=False, cpu_compile=True, overlap=False),
        ServerOptions("0.0.0.0", 1, "s", "debug", "t"),
    )
    groups = [f.default_factory for f in dataclasses.fields(WorkerOptions)]
    given = {a.split("=")[0].replace("--no-", "--") for a in argv if a.startswith("--")}
    assert {flag_name(f) for g in groups for f in dataclasses.fields(g)} == given


@pytest.mark.parametrize("text,value", [("1", True), ("true", True), ("Yes", True), ("on", True),
                                        ("0", False), ("false", False), ("no", False), ("OFF", False)])
def test_switches_take_one_set_of_spellings_as_flags_and_variables(text: str, value: bool) -> None:
    assert options_from_argv([f"--rotate-v={text}"], {}).kv.rotate_v is value
    assert options_from_argv(["--prefix-cache", text], {}).scheduler.prefix_cache is value
    assert options_from_argv([], {"ROTATE_V": text}).kv.rotate_v is value


def test_sglang_fork_aliases() -> None:
    def kv(argv: list[str], **env: str) -> str:
        return options_from_argv(argv, env).kv.name

    assert kv(["--kv-cache-dtype", "int4"]) == "int4"
    assert kv(["--kv-cache-dtype", "int4"], HADAMARD="1") == "int4-bdr"
    assert kv(["--kv-cache-dtype", "int4"], HADAMARD="true") == "int4-bdr"
    assert kv(["--kv-cache-dtype", "auto"]) == kv(["--kv-cache-dtype", "bf16"]) == "bf16"
    assert kv([], HADAMARD="0") == "int4"
    assert kv([], HADAMARD="1") == "int4-bdr"
    assert options_from_argv([], {"HADAMARD_ORDER": "64"}).kv.hadamard_order == 64


def test_explicit_flags_win_over_the_aliases() -> None:
    env = {"HADAMARD": "1", "HADAMARD_ORDER": "128", "ROTATE_V": "1"}
    kv = options_from_argv(["--kv", "int4", "--hadamard-order", "32", "--no-rotate-v"], env).kv
    assert (kv.name, kv.hadamard_order, kv.rotate_v) == ("int4", 32, False)
    assert options_from_argv(["--kv", "bf16", "--kv-cache-dtype", "int4"], {}).kv.name == "bf16"


@pytest.mark.parametrize("env,message", [({"ROTATE_V": "maybe"}, "ROTATE_V"), ({"HADAMARD": "2"}, "HADAMARD"),
                                         ({"HADAMARD_ORDER": "b"}, "HADAMARD_ORDER")])
def test_bad_alias_values_are_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        options_from_argv([], env)


def test_bad_switch_value_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["--k-center=maybe"])
    assert "--k-center" in capsys.readouterr().err


def test_a_bad_alias_ends_the_worker_with_a_message(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ROTATE_V", "maybe")
    assert main([]) == 2
    assert "saw_worker: error: ROTATE_V" in capsys.readouterr().err


def test_help_lists_every_flag_with_its_default() -> None:
    text = parser().format_help()
    for flag in ("--model", "--kv", "--kv-cache-dtype", "--page-size", "--no-prefix-cache", "--disable-cuda-graph",
                 "--context-length", "--k-mean-file", "--reserve-decode-tokens", "HADAMARD_ORDER"):
        assert flag in text, flag
    assert "(default: 1024)" in text and "(default: smollm2-135m)" in text
