"""What every stage shares: timing and peak-memory measurement of one stage run."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class StageRecord:
    """Wall time and peak RSS (this process plus its children) of one stage."""

    name: str
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    extra: dict[str, object] = field(default_factory=dict)


def _tree_rss() -> int:
    import psutil

    proc = psutil.Process()
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:  # the child exited between listing and reading
            continue
    return int(total)


@contextmanager
def measured(name: str, interval: float = 0.1) -> Iterator[StageRecord]:
    """Time a block and sample the RSS of this process tree every ``interval`` seconds.

    Sampling (not ``ru_maxrss``) is used because ru_maxrss only ever grows over a process's life,
    so it cannot attribute a peak to the stage that caused it.
    """
    record = StageRecord(name)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            record.peak_rss_bytes = max(record.peak_rss_bytes, _tree_rss())
            stop.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    thread.start()
    try:
        yield record
    finally:
        stop.set()
        thread.join()
        record.seconds = round(time.perf_counter() - start, 3)
