"""`SGLangEngine`: saw's `Engine` protocol (engine/interface.py) over SGLang's `sglang.Engine`.

SGLang runs its scheduler and model runner in processes of its own (spawned); the engine object here owns its
tokenizer-side manager, which lives on an asyncio loop. That loop runs on a thread of this class, so the gRPC
server's loop never waits on SGLang's. Requests go in as token ids (SGLang's tokenizer is off: the router
tokenizes), tokens come back incrementally and become saw `Event`s.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from saw_sglang.config import BACKEND, ENV, KVSpec
from saw_worker.config import TokenizerInfo
from saw_worker.engine.interface import EngineInfo, LoadStats
from saw_worker.engine.request import Event, Finish, GenerateParams, RequestError, Sink, TokenLogprob
from saw_worker.kv import calibration
from saw_worker.kv.pool import bytes_per_token
from saw_worker.loader.export import hf_folder_for
from saw_worker.loader.tokenizer import folder_tokenizer, write_hf_tokenizer
from saw_worker.options import GPU_PREFILL_TOKENS, WorkerOptions

log = logging.getLogger("saw_worker")
POLL_S = 0.25  # how often the scheduler's load and SGLang's processes are looked at
DUMMY_MAX_LENGTH = 1 << 20  # model_max_length of a written fallback tokenizer: the model's context bounds prompts


def require_sglang() -> None:
    try:
        import sglang  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("--engine sglang needs SGLang 0.5.11 installed next to saw (docs/sglang.md: "
                           "pip install 'sglang==0.5.11'); --engine saw needs nothing more") from exc


def model_folder(spec: str) -> Path:
    """The HF folder SGLang loads: the one given, or an alias's / .gguf file's written out once (loader/export.py)."""
    folder = hf_folder_for(spec) or Path(spec)
    if not (folder / "config.json").is_file():
        raise ValueError(f"--engine sglang serves an HF folder (config.json + safetensors), an alias or a .gguf "
                         f"file; {spec!r} is none of them")
    return folder


def kv_spec(opts: WorkerOptions, calibration_tokens: int = 0) -> KVSpec:
    kv = opts.kv
    return KVSpec(kv.name, kv.hadamard_order, kv.rotate_v, kv.k_center, kv.k_scale, kv.k_scale_alpha, kv.k_mean_file,
                  calibration_tokens)


def head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def pool_tokens(memory: int, spec: KVSpec, config: dict[str, Any]) -> int:
    """The tokens `memory` bytes hold in spec's format: SGLang's max_total_tokens for --kv-cache-memory (plugin.py
    sizes SGLang's pool by the same bytes per token)."""
    heads = int(config.get("num_key_value_heads") or config["num_attention_heads"])
    return memory // bytes_per_token(spec.format(head_dim(config)), int(config["num_hidden_layers"]), heads)


def tokenizer_folder(folder: Path, tokenizer: TokenizerInfo, scratch: Path) -> Path:
    """A folder of the tokenizer the router uses (folder_tokenizer's): the model's own files, else `tokenizer` (the
    byte-level fallback) written into scratch. SGLang does not tokenize (skip_tokenizer_init); its grammar backend
    reads this folder (plugin.py)."""
    if (folder / "tokenizer.json").exists():
        return folder
    write_hf_tokenizer(tokenizer, scratch, DUMMY_MAX_LENGTH)
    return scratch


def engine_args(opts: WorkerOptions, folder: Path, tokenizer: Path) -> dict[str, Any]:
    """sglang.Engine's arguments for the worker's options; what SGLang's engine cannot honour is refused."""
    m, kv, pool, sched, dec = opts.model, opts.kv, opts.pool, opts.scheduler, opts.decode
    asked = [flag for flag, value in (("--window", kv.window), ("--sinks", kv.sinks), ("--bf16-layers",
                                                                                       kv.bf16_layers)) if value]
    if asked:
        raise ValueError(f"--engine sglang does not take {', '.join(asked)} yet (the bf16 window and sinks need saw's "
                         "scheduler; per-layer formats, saw's pool layout)")
    args: dict[str, Any] = dict(
        model_path=str(folder), load_format="dummy" if m.load_format == "dummy" else "auto",
        dtype="auto" if m.dtype == "auto" else m.dtype, attention_backend=BACKEND, page_size=pool.page_size,
        # the router tokenizes; SGLang's grammar backend still reads the tokenizer folder (plugin.py)
        skip_tokenizer_init=True, tokenizer_path=str(tokenizer), incremental_streaming_output=True,
        sampling_backend="pytorch",
        max_running_requests=sched.max_running_requests,
        chunked_prefill_size=sched.max_prefill_tokens or GPU_PREFILL_TOKENS,
        disable_radix_cache=not sched.prefix_cache, disable_cuda_graph=not dec.cuda_graphs,
        # prefill graphs (torch.compile of the model around the attention op) are not wired to saw's extend
        disable_piecewise_cuda_graph=True,
        disable_overlap_schedule=not dec.overlap, log_level=opts.server.log_level, random_seed=0,
        mem_fraction_static=pool.mem_fraction)
    if m.context_length:
        args["context_length"] = m.context_length
    if pool.kv_cache_memory is not None:  # a fixed pool, within what --mem-fraction leaves
        config = json.loads((folder / "config.json").read_text())
        args["max_total_tokens"] = pool_tokens(pool.kv_cache_memory, kv_spec(opts), config)
    return args


def sampling_params(p: GenerateParams) -> dict[str, Any]:
    """SGLang's sampling parameters for a saw request."""
    s = p.sampling
    out: dict[str, Any] = dict(max_new_tokens=p.max_new_tokens, min_new_tokens=p.min_new_tokens,
                               ignore_eos=p.ignore_eos, stop_token_ids=sorted(p.stop_token_ids),
                               temperature=s.temperature, top_p=s.top_p, top_k=s.top_k if s.top_k > 0 else -1,
                               min_p=s.min_p, frequency_penalty=s.frequency_penalty,
                               presence_penalty=s.presence_penalty, repetition_penalty=s.repetition_penalty)
    if s.logit_bias:
        out["logit_bias"] = {str(token): bias for token, bias in s.logit_bias}
    if s.seed is not None and s.temperature > 0:
        # SGLang 0.5.11 reads a request's sampling_seed only in its deterministic-inference mode (batch-invariant
        # kernels, which saw's attention backend does not provide); otherwise it would sample unseeded
        raise RequestError("seeded sampling (seed with temperature > 0) is not supported with --engine sglang")
    g = p.grammar
    if g is not None:
        # SGLang compiles every schema in xgrammar's strict mode (no properties beyond the schema's): what a strict
        # request asks for, and a subset of what a non-strict one allows
        if g.kind == "json_object":
            out["json_schema"] = json.dumps({"type": "object"})
        elif g.kind == "json_schema":
            out["json_schema"] = g.spec
        elif g.kind in ("regex", "ebnf"):
            out[g.kind] = g.spec
        else:  # choice: one of the given strings, exactly
            out["ebnf"] = "root ::= " + " | ".join(json.dumps(c) for c in json.loads(g.spec))
    return out


def _logprobs(values: list[Any] | None, tops: list[Any] | None) -> list[TokenLogprob]:
    """SGLang's (logprob, token id, text) tuples (and per token a list of them) as saw's TokenLogprob."""
    tops = tops or [None] * len(values or [])
    return [TokenLogprob(float(v[0]), [(int(t[1]), float(t[0])) for t in top or []])
            for v, top in zip(values or [], tops, strict=True) if v is not None and v[0] is not None]


def event(out: dict[str, Any], params: GenerateParams) -> Event:
    """One streamed SGLang output (its output_ids are the new ones) as a saw Event."""
    meta = out["meta_info"]
    ev = Event(token_ids=list(out.get("output_ids") or []))
    if params.return_logprobs or params.top_logprobs:
        ev.logprobs = _logprobs(meta.get("output_token_logprobs"), meta.get("output_top_logprobs"))
    if params.prompt_logprobs:
        ev.prompt_logprobs = _logprobs(meta.get("input_token_logprobs"), meta.get("input_top_logprobs"))
    reason = meta.get("finish_reason")
    if reason is None:
        return ev
    kind = reason.get("type") if isinstance(reason, dict) else str(reason)
    ev.finish = {"stop": Finish.STOP, "length": Finish.LENGTH}.get(kind, Finish.ABORT)
    ev.prompt_tokens = int(meta.get("prompt_tokens", 0))
    ev.completion_tokens = int(meta.get("completion_tokens", 0))
    ev.cached_tokens = int(meta.get("cached_tokens", 0))
    if ev.finish is Finish.ABORT and isinstance(reason, dict) and reason.get("status_code") == 400:
        ev.error, ev.refused = str(reason.get("message", "refused")), True
    return ev


def _alive(pid: int) -> bool:
    import psutil  # SGLang's dependency

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class SGLangEngine:
    """Starts SGLang (blocking, minutes) on its own thread; start() / shutdown() / on_death as ProcessEngine."""

    def __init__(self, options: WorkerOptions) -> None:
        require_sglang()
        folder = model_folder(options.model.name)
        config = json.loads((folder / "config.json").read_text())
        vocab = int(config["vocab_size"])
        tokenizer = folder_tokenizer(folder, vocab)
        self._scratch = tempfile.TemporaryDirectory(prefix="saw-sglang-")
        args = engine_args(options, folder, tokenizer_folder(folder, tokenizer, Path(self._scratch.name)))
        prompt = calibration.calibration_ids(tokenizer)
        spec = kv_spec(options, len(prompt))
        # the backend measures the K calibration on the first prefill: this prompt, sent before any request (_run)
        self._calibration_prompt = prompt if spec.measures_calibration(head_dim(config)) else None
        os.environ[ENV] = spec.to_env()  # SGLang's scheduler process reads it (config.py)
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(args,), name="sglang-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            raise RuntimeError(f"SGLang did not start: {self._failure}") from self._failure
        fmt = spec.format(head_dim(config))
        self._info = EngineInfo(folder.resolve().name, tokenizer, self._context_len, vocab,
                                f"{fmt.describe()} (sglang)", self._capacity, options.pool.page_size, "cuda (sglang)")
        self._running: dict[str, int] = {}  # request id -> max new tokens
        self._lock = threading.Lock()
        self._sglang_load = LoadStats(kv_tokens_total=self._capacity)  # the scheduler's, POLL_S old at most
        self.preemptions = 0  # SGLang's retractions of the requests finished so far (each request's count, summed)
        self.on_death: Callable[[], None] | None = None
        asyncio.run_coroutine_threadsafe(self._watch(), self._loop)

    def _run(self, args: dict[str, Any]) -> None:
        try:
            import sglang

            self._engine = sglang.Engine(**args)
            if self._calibration_prompt is not None:
                started = time.perf_counter()
                self._engine.generate(input_ids=self._calibration_prompt, sampling_params={"max_new_tokens": 1})
                log.info("K calibration measured on the built-in text in %.2fs", time.perf_counter() - started)
            self._capacity = int(self._engine.get_server_info()["max_total_num_tokens"])
            self._context_len = int(self._engine.tokenizer_manager.context_len)
            self._loop: asyncio.AbstractEventLoop = self._engine.loop
        except BaseException as exc:  # noqa: BLE001 - reported to the constructor, which raises it
            self._failure = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    async def _watch(self) -> None:
        """Every POLL_S: the scheduler's load (running, waiting, KV tokens used), and whether SGLang's processes
        still live; when one has died, on_death (the worker then exits, and its supervisor restarts it)."""
        pids = self._engine.get_all_child_pids()
        warned = False
        while True:
            await asyncio.sleep(POLL_S)
            if not all(_alive(p) for p in pids):
                log.error("an SGLang process exited; the worker stops")
                if self.on_death is not None:
                    self.on_death()
                return
            try:
                r = (await self._engine.tokenizer_manager.get_loads(include=["core"]))[0]
                self._sglang_load = LoadStats(r.num_running_reqs, r.num_waiting_reqs, r.num_used_tokens,
                                              r.max_total_num_tokens)
            except Exception:  # noqa: BLE001 - the load is advisory; requests go on without it
                if not warned:
                    log.exception("cannot read SGLang's load; /metrics shows the worker's own count")
                    warned = True

    def start(self) -> None:
        """Nothing left to start: SGLang is serving once the constructor returns."""

    def shutdown(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=15)
        self._engine.shutdown()
        self._scratch.cleanup()

    def info(self) -> EngineInfo:
        return self._info

    def load(self) -> LoadStats:
        s = self._sglang_load
        with self._lock:
            outstanding = sum(self._running.values())
        return LoadStats(s.running, s.waiting, s.kv_tokens_used, s.kv_tokens_total, outstanding)

    def submit(self, params: GenerateParams, sink: Sink) -> None:
        info = self._info
        params.validate(info.vocab_size, info.context_length, info.kv_capacity_tokens)
        sampling = sampling_params(params)
        with self._lock:
            if params.request_id in self._running:
                raise RequestError(f"request id {params.request_id!r} is already running")
            self._running[params.request_id] = params.max_new_tokens
        asyncio.run_coroutine_threadsafe(self._generate(params, sampling, sink), self._loop)

    async def _generate(self, params: GenerateParams, sampling: dict[str, Any], sink: Sink) -> None:
        try:
            stream = await self._engine.async_generate(
                input_ids=params.input_ids, sampling_params=sampling, stream=True, rid=params.request_id,
                return_logprob=params.return_logprobs or params.top_logprobs > 0 or params.prompt_logprobs,
                top_logprobs_num=params.top_logprobs, logprob_start_len=0 if params.prompt_logprobs else -1)
            async for out in stream:
                ev = event(out, params)
                last = ev.finish is not None
                if last:  # counted before the sink hears of the finish
                    self.preemptions += int(out["meta_info"].get("total_retractions", 0))
                sink(ev)
                if last:
                    return
            sink(Event(finish=Finish.ABORT))
        except ValueError as exc:  # SGLang's refusal of bad input
            sink(Event(finish=Finish.ABORT, error=str(exc), refused=True))
        except Exception as exc:  # noqa: BLE001 - the request fails, the engine serves on
            log.exception("sglang request %s failed", params.request_id)
            sink(Event(finish=Finish.ABORT, error=f"the engine failed this request: {exc}"))
        finally:
            with self._lock:
                self._running.pop(params.request_id, None)

    def abort(self, request_id: str) -> bool:
        with self._lock:
            found = request_id in self._running
        if found:
            self._loop.call_soon_threadsafe(self._engine.tokenizer_manager.abort_request, request_id)
        return found
