"""End to end: a tiny perplexity evaluation through real saw-routers on CPU (smollm2-135m), and the
same KL ordering on an injected-outlier synthetic model in-process (the engine's reference path)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from saw_eval.cli import main


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("saw-router") is None, reason="saw-router is not on PATH")
def test_ppl_through_router_int4_bdr_beats_int4_and_the_default_beats_both(tmp_path: Path) -> None:
    out = tmp_path / "ppl.json"
    # Every position a decode-like step (one token per prefill chunk), so each reads the tokens before
    # it from the KV format; the accuracy levers are off in the first two, so that they are about
    # rotation alone, and all on (the default) in the last.
    plain = "--k-center false --k-scale false --window 0"
    int4, bdr, default = f"int4 {plain}", f"int4-bdr {plain}", "int4-bdr"
    main(["ppl", "--model", "smollm2-135m", "--kv", "bf16", int4, bdr, default, "--windows", "2", "--window", "256",
          "--log-dir", str(tmp_path / "logs"), "--out", str(out), "--router-arg=--device=cpu",
          "--worker-arg=--max-prefill-tokens=1"])
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"bf16", int4, bdr, default}
    assert runs["bf16"]["ppl"] < runs[int4]["ppl"]
    # Measured on this model (docs/accuracy.md): rotation lowers KL even without centering, and the
    # default's levers lower it further.
    assert runs[default]["mean_kl_topk"] < runs[bdr]["mean_kl_topk"] < runs[int4]["mean_kl_topk"], runs


def _synthetic_kl(kv: str) -> float:
    """Mean KL(bf16 || kv) over 96 tokens of a random 2-layer model whose K has outlier channels."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "worker"))
    from engine_util import TINY

    from saw_kv.formats import KVFormat
    from saw_worker.engine.model_runner import ModelRunner
    from saw_worker.kv.pool import KVPool
    from saw_worker.kv.reference_backend import ReferenceBackend
    from saw_worker.models import DecoderLM

    def logprobs(fmt_name: str) -> torch.Tensor:
        fmt = KVFormat.make(fmt_name, TINY.head_dim)
        pool = KVPool(fmt, TINY.num_layers, TINY.num_kv_heads, 64, 4, torch.device("cpu"))
        backend = ReferenceBackend(pool, TINY.head_dim ** -0.5)
        model = DecoderLM(TINY, backend, device="cpu", dtype=torch.float32)
        model.init_random_(seed=1, std=0.1)
        d, nq = TINY.head_dim, TINY.num_heads
        with torch.no_grad():
            for layer in model.layers:  # two rotary pairs of each K head get 30x larger: outlier channels
                for h in range(TINY.num_kv_heads):
                    for c in (3, 3 + d // 2, 11, 11 + d // 2):
                        layer.qkv_weight[(nq + h) * d + c] *= 30.0
        ids = torch.randint(4, TINY.vocab_size, (96,), generator=torch.Generator().manual_seed(0)).tolist()
        return torch.log_softmax(ModelRunner(model, backend, pool, torch.device("cpu")).score(ids), -1)

    ref, cand = logprobs("bf16"), logprobs(kv)
    return float((ref.exp() * (ref - cand)).sum(-1).mean())


def test_injected_outliers_int4_bdr_beats_int4() -> None:
    kl_int4, kl_bdr = _synthetic_kl("int4"), _synthetic_kl("int4-bdr")
    assert kl_bdr < 0.5 * kl_int4, (kl_int4, kl_bdr)
