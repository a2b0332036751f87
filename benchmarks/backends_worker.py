"""The backend benchmark's worker processes: one per variant, so its peak memory is its own.

The parent holds a :class:`Worker` per variant and sends it commands over a
pipe; the worker process (:func:`_worker`) loads the variant's runtime and
answers them: a patch forward (wall and CPU seconds), a whole volume
segmented and timed by stage, a sliding window, the layer precisions
OpenVINO executed, and the process's peak memory.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from backends_variants import Variant


# ----------------------------------------------------------------------------- worker side


class _TimedRuntime:
    """Wraps a runtime to add up the seconds spent inside ``predict`` (the network alone)."""

    def __init__(self, runtime):
        self.runtime = runtime
        self.name = runtime.name
        self.precision = runtime.precision
        self.predict_s = 0.0
        self.calls = 0

    def predict(self, batch):
        start = time.perf_counter()
        output = self.runtime.predict(batch)
        self.predict_s += time.perf_counter() - start
        self.calls += 1
        return output


def _runtime(variant: Dict, threads: Optional[int]):
    """The variant's runtime; a state dict with its architecture runs as the eager module it builds."""
    from SlicerPTQLib.runtimes import create_runtime

    arch = variant["extra"].get("arch")
    if arch is None:
        return create_runtime(Path(variant["path"]), variant["backend"], precision=variant["precision"],
                              threads=threads)
    from SlicerPTQLib.models import load_model
    from SlicerPTQLib.runtimes.torch_runtime import TorchRuntime

    loaded = load_model(variant["path"], arch=arch, arch_args=variant["extra"]["arch_args"])
    return TorchRuntime.from_module(loaded.module, threads)


def _worker(conn, variant: Dict, spec_path: str, threads: int) -> None:
    """Serve one variant: load its runtime, then answer the parent's commands until "close"."""
    rss_imports = None
    try:
        from SlicerPTQLib.inference import load_blending, segment_volume, sliding_window
        from SlicerPTQLib.metrics import peak_rss_mb
        from SlicerPTQLib.spec import ModelSpec
        from SlicerPTQLib.volumes import read_volume

        load_blending()  # what the first segmentation would otherwise import (MONAI), before the memory baseline
        rss_imports = peak_rss_mb()
        spec = ModelSpec.load(Path(spec_path))
        start = time.perf_counter()
        runtime = _runtime(variant, threads)
        load_s = time.perf_counter() - start
        conn.send(("ready", {"load_s": load_s, "precision": runtime.precision, "rss_imports_mb": rss_imports}))
    except Exception as exc:  # reported to the parent, which records the variant as failed
        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"))
        return
    patch = None
    volumes = {}
    while True:
        command, argument = conn.recv()
        try:
            if command == "close":
                runtime.close()
                conn.send(("ok", None))
                return
            elif command == "patch":
                patch = np.load(argument)
                conn.send(("ok", None))
            elif command == "forward":
                # Wall time, and the CPU time of all this process's threads: the latter barely
                # moves when other processes take the cores, the former is what a user waits.
                begin, cpu = time.perf_counter(), time.process_time()
                runtime.predict(patch)
                conn.send(("ok", (time.perf_counter() - begin, time.process_time() - cpu)))
            elif command == "volume":
                if argument not in volumes:
                    volumes[argument] = read_volume(Path(argument))
                timed = _TimedRuntime(runtime)
                labels, timings = segment_volume(timed, volumes[argument], spec)
                timings = dict(timings)
                timings["forward_s"] = timed.predict_s
                timings["blend_s"] = max(timings["network_s"] - timed.predict_s, 0.0)
                conn.send(("ok", (labels.array, timings)))
            elif command == "sliding_window":
                image = np.load(argument["image"])
                timed = _TimedRuntime(runtime)
                begin = time.perf_counter()
                sliding_window(timed, image, argument["roi"], overlap=argument["overlap"], mode=argument["mode"])
                total = time.perf_counter() - begin
                conn.send(("ok", {"total_s": total, "forward_s": timed.predict_s, "windows": timed.calls}))
            elif command == "layers":
                conn.send(("ok", runtime.layer_precisions()))
            elif command == "memory":
                conn.send(("ok", {"peak_rss_mb": peak_rss_mb(), "rss_imports_mb": rss_imports}))
            else:
                conn.send(("error", f"unknown command {command}"))
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"))


# ----------------------------------------------------------------------------- parent side


class Worker:
    """The parent's handle on one variant's worker process."""

    def __init__(self, context, variant: Variant, spec_path: Path, threads: int):
        self.variant = variant
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(child, asdict(variant), str(spec_path), threads),
                                       daemon=True)
        self.process.start()
        child.close()
        self.info: Dict = {}
        self.error: Optional[str] = None

    def wait_ready(self) -> None:
        status, payload = self.conn.recv()
        if status == "ready":
            self.info = payload
        else:
            self.error = payload

    def ask(self, command: str, argument=None):
        """Send a command; returns its answer, or None after recording the error."""
        if self.error:
            return None
        self.conn.send((command, argument))
        status, payload = self.conn.recv()
        if status == "error":
            self.error = f"{command}: {payload}"
            return None
        return payload

    def close(self) -> None:
        if self.process.is_alive():
            if not self.error:
                self.ask("close")
            self.process.join(timeout=30)
            if self.process.is_alive():
                self.process.terminate()
