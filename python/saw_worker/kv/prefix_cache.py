"""Prefix caching of full pages: requests that start with the same tokens share those pages' K/V.

A full page is named by a hash of its tokens and the name of the page before it, so a name stands
for the whole prefix up to the page's end and a lookup is a longest-prefix match. (A flat hash, not
nested tuples, whose hashing would cost the whole chain at every page; each page keeps what it was
named from, so a hash collision is a miss, never a wrong page.) Pages in use count their
holders; a named page nobody holds stays in the pool, least recently released first out, until an
allocation needs room. Only full pages are shared, and a full page is never written again (its
holders write at later positions), so a shared page needs no copy.

Every page a request holds comes from here: `allocate` evicts idle named pages when the free list
runs short, and `release` keeps named pages and returns the others to the pool.

With the bf16 sinks of a window format, a named first page can also hold its request's sinks in an entry of
the pool's sink store (the first S tokens' K/V depend on those tokens alone, so every request that matches the
page has the same sinks): a hit gets them back at bf16 instead of reading them from INT4. Entries go to the
most recently kept or restored first pages; an evicted page frees its entry.
"""

from __future__ import annotations

from collections import OrderedDict

from saw_worker.kv.pool import KVPool

ROOT = 0  # the name before a request's first page


class PrefixCache:
    def __init__(self, pool: KVPool, enabled: bool = True) -> None:
        self.pool = pool
        self.enabled = enabled
        self._page_of: dict[int, int] = {}  # name -> page
        self._named: dict[int, tuple[int, int, tuple[int, ...]]] = {}  # page -> (name, previous name, tokens)
        self._holders: dict[int, int] = {}  # named pages only
        self._idle: OrderedDict[int, None] = OrderedDict()  # named pages nobody holds, oldest first
        self._sink_entry: OrderedDict[int, int] = OrderedDict()  # first page -> sink store entry, oldest use first
        self._free_entries = list(range(pool.sink_entries))

    @property
    def free_pages(self) -> int:
        """Pages an allocation can get: free ones and idle named ones."""
        return self.pool.free_pages + len(self._idle)

    @property
    def used_tokens(self) -> int:
        """Tokens in pages that requests hold (idle named pages count as free)."""
        return self.pool.capacity_tokens - self.free_pages * self.pool.page_size

    def match(self, token_ids: list[int]) -> list[int]:
        """Named pages holding the longest prefix of token_ids, leaving at least its last token to compute
        (its logits give the next token). Nothing is taken: see `hold`."""
        if not self.enabled:
            return []
        size = self.pool.page_size
        pages: list[int] = []
        name = ROOT
        for start in range(0, len(token_ids) - size, size):
            tokens = tuple(token_ids[start:start + size])
            page = self._page_of.get(hash((name, tokens)), -1)
            if page < 0 or self._named[page][1:] != (name, tokens):
                break
            pages.append(page)
            name = self._named[page][0]
        return pages

    def idle_among(self, pages: list[int]) -> int:
        return sum(p in self._idle for p in pages)

    def hold(self, pages: list[int]) -> None:
        """Take matched pages for one more request."""
        for p in pages:
            self._holders[p] += 1
            self._idle.pop(p, None)

    def allocate(self, n: int) -> list[int] | None:
        """n pages nobody holds, evicting idle named pages as needed; None (nothing taken) if there are not n."""
        if n > self.free_pages:
            return None
        while self.pool.free_pages < n:
            page, _ = self._idle.popitem(last=False)
            del self._page_of[self._named.pop(page)[0]], self._holders[page]
            entry = self._sink_entry.pop(page, None)
            if entry is not None:
                self._free_entries.append(entry)
            self.pool.release([page])
        return self.pool.allocate(n)

    def name_pages(self, token_ids: list[int], pages: list[int], computed: int) -> None:
        """Name the full pages among the first `computed` tokens of a request holding `pages` (from its first
        page on), so that later requests can match them. A page whose name another page has stays private.
        token_ids holds the tokens known on the host, and `computed` never reaches past them (a launched step's
        token, on the device only, is not computed yet)."""
        if not self.enabled:
            return
        assert computed <= len(token_ids), "computed tokens the host does not know"
        size = self.pool.page_size
        name = ROOT
        for i in range(computed // size):
            page = pages[i]
            if page in self._named:  # matched, or named at an earlier chunk: its name is already known
                name = self._named[page][0]
                continue
            tokens = tuple(token_ids[i * size:(i + 1) * size])
            previous, name = name, hash((name, tokens))
            if name not in self._page_of:
                self._page_of[name] = page
                self._named[page] = (name, previous, tokens)
                self._holders[page] = 1

    def keep_sinks(self, first_page: int, row: int) -> None:
        """The request in ring row `row` holds its sinks at bf16 and its first page: keep them with the page once
        the page is named (the least recently used entry makes room)."""
        if first_page not in self._named or first_page in self._sink_entry or not self.pool.sink_entries:
            return
        entry = self._free_entries.pop() if self._free_entries else self._sink_entry.popitem(last=False)[1]
        self._sink_entry[first_page] = entry
        self.pool.save_sinks(row, entry)

    def restore_sinks(self, first_page: int, row: int) -> bool:
        """Put the sinks kept with first_page into ring row `row`; False when none are kept."""
        entry = self._sink_entry.get(first_page)
        if entry is None:
            return False
        self._sink_entry.move_to_end(first_page)
        self.pool.restore_sinks(entry, row)
        return True

    def release(self, pages: list[int]) -> None:
        """A request lets go of its pages: named ones wait for reuse, the others go back to the pool."""
        private = []
        for p in pages:
            if p in self._holders:
                self._holders[p] -= 1
                if self._holders[p] == 0:
                    self._idle[p] = None
            else:
                private.append(p)
        self.pool.release(private)
