"""Step statistics: running totals an operator or a benchmark can read, and a log line every few
seconds while the engine works, so throughput and where a step's time goes show without a profiler."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

log = logging.getLogger("saw_worker.engine")


@dataclass
class StepTotals:
    decode_steps: int = 0
    decode_rows: int = 0  # tokens decoded
    decode_s: float = 0.0  # wall time of decode steps, from scheduling to the last commit
    forward_s: float = 0.0  # of which in ModelRunner.run: until the sampled tokens are on the host
    prefill_steps: int = 0
    prefill_tokens: int = 0
    prefill_s: float = 0.0

    def minus(self, earlier: StepTotals) -> StepTotals:
        return StepTotals(*(getattr(self, f.name) - getattr(earlier, f.name) for f in dataclasses.fields(self)))


class StepStats:
    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self.totals = StepTotals()
        self._logged = StepTotals()
        self._logged_at = time.perf_counter()

    def record(self, is_decode: bool, rows: int, step_s: float, forward_s: float) -> None:
        """One engine step: rows = decode rows or prefill tokens."""
        t = self.totals
        if is_decode:
            t.decode_steps += 1
            t.decode_rows += rows
            t.decode_s += step_s
            t.forward_s += forward_s
        else:
            t.prefill_steps += 1
            t.prefill_tokens += rows
            t.prefill_s += step_s

    def maybe_log(self, running: int, waiting: int, kv_used: float, preemptions: int) -> None:
        now = time.perf_counter()
        window = now - self._logged_at
        if window < self.every_s:
            return
        w = self.totals.minus(self._logged)
        if w.decode_steps or w.prefill_steps:
            d = max(w.decode_steps, 1)
            log.info("%d running, %d waiting, KV %.0f%% used | decode: %.0f tok/s, batch %.1f, step %.2f ms "
                     "(forward+sample %.2f ms) | prefill: %.0f tok/s in %d steps | busy %.0f%% | %d preempted so far",
                     running, waiting, 100 * kv_used, w.decode_rows / window, w.decode_rows / d,
                     1e3 * w.decode_s / d, 1e3 * w.forward_s / d, w.prefill_tokens / window, w.prefill_steps,
                     100 * (w.decode_s + w.prefill_s) / window, preemptions)
        self._logged = dataclasses.replace(self.totals)
        self._logged_at = now
