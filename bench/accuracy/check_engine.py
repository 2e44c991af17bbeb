"""Cross-check sim.py against the real worker engine (CPU reference path) and reproduce the greedy chat
observation through the engine itself.

    PYTHONPATH=python python bench/accuracy/check_engine.py --model smollm2-135m \\
        --out bench/results/accuracy-engine-check-smollm2-135m.json

For each config: perplexity of one corpus window scored by the engine (ModelRunner.score: one prefill
that reads K/V back from the quantized pool) next to the simulation's, and the engine's greedy answer
(real decode steps, chat template rendered with jinja2) to the prompt of sweep.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "python"), str(Path(__file__).resolve().parent)]

import jinja2  # noqa: E402
import tokenizers  # noqa: E402
from sim import SimAttention, SimFormat  # noqa: E402
from sweep import GREEDY_PROMPT  # noqa: E402

from saw_eval.corpus import load_corpus, windows  # noqa: E402
from saw_worker.builder import build_engine  # noqa: E402
from saw_worker.engine.request import Event, GenerateParams  # noqa: E402
from saw_worker.kv.calibration import CALIBRATION_TEXT  # noqa: E402
from saw_worker.options import KVOptions, ModelOptions, PoolOptions, WorkerOptions  # noqa: E402

CONFIGS = {  # label -> (KVOptions kwargs, SimFormat)
    "bf16": ({"name": "bf16"}, SimFormat("bf16")),
    "int4": ({"name": "int4", "k_center": False}, SimFormat("int4")),
    "int4 +kc": ({"name": "int4", "k_center": True}, SimFormat("int4", k_center=True)),
    "int4-bdr": ({"name": "int4-bdr", "k_center": False, "hadamard_order": 64}, SimFormat("int4-bdr", 64)),
    "int4-bdr +kc": ({"name": "int4-bdr", "k_center": True, "hadamard_order": 64},
                     SimFormat("int4-bdr", 64, k_center=True)),
}


def greedy(engine, prompt: list[int], n: int) -> list[int]:  # noqa: ANN001
    out: list[int] = []
    done = threading.Event()

    def sink(ev: Event) -> None:
        out.extend(ev.token_ids)
        if ev.finish is not None:
            done.set()

    engine.submit(GenerateParams("g", prompt, max_new_tokens=n), sink)
    assert done.wait(300)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(2)
    rows = {}
    for label, (kw, sim_fmt) in CONFIGS.items():
        engine = build_engine(WorkerOptions(model=ModelOptions(name=args.model, device="cpu"), kv=KVOptions(**kw),
                                            pool=PoolOptions(kv_cache_memory=64 << 20)))
        info = engine.info()
        tok = tokenizers.Tokenizer.from_str(info.tokenizer.tokenizer_json)
        ids = windows(load_corpus(), lambda s, t=tok: t.encode(s, add_special_tokens=False).ids, args.window, 1)[0]
        runner = engine.runner
        lp = torch.log_softmax(runner.score(ids), -1)
        tgt = torch.tensor(ids[1:])
        ppl_engine = float((-lp[:-1].gather(1, tgt[:, None]).mean()).exp())
        # The same window through the simulation, on the engine's own weights.
        model, real_att = runner.model, runner.model.attention
        att = SimAttention(sim_fmt, runner.backend.sm_scale)
        if sim_fmt.k_center:
            att.k_mean = runner.pool.k_mean.cpu()
        model.attention = att
        with torch.inference_mode():
            slp = torch.log_softmax(model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)))), -1)
        model.attention = real_att
        ppl_sim = float((-slp[:-1].gather(1, tgt[:, None]).mean()).exp())
        tmpl = jinja2.Environment().from_string(info.tokenizer.chat_template)
        text = tmpl.render(messages=[{"role": "user", "content": GREEDY_PROMPT}], add_generation_prompt=True,
                           bos_token=info.tokenizer.bos_token, eos_token=info.tokenizer.eos_token)
        engine.start()
        answer = tok.decode(greedy(engine, tok.encode(text, add_special_tokens=False).ids, 24))
        engine.shutdown()
        rows[label] = {"ppl_engine": round(ppl_engine, 4), "ppl_sim": round(ppl_sim, 4), "greedy_engine": answer}
        print(label, rows[label], flush=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "window": args.window, "command": " ".join(sys.argv),
                                          "calibration_chars": len(CALIBRATION_TEXT), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
