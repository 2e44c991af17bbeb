"""saw's SGLang pool and attention backend driven as SGLang's model runner drives them, on the CPU (saw's kernels
through Triton's interpreter): the K calibration measured on the first prefill, the K scale on q and K, a
calibration file, and the refusals. SGLang needs CUDA to import, so its two base classes (the token-to-KV pool's
and the attention backend's, which saw's classes only subclass) are minimal stand-ins here, and the forward batches
carry the fields the backend reads; tests/sglang/test_sglang_gpu.py runs the real SGLang."""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

from saw_kv.formats import DEFAULT_K_SCALE_ALPHA  # noqa: E402
from saw_sglang.config import ENV, KVSpec  # noqa: E402
from saw_worker.kv import calibration  # noqa: E402

if importlib.util.find_spec("sglang.srt") is not None:  # not "sglang": tests/sglang is a namespace package
    pytest.skip("SGLang is installed: the GPU test drives the real one", allow_module_level=True)

LAYERS, HKV, GROUP, D, PAGE = 2, 2, 2, 64, 16
PROMPT = 40  # tokens of the calibration prompt


class KVCache:
    """SGLang's KVCache base, as far as SawKVPool uses it."""

    def __init__(self, size: int, page_size: int, dtype: torch.dtype, layer_num: int, device: str,
                 enable_memory_saver: bool, start_layer: int | None = None, end_layer: int | None = None) -> None:
        self.size, self.page_size, self.dtype, self.layer_num, self.device = size, page_size, dtype, layer_num, device
        self.start_layer = start_layer or 0

    def _finalize_allocation_log(self, size: int) -> None:
        pass


class Mode:
    def __init__(self, decode: bool) -> None:
        self.decode, self.name = decode, "DECODE" if decode else "EXTEND"

    def is_decode(self) -> bool:
        return self.decode

    def is_extend(self) -> bool:
        return not self.decode

    def is_target_verify(self) -> bool:
        return False

    def is_draft_extend(self) -> bool:
        return False


@pytest.fixture
def make(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """make(spec) -> a Runner over saw's pool and backend with that KV spec in the environment."""
    stubs = {"sglang": {}, "sglang.srt": {}, "sglang.srt.mem_cache": {},
             "sglang.srt.mem_cache.memory_pool": {"KVCache": KVCache}, "sglang.srt.layers": {},
             "sglang.srt.layers.attention": {},
             "sglang.srt.layers.attention.base_attn_backend": {"AttentionBackend": object}}
    for name, attrs in stubs.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)
    yield lambda spec: Runner(spec, monkeypatch)
    for name in ("saw_sglang.pool", "saw_sglang.backend"):  # built on the stand-ins: not for other tests
        sys.modules.pop(name, None)


class Runner:
    """One request at pool row 0, its slots from page 1 on; each step feeds every layer fresh q, K (a large
    offset and two outlier channels: what centering and the scale are for) and V, and keeps them for the reference."""

    def __init__(self, spec: KVSpec, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv(ENV, spec.to_env())
        from saw_sglang.backend import SawAttentionBackend
        from saw_sglang.pool import SawKVPool

        self.pool = SawKVPool(1024, PAGE, torch.bfloat16, HKV, D, LAYERS, "cpu", False)
        self.req_to_token = torch.zeros(4, 256, dtype=torch.int64)
        self.req_to_token[0] = torch.arange(PAGE, PAGE + 256)
        runner = types.SimpleNamespace(token_to_kv_pool=self.pool,
                                       req_to_token_pool=types.SimpleNamespace(req_to_token=self.req_to_token))
        self.backend = SawAttentionBackend(runner)
        self.layers = [types.SimpleNamespace(layer_id=i, tp_q_head_num=HKV * GROUP, head_dim=D, scaling=D ** -0.5,
                                             logit_cap=0, qk_head_dim=D, v_head_dim=D) for i in range(LAYERS)]
        self.gen = torch.Generator().manual_seed(0)
        self.seen: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [[] for _ in range(LAYERS)]
        self.length = 0

    def step(self, n: int, decode: bool = False, batch_size: int = 1) -> list[torch.Tensor]:
        start, seq = self.length, torch.tensor([self.length + n])
        batch = types.SimpleNamespace(
            forward_mode=Mode(decode), batch_size=batch_size, seq_lens=seq, seq_lens_cpu=seq,
            req_pool_indices=torch.tensor([0]), out_cache_loc=self.req_to_token[0, start:start + n].clone(),
            extend_seq_lens=torch.tensor([n]), extend_seq_lens_cpu=[n], extend_prefix_lens=torch.tensor([start]),
            extend_prefix_lens_cpu=[start])
        self.backend.init_forward_metadata(batch)
        outlier = torch.ones(D)
        outlier[3], outlier[40] = 40.0, 12.0
        outs = []
        for layer, seen in zip(self.layers, self.seen, strict=True):
            q = torch.randn(n, HKV * GROUP * D, generator=self.gen).bfloat16()
            k = (torch.randn(n, HKV, D, generator=self.gen) * outlier + 4.0).bfloat16()
            v = torch.randn(n, HKV, D, generator=self.gen).bfloat16()
            seen.append((q.view(n, HKV * GROUP, D), k, v))
            forward = self.backend.forward_decode if decode else self.backend.forward_extend
            outs.append(forward(q, k, v, layer, batch).float())
        self.length += n
        return outs

    def error(self, outs: list[torch.Tensor]) -> float:
        """Mean |out - exact causal attention| over the last step's rows, all layers."""
        total = 0.0
        for out, seen in zip(outs, self.seen, strict=True):
            q, k, v = (torch.cat(x).float() for x in zip(*seen, strict=True))
            n, new = k.shape[0], out.shape[0]
            s = torch.einsum("thd,shd->hts", q[n - new:], k.repeat_interleave(GROUP, 1)) * D ** -0.5
            s = s.masked_fill(torch.arange(n)[None, :] > torch.arange(n - new, n)[:, None], float("-inf"))
            exact = torch.einsum("hts,shd->thd", s.softmax(-1), v.repeat_interleave(GROUP, 1)).reshape(new, -1)
            total += float((out - exact).abs().mean())
        return total / len(outs)


def serve(runner: Runner) -> list[float]:
    """Prefill the calibration prompt, decode 4 tokens, extend 20: the error of each phase's last step."""
    errors = [runner.error(runner.step(PROMPT))]
    for _ in range(4):
        outs = runner.step(1, decode=True)
    errors.append(runner.error(outs))
    errors.append(runner.error(runner.step(20)))
    return errors


def test_the_first_prefill_calibrates_k_and_the_scale_keeps_attention(make: Any) -> None:
    """The calibration is saw's (calibration.layer_calibration of that prefill's q and K), stored before the
    prefill's K is; it leaves attention as it was (q lambda . k / lambda) and brings the INT4 error down on
    offset, outlier keys against the plain format."""
    cal = make(KVSpec("int4-bdr", calibration_tokens=PROMPT))
    pool = cal.pool
    assert pool.fmt.describe() == "int4-bdr:b32+center+scale" and pool.uncalibrated == {0, 1}
    assert bool((pool.k_scale == 1).all()) and bool((pool.saw.k_mean == 0).all())  # no-ops until calibrated
    cal_errors = serve(cal)
    assert not pool.uncalibrated
    for i, seen in enumerate(cal.seen):
        q, k, _ = seen[0]
        mean, lam = calibration.layer_calibration(k, calibration.query_absmax(q, HKV), DEFAULT_K_SCALE_ALPHA)
        assert torch.equal(pool.k_scale[i].float(), lam) and torch.equal(pool.saw.k_mean[i], mean)
    assert bool((pool.k_scale != 1).any()) and pool.saw.layer(0).k_mean is not None
    plain_errors = serve(make(KVSpec("int4-bdr", k_center=False, k_scale=False)))
    print("calibrated", cal_errors, "plain", plain_errors)
    assert cal_errors[0] == pytest.approx(plain_errors[0], abs=2e-3)  # a first prefill attends its own K at bf16
    assert cal_errors[1] < 0.6 * plain_errors[1] and cal_errors[2] < 0.6 * plain_errors[2]


def test_a_first_prefill_that_is_not_the_calibration_prompt_is_refused(make: Any) -> None:
    runner = make(KVSpec("int4-bdr", calibration_tokens=PROMPT))
    with pytest.raises(RuntimeError, match="calibration prompt"):
        runner.step(PROMPT + 1)
    with pytest.raises(RuntimeError, match="calibration prompt"):
        runner.step(PROMPT, batch_size=2)


def test_without_a_calibration_source_the_k_levers_are_refused(make: Any) -> None:
    with pytest.raises(ValueError, match="need a calibration"):
        make(KVSpec("int4-bdr"))
    assert make(KVSpec("bf16")).pool.k_scale is None  # bf16 has no K levers: nothing to calibrate


def test_a_calibration_file_is_used_as_it_is(make: Any, tmp_path: Any) -> None:
    mean, lam = torch.randn(LAYERS, HKV, D), torch.exp2(torch.randint(-2, 3, (LAYERS, HKV, D)).float())
    torch.save({"k_mean": mean, "k_scale": lam}, tmp_path / "k.pt")
    runner = make(KVSpec("int4-bdr", k_calibration=str(tmp_path / "k.pt")))
    assert not runner.pool.uncalibrated
    runner.step(PROMPT + 3)  # any first prefill: nothing is measured
    assert torch.equal(runner.pool.saw.k_mean, mean) and torch.equal(runner.pool.k_scale.float(), lam)
    torch.save({"k_mean": mean}, tmp_path / "mean.pt")
    with pytest.raises(ValueError, match="no k_scale"):
        make(KVSpec("int4-bdr", k_calibration=str(tmp_path / "mean.pt")))
