"""What the sampler's options cost at a large decode batch, against the decode step they join.

Times the engine's Sampler (host work included: each call ends with a synchronize) on random logits for a
batch of requests that all use one option set: greedy, temperature + top-p, OpenAI's penalties, vLLM's
repetition penalty, a logit bias, and (with --tokenizer-json) a JSON-object grammar. Each option is reported
as its extra time over the same sampling without it, and as a share of --step-ms, a decode step's time at that
batch measured by a serving run (default: Qwen3-8B shapes at batch 256 on the H200, 2026-12-02, 256 / 18,900
tokens/s). On CUDA each case is timed twice: alone, and behind a spin kernel of --step-ms standing in for the
step's forward, as the engine runs it (the sampler's host work then overlaps the forward on the device).

  python bench/sampler_bench.py [--batch 256] [--vocab 151936] [--tokenizer-json tok.json] [--out x.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from saw_worker.engine.grammar import Grammars  # noqa: E402
from saw_worker.engine.request import GenerateParams, GrammarSpec, SamplingOptions, Sequence  # noqa: E402
from saw_worker.engine.sampler import Sampler  # noqa: E402

GREEDY = SamplingOptions()
SAMPLED = SamplingOptions(temperature=0.7, top_p=0.95, seed=1)
# (name, options, the name of the row it adds to)
CASES = [
    ("greedy", GREEDY, None),
    ("temperature 1.0 (no top-k, top-p)", SamplingOptions(temperature=1.0, seed=1), None),
    ("temperature 0.7, top_p 0.95", SAMPLED, None),
    ("+ frequency 0.5, presence 0.5", replace(SAMPLED, frequency_penalty=0.5, presence_penalty=0.5),
     "temperature 0.7, top_p 0.95"),
    ("+ repetition 1.1", replace(SAMPLED, repetition_penalty=1.1), "temperature 0.7, top_p 0.95"),
    ("greedy + logit_bias (10 tokens)", replace(GREEDY, logit_bias=tuple((t, -5.0) for t in range(10))), "greedy"),
]


def sequences(batch: int, options: SamplingOptions, prompt_len: int, vocab: int) -> list[Sequence]:
    gen = torch.Generator().manual_seed(0)
    seqs = []
    for i in range(batch):
        prompt = torch.randint(0, vocab, (prompt_len,), generator=gen).tolist()
        params = GenerateParams(f"r{i}", prompt, max_new_tokens=1 << 20, sampling=replace(options, seed=i)
                                if options.seed is not None else options)
        seqs.append(Sequence(params, sink=lambda ev: None, order=i))
    return seqs


def spin_cycles(ms: float) -> int:
    """torch.cuda._sleep cycles that spin the device for about ms."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10**7)
    end.record()
    end.synchronize()
    return int(10**7 * ms / start.elapsed_time(end))


def time_sample(sample: Sampler, logits: torch.Tensor, seqs: list[Sequence], steps: int, spin: int = 0) -> float:
    """Median ms of one sampler call, each followed by a synchronize (the first calls warm up); with spin, of
    the spin kernel and the call together."""
    for _ in range(3):
        sample(logits, seqs)
    times = []
    for _ in range(steps):
        if logits.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if spin:
            torch.cuda._sleep(spin)
        if seqs:
            sample(logits, seqs)
        if logits.is_cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=151936, help="Qwen3's vocabulary")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--step-ms", type=float, default=256 / 18900 * 1e3,
                    help="a decode step's time at this batch (default: Qwen3-8B shapes, batch 256, H200)")
    ap.add_argument("--tokenizer-json", type=Path, help="a tokenizer.json: adds a JSON-object grammar row")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spin = spin_cycles(args.step_ms) if dev.type == "cuda" else 0
    rows: list[dict] = []
    forward_ms = time_sample(Sampler(dev), torch.zeros(1, 1, device=dev), [], args.steps, spin) if spin else 0.0

    def run(name: str, options: SamplingOptions, base: str | None, vocab: int, grammars: Grammars | None = None,
            ) -> None:
        logits = torch.randn(args.batch, vocab, device=dev) * 3

        def fresh() -> list[Sequence]:  # requests new to a new sampler: its penalty rows and grammar states
            seqs = sequences(args.batch, options, args.prompt_len, vocab)
            if grammars is not None:
                for s in seqs:
                    s.matcher = grammars.matcher(GrammarSpec("json_object"))
            return seqs

        ms = time_sample(Sampler(dev), logits, fresh(), args.steps)
        # behind the forward: what the sampler adds to a step
        added = time_sample(Sampler(dev), logits, fresh(), args.steps, spin) - forward_ms if spin else None
        ref = next((r for r in rows if r["case"] == base and r["vocab"] == vocab), None)
        row = {"case": name, "vocab": vocab, "ms": round(ms, 3), "extra_ms": None, "extra_pct_of_step": None}
        if added is not None:
            row["ms_behind_forward"] = round(added, 3)
        if ref is not None:
            extra = (added - ref["ms_behind_forward"]) if added is not None else ms - ref["ms"]
            row.update(extra_ms=round(extra, 3), extra_pct_of_step=round(100 * extra / args.step_ms, 2))
        rows.append(row)
        behind = "" if added is None else f"  {added:7.3f} ms behind the forward"
        share = "" if ref is None else f"  +{row['extra_ms']:6.3f} ms = {row['extra_pct_of_step']:5.2f} % of a step"
        print(f"{name:36s} V={vocab:6d}  {ms:7.3f} ms alone{behind}{share}", flush=True)

    print(f"device {dev}, batch {args.batch}, decode step {args.step_ms:.2f} ms (spin kernel: {forward_ms:.2f} ms)",
          flush=True)
    for name, options, base in CASES:
        run(name, options, base, args.vocab)
    if args.tokenizer_json:
        from tokenizers import Tokenizer

        text = args.tokenizer_json.read_text()
        tok = Tokenizer.from_str(text)
        stops = tuple(i for t in ("<|im_end|>", "<|endoftext|>", "</s>") if (i := tok.token_to_id(t)) is not None)
        grammars = Grammars(text, tok.get_vocab_size(), stops)
        vocab = tok.get_vocab_size()
        run("greedy", GREEDY, None, vocab)
        run("greedy + JSON-object grammar", GREEDY, "greedy", vocab, grammars)
    if args.out:
        args.out.write_text(json.dumps({"device": str(dev), "batch": args.batch, "step_ms": args.step_ms,
                                        "spin_ms": forward_ms,
                                        "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
