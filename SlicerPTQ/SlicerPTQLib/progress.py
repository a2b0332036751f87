"""Progress reporting shared by the CLI (tqdm, or plain lines) and the Slicer worker."""

from __future__ import annotations

import json
import sys
from typing import Callable, Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")

#: ``callback(stage, done, total)``: called as a stage advances.
ProgressCallback = Callable[[str, int, int], None]


def track(items: Iterable[T], stage: str, total: Optional[int] = None,
          callback: Optional[ProgressCallback] = None) -> Iterator[T]:
    """Iterate ``items`` with a tqdm bar on stderr and optional callback.

    The bar is silent when stderr is not a terminal and no callback is set,
    so library use and tests stay quiet.
    """
    from tqdm import tqdm

    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    bar = tqdm(items, desc=stage, total=total, leave=False,
               disable=not sys.stderr.isatty())
    for index, item in enumerate(bar):
        yield item
        if callback is not None:
            callback(stage, index + 1, total or 0)


def json_lines_callback(stream=None) -> ProgressCallback:
    """A callback that writes one JSON line per step (read by the Slicer module)."""
    stream = stream or sys.stdout

    def report(stage: str, done: int, total: int) -> None:
        stream.write(json.dumps({"progress": {"stage": stage, "done": done, "total": total}}) + "\n")
        stream.flush()

    return report


def text_lines_callback(stream=None) -> ProgressCallback:
    """A callback that writes a plain line when a stage starts and when it ends (the demo's log).

    Long stages (export, calibration, self-check) otherwise pass in silence
    when stderr is not a terminal, where tqdm's bars stay off.
    """
    stream = stream or sys.stderr
    state = {"stage": None}

    def report(stage: str, done: int, total: int) -> None:
        if stage != state["stage"]:
            state["stage"] = stage
            stream.write(f"  {stage}: {done}/{total}\n" if total else f"  {stage} ...\n")
        elif total and done == total:
            stream.write(f"  {stage}: {done}/{total} done\n")
        stream.flush()

    return report
