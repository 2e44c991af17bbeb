"""Why one greedy chat answer flips: the model's margin at the first answer token, per KV config.

    PYTHONPATH=python python bench/accuracy/first_token.py --model smollm2-135m \
        --out bench/results/accuracy-first-token-smollm2-135m.json

Prints the top-3 first-token probabilities after the chat-templated prompt of sweep.py under each
config (sim.py). A small bf16 margin between the top two means any perturbation of the cache may flip
the greedy path, whatever its average KL.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "python"), str(Path(__file__).resolve().parent)]

import jinja2  # noqa: E402
import tokenizers  # noqa: E402
from sim import SimAttention, SimFormat  # noqa: E402
from sweep import GREEDY_PROMPT, configs  # noqa: E402

from saw_worker.kv.calibration import CALIBRATION_TEXT  # noqa: E402
from saw_worker.loader import load_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompt", default=GREEDY_PROMPT)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(2)
    att = SimAttention(SimFormat("bf16"), 1.0)
    loaded = load_model(args.model, "auto", torch.device("cpu"), torch.float32, att)
    model, cfg, ti = loaded.model, loaded.config, loaded.tokenizer
    att.sm_scale = cfg.head_dim ** -0.5
    tok = tokenizers.Tokenizer.from_str(ti.tokenizer_json)

    @torch.inference_mode()
    def last_probs(ids: list[int]) -> torch.Tensor:
        return torch.softmax(model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids))))[-1], -1)

    sums: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    att.observer = lambda i, k, v: sums.__setitem__(i, (k.float().mean(0), v.float().mean(0)))
    last_probs(tok.encode(CALIBRATION_TEXT, add_special_tokens=False).ids)
    att.observer = None
    att.k_mean = torch.stack([sums[i][0] for i in range(cfg.num_layers)])
    att.v_mean = torch.stack([sums[i][1] for i in range(cfg.num_layers)])
    text = jinja2.Environment().from_string(ti.chat_template).render(
        messages=[{"role": "user", "content": args.prompt}], add_generation_prompt=True, bos_token=ti.bos_token,
        eos_token=ti.eos_token)
    ids = tok.encode(text, add_special_tokens=False).ids
    rows = {}
    for name, fmt in configs(cfg.head_dim).items():
        att.fmt = fmt
        pr = last_probs(ids)
        top = pr.topk(3)
        rows[name] = [(tok.decode([int(i)]), round(float(v), 4)) for v, i in zip(top.values, top.indices, strict=True)]
        print(f"{name:32s} {rows[name]}", flush=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "prompt": args.prompt, "prompt_tokens": len(ids),
                                          "command": " ".join(sys.argv), "top3_first_token": rows}, indent=1))


if __name__ == "__main__":
    main()
