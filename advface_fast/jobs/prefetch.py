"""Decode and align the next shards in background threads while the model works on this one.

``prefetch(shards, load, threads, depth)`` yields ``(k, refs, loaded)`` for each shard in order;
a background thread keeps up to ``depth`` decoded shards ready, decoding each shard's images on a
pool of ``threads`` threads (PIL's decoders and dlib's detectors run outside Python's lock for
most of their time). ``BusyClock`` measures how much of the wall time the model was busy: the
model waits only when the queue is empty.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

_DONE = object()


class BusyClock:
    """Wall time of a loop split into model-busy and waiting-for-input seconds."""

    def __init__(self):
        self.start = time.perf_counter()
        self.busy = 0.0
        self.wait = 0.0

    def fraction(self) -> float:
        wall = time.perf_counter() - self.start
        return self.busy / wall if wall > 0 else 0.0


def prefetch(shards: Iterable[tuple[int, list]], load: Callable, threads: int = 2, depth: int = 2,
             clock: BusyClock | None = None) -> Iterator[tuple[int, list, list]]:
    """Yield (k, refs, [load(ref) for ref in refs]) per shard, decoded ahead in the background."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def produce():
        try:
            with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="gallery-decode") as pool:
                for k, refs in shards:
                    if stop.is_set():
                        return
                    loaded = list(pool.map(load, refs))
                    while not stop.is_set():
                        try:
                            q.put((k, refs, loaded), timeout=0.1)
                            break
                        except queue.Full:
                            continue
        except BaseException as err:  # handed to the consumer, which raises it
            q.put(err)
            return
        q.put(_DONE)

    thread = threading.Thread(target=produce, name="gallery-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            t0 = time.perf_counter()
            item = q.get()
            if clock is not None:
                clock.wait += time.perf_counter() - t0
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


__all__ = ["BusyClock", "prefetch"]
