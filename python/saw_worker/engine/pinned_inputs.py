"""Pinned host buffers that feed a CUDA graph's static device inputs, in two sets used in turn.

A replay writes its inputs into host memory and queues non-blocking copies into the graph's device buffers.
The host does not wait for those copies: with overlapped decode (engine/engine.py) it launches step N+1 while
step N's copies may still be queued behind earlier work. Rewriting the buffers N's copies read would hand N
the next step's inputs, so consecutive steps fill different sets.

Why two sets suffice: LocalEngine._step launches step N+1 (writing set (N+1) % 2) and only then waits for
step N (`ModelRunner.collect`: N's done event, recorded after N's sampling, so after N's copies on the same
stream). Step N+2 is launched after that wait, and its set, N % 2, was last read by step N, whose copies are
done; step N+1's copies, possibly still pending, read the other set. A synchronous step (`ModelRunner.run`)
waits for its tokens before the next one is built. The device buffers need no second set: copies and replays
are ordered on one stream.

Each set also records an event after its copies, and `fill` waits on it before handing the set out again. In
the engine's order that wait finds the event done (it never blocks); it keeps a caller that skips the wait
(an engine error drops a launched step unwaited) from overwriting a pending copy.

The eager path needs none of this: `torch.tensor(..., pin_memory=True)` takes fresh blocks from torch's caching
host allocator, which does not hand out a block again before the copies that read it have finished.
"""

from __future__ import annotations

import numpy as np
import torch

Index = slice | tuple[slice, ...]


def upload(data: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host values on the device without blocking the host: from a fresh pinned block on CUDA (a copy from
    pageable memory would wait for the work queued before it, e.g. the step's forward)."""
    pinned = device.type == "cuda"
    return torch.tensor(data, dtype=dtype, pin_memory=pinned).to(device, non_blocking=pinned)


def download(t: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """A device tensor's copy into pinned host memory, queued without waiting, and the event that marks it done;
    on CPU the tensor itself and None."""
    if not t.is_cuda:
        return t, None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


class PinnedInputs:
    def __init__(self, device_buffers: dict[str, torch.Tensor], sets: int = 2) -> None:
        """device_buffers: the graph's static inputs by name; each set holds a host buffer of the same shape."""
        self.device_buffers = device_buffers
        self.cuda = any(t.is_cuda for t in device_buffers.values())
        self._sets = [{name: torch.zeros(t.shape, dtype=t.dtype, pin_memory=self.cuda)
                       for name, t in device_buffers.items()} for _ in range(sets)]
        self._arrays = [{name: t.numpy() for name, t in host.items()} for host in self._sets]
        self._events = [self._new_event() for _ in range(sets)]
        self._turn = sets - 1  # the set filled last; the first fill() takes set 0

    @property
    def turn(self) -> int:
        """The set the last fill() handed out."""
        return self._turn

    def fill(self) -> dict[str, np.ndarray]:
        """The next set's host buffers (numpy views, by name) for this step's inputs, once the copies that last
        read them are done."""
        self._turn = (self._turn + 1) % len(self._sets)
        self._wait(self._turn)
        return self._arrays[self._turn]

    def upload(self, extents: dict[str, Index]) -> None:
        """Queue copies of the filled set into the device buffers (each over its extent), then record the event
        that tells fill() when the set may be written again."""
        host = self._sets[self._turn]
        for name, index in extents.items():
            self._copy(self.device_buffers[name][index], host[name][index])
        self._record(self._turn)

    # the device operations, one method each (tests stand in a simulated stream)

    def _new_event(self) -> torch.cuda.Event | None:
        return torch.cuda.Event() if self.cuda else None

    def _copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src, non_blocking=self.cuda)

    def _record(self, turn: int) -> None:
        event = self._events[turn]
        if event is not None:
            event.record()

    def _wait(self, turn: int) -> None:
        event = self._events[turn]
        if event is not None:
            event.synchronize()  # returns at once for an event never recorded
