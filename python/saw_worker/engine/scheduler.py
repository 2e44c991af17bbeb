"""Continuous batching: which tokens run in the next forward pass.

Prefill has priority and runs in chunks under a per-step token budget; otherwise every running
request decodes one token. Admission needs free pages for the rest of the request's prompt plus
room for the next `reserve_decode_tokens` outputs of it and of every admitted request, so a burst
of long prompts waits instead of being admitted and then preempted (a preempted 16k-token prompt
is recomputed from scratch). When decode still runs out of pages the newest request is preempted
and later recomputed from its tokens. Pages come from the prefix cache: a request admitted with no
pages starts from the longest run of cached full pages that its tokens begin with. With a bf16
window, a request holding pages also holds a ring row of the pool (one per admitted request).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from saw_worker.engine.request import PENDING, Finish, Sequence
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
        return self.end == len(self.seq.token_ids)


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

    def remove(self, request_id: str) -> Sequence | None:
        """Take a request out wherever it is and free its pages."""
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.id == request_id:
                    queue.remove(seq)
                    self._free(seq)
                    return seq
        return None

    def schedule(self) -> Batch | None:
        prefill = self._schedule_prefill()
        if prefill:
            return Batch(prefill, is_decode=False)
        self._reserve_decode_pages()
        if not self.running:
            return None
        return Batch([Chunk(s, len(s.token_ids) - 1, len(s.token_ids)) for s in self.running], is_decode=True)

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
            n = min(len(seq.token_ids) - cached, budget)
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
        return max(0, self.pool.pages_for(len(seq.token_ids) + outputs) - len(seq.pages))

    def _reserve_decode_pages(self) -> None:
        """Give every running request a slot for its next token, preempting the newest if needed."""
        for seq in sorted(self.running, key=lambda s: s.order):
            while seq in self.running and len(seq.token_ids) > len(seq.pages) * self.pool.page_size:
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

    def commit(self, chunk: Chunk, token: int | None) -> Finish | None:
        """Record a finished forward for one chunk; token is the sampled next token when chunk.samples."""
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

    def advance(self, chunk: Chunk) -> None:
        """A decode step for chunk was launched: its token is PENDING until resolve(), but the next
        step can already be scheduled (and take the token from the device)."""
        chunk.seq.cached = chunk.end
        chunk.seq.token_ids.append(PENDING)

    def resolve(self, chunk: Chunk, token: int) -> Finish | None:
        """The launched step's token for chunk arrived: put it in place of PENDING."""
        seq = chunk.seq
        seq.token_ids[chunk.end] = token
        return self._check_finish(seq, token)

    def _check_finish(self, seq: Sequence, token: int) -> Finish | None:
        finish = self._finish_reason(seq, token)
        if finish is not None:
            # A preempted request may sit in waiting while its last launched step resolves.
            (self.running if seq in self.running else self.waiting).remove(seq)
            self._free(seq)
        return finish

    def _finish_reason(self, seq: Sequence, token: int) -> Finish | None:
        p = seq.params
        if seq.num_output >= p.min_new_tokens:
            if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
                return Finish.STOP
        # The last clause stops a request that would not fit even with the whole pool to itself.
        if (seq.num_output >= p.max_new_tokens or len(seq.token_ids) >= self.context_length
                or len(seq.token_ids) >= self.pool.capacity_tokens):
            return Finish.LENGTH
        return None
