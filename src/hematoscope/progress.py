"""Progress for long loops: a rich bar on a terminal, plain log lines otherwise (CI, pipes)."""
from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
log = logging.getLogger("hematoscope")


def track(items: Iterable[T], total: int | None = None, description: str = "working",
          *, enabled: bool = True) -> Iterator[T]:
    """Yield from ``items`` while showing progress on stderr.

    On a TTY a rich progress bar is drawn; otherwise a log line is written about every 10 %
    (and at most every 30 s), so CI logs stay readable.
    """
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if not enabled:
        yield from items
        return
    if sys.stderr.isatty():
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TimeRemainingColumn(), transient=False) as bar:
            task = bar.add_task(description, total=total)
            for item in items:
                yield item
                bar.advance(task)
        return
    start = last = time.monotonic()
    step = max(1, (total or 0) // 10)
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if (total and done % step == 0) or now - last > 30:
            last = now
            log.info("%s: %d/%s (%.0f s)", description, done, total if total else "?", now - start)
