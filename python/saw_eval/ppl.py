"""Perplexity, KL vs the bf16 cache and top-1 agreement over the pinned stdlib corpus, via the API.

Each window is sent as token ids to /v1/completions with echo + logprobs=k and max_tokens=1; the
prompt part of the legacy logprobs gives, per position, the observed token's logprob and the top-k.
KL uses saw_eval.metrics.kl_topk (top-k with the remainder mass; see its doc).
"""

from __future__ import annotations

import gzip
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm import tqdm

from saw_eval.client import Client
from saw_eval.metrics import kl_topk, perplexity, top1

Dump = list[dict[str, Any]]  # per window: {"tokens", "token_logprobs", "top_logprobs"} over the prompt


def load_tokenizer(spec: str):  # noqa: ANN201 - tokenizers.Tokenizer
    """A model alias, a .gguf file or a tokenizer.json; the same tokenizer the router uses."""
    import tokenizers

    if spec.endswith(".json"):
        return tokenizers.Tokenizer.from_file(spec)
    from saw_worker.loader.aliases import ALIASES, resolve_alias
    from saw_worker.loader.gguf_file import open_gguf
    from saw_worker.loader.tokenizer import tokenizer_from_gguf

    path = resolve_alias(spec) if spec in ALIASES else Path(spec)
    return tokenizers.Tokenizer.from_str(tokenizer_from_gguf(open_gguf(path).meta).tokenizer_json)


def collect(client: Client, wins: list[list[int]], top_k: int, label: str, concurrency: int = 1) -> Dump:
    """Each window's prompt logprobs, in window order; `concurrency` windows in flight (the server batches
    them, which matters when every position is its own step: --max-prefill-tokens 1)."""

    def one(ids: list[int]) -> dict[str, Any]:
        lp = client.prompt_logprobs(ids, top_k)
        n = len(ids)
        return {"tokens": lp["tokens"][:n], "token_logprobs": lp["token_logprobs"][:n],
                "top_logprobs": lp["top_logprobs"][:n]}

    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        return list(tqdm(pool.map(one, wins), total=len(wins), desc=f"ppl {label}", unit="win"))


def summarize(run: Dump, ref: Dump | None) -> dict[str, Any]:
    """Perplexity of `run`; with a reference, mean top-k KL(ref || run) and top-1 agreement."""
    lps = [x for w in run for x in w["token_logprobs"][1:]]  # the first token has no context
    res: dict[str, Any] = {"tokens": len(lps), "ppl": round(perplexity(lps), 4)}
    if ref is None:
        return res
    kls, agree = [], 0
    for rw, cw in zip(ref, run, strict=True):
        for i in range(1, len(rw["token_logprobs"])):
            rt, ct = rw["top_logprobs"][i] or {}, cw["top_logprobs"][i] or {}
            kls.append(kl_topk(rt, (rw["tokens"][i], rw["token_logprobs"][i]), ct, cw["token_logprobs"][i]))
            agree += top1(rt) == top1(ct)
    res["mean_kl_topk"] = round(sum(kls) / len(kls), 5)
    res["top1_agree"] = round(agree / len(kls), 4)
    return res


def save_dump(path: Path, dump: Dump) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        json.dump(dump, f)


def load_dump(path: Path) -> Dump:
    with gzip.open(path, "rt") as f:
        return json.load(f)
