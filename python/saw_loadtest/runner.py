"""Run one concurrency point: headless Locust processes, console progress, client-saturation check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .prompts import PromptItem, write_pool
from .records import RequestRecord, read_records

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
CPU_WARN = "CPU usage above"  # Locust's own warning when its process is CPU-bound
LAG_LIMIT_MS = 25.0  # event-loop lag p99 above this skews chunk timestamps noticeably
CPU_LIMIT = 0.9


@dataclass
class PointSpec:
    url: str
    model: str
    label: str
    scenario: str
    conc: int
    pool: list[PromptItem]
    work_dir: Path  # per-point files (pool, raw parts, logs)
    max_requests: int = 0  # 0 = no cap
    duration: float = 0.0  # 0 = no cap
    processes: int = 1
    request_timeout: float = 1800.0
    temperature: float = 0.0
    api_key: str | None = None
    progress_every: float = 10.0
    quiet: bool = False


@dataclass
class PointResult:
    records: list[RequestRecord]
    client_stats: list[dict]
    warnings: list[str] = field(default_factory=list)


def split(total: int, parts: int) -> list[int]:
    """Even split, larger shares first: split(10, 3) == [4, 3, 3]."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def auto_processes(conc: int) -> int:
    """One Locust process per 64 users, never more than the cores we can spare."""
    return max(1, min(-(-conc // 64), (os.cpu_count() or 1) - 1))


def _locust_cmd(spec: PointSpec, part: int, users: int, budget: int, start_at: float) -> list[str]:
    d = spec.work_dir
    hard_cap = spec.duration + spec.request_timeout + 30.0 if spec.duration else 10 * 24 * 3600
    return [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
        "--host", spec.url, "-u", str(users), "-r", str(users),
        "-t", f"{int(hard_cap)}s", "--stop-timeout", "5", "--loglevel", "WARNING",
        "--saw-prompts", str(d / "prompts.jsonl"), "--saw-out", str(d / f"raw.p{part}.jsonl"),
        "--saw-stats", str(d / f"client.p{part}.json"), "--saw-model", spec.model,
        "--saw-label", spec.label, "--saw-conc", str(spec.conc), "--saw-scenario", spec.scenario,
        "--saw-part", str(part), "--saw-parts", str(spec.processes),
        "--saw-max-requests", str(budget), "--saw-duration", str(spec.duration),
        "--saw-start-at", f"{start_at:.3f}", "--saw-timeout", str(spec.request_timeout),
        "--saw-temperature", str(spec.temperature),
    ]  # fmt: skip


def _count_lines(paths: list[Path], offsets: dict[Path, int], tally: dict[str, int]) -> None:
    """Incrementally read new complete lines of the raw files: requests done and failed so far."""
    for p in paths:
        try:
            with open(p, "rb") as f:
                f.seek(offsets.get(p, 0))
                data = f.read()
        except OSError:
            continue
        end = data.rfind(b"\n") + 1
        offsets[p] = offsets.get(p, 0) + end
        for line in data[:end].splitlines():
            tally["done"] += 1
            tally["failed"] += b'"error":null' not in line


def run_point(spec: PointSpec) -> PointResult:
    d = spec.work_dir
    d.mkdir(parents=True, exist_ok=True)
    write_pool(d / "prompts.jsonl", spec.pool)
    procs = max(1, min(spec.processes, spec.conc))
    spec.processes = procs
    users = split(spec.conc, procs)
    budgets = split(spec.max_requests, procs) if spec.max_requests else [0] * procs
    start_at = time.time() + 3.0 + 0.5 * procs  # all processes begin together, after their imports
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent.parent), env.get("PYTHONPATH")]))
    if spec.api_key:
        env["SAW_BENCH_API_KEY"] = spec.api_key  # not on the command line, where `ps` shows it
    running = []
    for part in range(procs):
        log = open(d / f"locust.p{part}.log", "wb")
        cmd = _locust_cmd(spec, part, users[part], budgets[part], start_at)
        running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))

    raw = [d / f"raw.p{p}.jsonl" for p in range(procs)]
    offsets: dict[Path, int] = {}
    tally = {"done": 0, "failed": 0}
    hard_stop = time.time() + (spec.duration + spec.request_timeout + 120.0 if spec.duration else 10 * 24 * 3600)
    last_print = time.time()
    warnings: list[str] = []
    while any(p.poll() is None for p, _ in running):
        time.sleep(0.5)
        if time.time() > hard_stop:
            warnings.append("locust did not stop in time and was killed; in-flight requests are lost")
            for p, _ in running:
                p.kill()
            hard_stop = float("inf")
        if not spec.quiet and time.time() - last_print >= spec.progress_every:
            last_print = time.time()
            _count_lines(raw, offsets, tally)
            cap = f"/{spec.max_requests}" if spec.max_requests else ""
            print(
                f"  [{spec.label} c={spec.conc}] {tally['done']}{cap} requests done, {tally['failed']} failed, "
                f"{max(0.0, time.time() - start_at):.0f} s elapsed",
                flush=True,
            )
    for p, log in running:
        log.close()
        if p.returncode not in (0, 1):  # 1 = Locust saw failed requests, which we count ourselves
            warnings.append(f"locust exited with {p.returncode}: see {d}/locust.p*.log")

    records = list(read_records(p for p in raw if p.exists()))
    stats = []
    for part in range(procs):
        sp = d / f"client.p{part}.json"
        if sp.exists():
            stats.append(json.loads(sp.read_text()))
    warnings += saturation_warnings(stats, [d / f"locust.p{p}.log" for p in range(procs)])
    if spec.max_requests == 0 and len(records) > len(spec.pool):
        warnings.append(f"prompt pool ({len(spec.pool)}) smaller than requests sent: prompts repeated")
    return PointResult(records, stats, warnings)


def saturation_warnings(stats: list[dict], logs: list[Path]) -> list[str]:
    out = []
    for s in stats:
        if s.get("cpu_frac", 0.0) > CPU_LIMIT or s.get("lag_p99_ms", 0.0) > LAG_LIMIT_MS:
            out.append(
                f"client saturated: locust process {s.get('part')} at {100 * s['cpu_frac']:.0f}% CPU, "
                f"event-loop lag p99 {s['lag_p99_ms']:.0f} ms (timings inflated; use more --processes)"
            )
    for log in logs:
        try:
            if CPU_WARN in log.read_text(errors="replace"):
                out.append(f"Locust warned about its own CPU usage ({log.name}): use more --processes")
        except OSError:
            pass
    return out
