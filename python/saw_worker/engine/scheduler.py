"""Continuous batching: which tokens run in the next forward pass.

Prefill has priority and runs in chunks under a per-step token budget; otherwise every running
request decodes one token. Admission needs free pages for the rest of the request's prompt plus
room for the next `reserve_decode_tokens` outputs of it and of every admitted request, so a burst
of long prompts waits instead of being admitted and then preempted (a preempted 16k-token prompt
is recomputed from scratch). When decode still runs out of pages the newest request is preempted
and later recomputed from its tokens. Pages come from the prefix cache: a request admitted with no
pages starts from the longest run of cached full pages that its tokens begin with. With a bf16
window, a request holding pages also holds a ring row of the pool (one per admitted request).

The engine reports what happened to the scheduled work through one entry point per outcome:
`on_ran` (a synchronous step computed its chunks and sampled), `on_launched` (a decode step is queued on the
device, its tokens not yet on the host), `on_tokens` (a launched step's tokens arrived), `on_abort` and
`on_failed`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from saw_worker.engine.request import Finish, Sequence
from saw_worker.kv.pool import KVPool
from saw_worker.kv.prefix_cache import PrefixCache
from saw_worker.options import SchedulerOptions


@dataclass
class Chunk:
    seq: Sequence
    start: int  # positions [start, end) are computed this step
    end: int

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's last token, so its logits give the next token."""
        return self.end == self.seq.num_tokens


@dataclass
class Batch:
    chunks: list[Chunk]
    is_decode: bool


class Scheduler:
    def __init__(self, pool: KVPool, options: SchedulerOptions, context_length: int,
                 eos_token_ids: frozenset[int]) -> None:
        """options.max_prefill_tokens must be set (SchedulerOptions.for_device)."""
        assert options.max_prefill_tokens is not None, "no prefill budget: use SchedulerOptions.for_device"
        self.pool = pool
        self.pages = PrefixCache(pool, options.prefix_cache)
        self.reserve_decode_tokens = options.reserve_decode_tokens
        self.preemptions = 0
        self.max_running = options.max_running_requests
        self.prefill_budget = options.max_prefill_tokens
        self.context_length = context_length
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch | None:
        prefill = self._schedule_prefill()
        if prefill:
            return Batch(prefill, is_decode=False)
        self._reserve_decode_pages()
        if not self.running:
            return None
        return Batch([Chunk(s, s.num_tokens - 1, s.num_tokens) for s in self.running], is_decode=True)

    def _schedule_prefill(self) -> list[Chunk]:
        chunks: list[Chunk] = []
        budget = self.prefill_budget
        slots_left = self.max_running - len(self.running)
        reserved = sum(self._pages_still_needed(s) for s in self.running)
        for seq in self.waiting:
            if budget == 0 or slots_left == 0:
                break
            # prompt logprobs need every position's logits, so such a request computes its whole prompt
            matched = [] if seq.pages or seq.wants_prompt_logprobs else self.pages.match(seq.token_ids)
            cached = seq.cached + len(matched) * self.pool.page_size
            n = min(seq.num_tokens - cached, budget)
            need = self.pool.pages_for(cached + n) - len(seq.pages) - len(matched)
            footprint = max(self._pages_still_needed(seq) - len(matched), need)
            free = self.pages.free_pages - self.pages.idle_among(matched)  # matched idle pages stop being free
            alone = not (self.running or chunks)  # a request too big for the reserve still runs by itself
            if need > free or (free - footprint < reserved and not alone):
                break
            if not seq.pages and self.pool.window:
                seq.window_row = self.pool.allocate_row()
                if seq.window_row is None:  # a small KV budget holds fewer ring rows than max_running
                    break
                seq.window_start = cached
                # a hit's sinks come back at bf16 if the prefix cache kept them with the first page
                seq.restored_sinks = bool(matched) and self.pages.restore_sinks(matched[0], seq.window_row)
            if matched:
                self.pages.hold(matched)
                seq.pages, seq.cached = matched, cached
                if seq.num_output == 0:  # usage counts prompt tokens; a preempted request's rerun is not one
                    seq.cached_prompt = cached
            seq.pages += self.pages.allocate(need) or []
            reserved += footprint - need
            chunks.append(Chunk(seq, seq.cached, seq.cached + n))
            budget -= n
            slots_left -= 1
        return chunks

    def _pages_still_needed(self, seq: Sequence) -> int:
        """Pages seq needs beyond those it holds: the rest of its tokens and its reserved outputs
        (at least the next one)."""
        outputs = min(seq.params.max_new_tokens - seq.num_output, max(self.reserve_decode_tokens, 1))
        return max(0, self.pool.pages_for(seq.num_tokens + outputs) - len(seq.pages))

    def _reserve_decode_pages(self) -> None:
        """Give every running request a slot for its next token, preempting the newest if needed."""
        for seq in sorted(self.running, key=lambda s: s.order):
            while seq in self.running and seq.num_tokens > len(seq.pages) * self.pool.page_size:
                pages = self.pages.allocate(1)
                if pages:
                    seq.pages += pages
                else:
                    self._preempt_newest()

    def _preempt_newest(self) -> None:
        holders = [s for s in (*self.running, *self.waiting) if s.pages]
        victim = max(holders, key=lambda s: s.order)
        self.preemptions += 1
        self._free(victim)
        if victim in self.running:
            self.running.remove(victim)
            self.waiting.appendleft(victim)

    def _free(self, seq: Sequence) -> None:
        self._name_pages(seq)
        self.pages.release(seq.pages)
        seq.pages = []
        seq.cached = 0
        if seq.window_row is not None:
            self.pool.release_row(seq.window_row)
            seq.window_row = None

    def _name_pages(self, seq: Sequence) -> None:
        """Name seq's full computed pages for the prefix cache, and keep its bf16 sinks with its first page."""
        self.pages.name_pages(seq.token_ids, seq.pages, seq.cached)
        if seq.ring_holds_sinks and seq.pages:
            self.pages.keep_sinks(seq.pages[0], seq.window_row)

    # --- what happened: the engine reports each outcome of a step through one of these ---------------------------

    def on_ran(self, batch: Batch, tokens: list[int | None]) -> list[Finish | None]:
        """A step ran to the end: every chunk's K/V are in the pool, and tokens[i] is the token sampled for chunk i
        when it reached its sequence's end (else None). Returns how each chunk's request finished, if it did."""
        return [self._commit(chunk, token) for chunk, token in zip(batch.chunks, tokens, strict=True)]

    def on_launched(self, batch: Batch) -> None:
        """A decode step for batch is queued on the device (reported after the previous launched step's tokens
        arrived): each running request's next token exists there only, in its row of the step, and the next step
        can already be scheduled (`ModelRunner.launch` takes those tokens from the device)."""
        for row, chunk in enumerate(batch.chunks):
            seq = chunk.seq
            if not seq.finished:  # else a wasted row: its previous token ended it, or it was aborted
                seq.cached = chunk.end
                seq.launched_row = row

    def on_tokens(self, batch: Batch, tokens: list[int]) -> list[tuple[Sequence, int, Finish | None]]:
        """The launched step's tokens (one per row of batch) reached the host. Returns, for each request still
        running (or preempted meanwhile), its new token and how it finished, if it did."""
        out = []
        for chunk, token in zip(batch.chunks, tokens, strict=True):
            seq = chunk.seq
            if seq.finished:
                continue
            seq.launched_row = None
            seq.token_ids.append(token)
            out.append((seq, token, self._check_finish(seq, token)))
        return out

    def on_abort(self, request_id: str) -> Sequence | None:
        """The client gave up on a request: take it out wherever it is and free its pages."""
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.id == request_id:
                    self._end(seq)
                    return seq
        return None

    def on_failed(self, *batches: Batch) -> list[Sequence]:
        """A forward pass for these batches raised: their requests end. Returns those that had not ended yet."""
        failed = []
        for batch in batches:
            for chunk in batch.chunks:
                if not chunk.seq.finished:
                    self._end(chunk.seq)
                    failed.append(chunk.seq)
        return failed

    def _commit(self, chunk: Chunk, token: int | None) -> Finish | None:
        seq = chunk.seq
        seq.cached = chunk.end
        if chunk.start < seq.num_prompt:  # a prefill chunk: its full pages can serve requests alike at once
            self._name_pages(seq)
        if token is None:
            return None
        if seq in self.waiting:
            self.waiting.remove(seq)
            self.running.append(seq)
        seq.token_ids.append(token)
        return self._check_finish(seq, token)

    def _check_finish(self, seq: Sequence, token: int) -> Finish | None:
        finish = self._finish_reason(seq, token)
        if finish is not None:
            self._end(seq)
        return finish

    def _end(self, seq: Sequence) -> None:
        """seq leaves the scheduler: no step runs it again, and its pages are freed (named ones kept)."""
        # A preempted request may sit in waiting while its last launched step's token arrives.
        for queue in (self.running, self.waiting):
            if seq in queue:
                queue.remove(seq)
                break
        self._free(seq)
        seq.finished = True

    def _finish_reason(self, seq: Sequence, token: int) -> Finish | None:
        p = seq.params
        if seq.num_output >= p.min_new_tokens:
            if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
                return Finish.STOP
        # The last clause stops a request that would not fit even with the whole pool to itself.
        if (seq.num_output >= p.max_new_tokens or seq.num_tokens >= self.context_length
                or seq.num_tokens >= self.pool.capacity_tokens):
            return Finish.LENGTH
        return None
