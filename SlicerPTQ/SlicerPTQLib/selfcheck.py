"""Does a quantized model give FP32's labels here, with this runtime?

INT8 correctness depends on the CPU (see :mod:`.int8_compat`): a file that
is right on one machine came out as an empty mask on another. So a build
checks itself where it runs: the runtime's INT8 labels against its FP32
labels on whole calibration volumes, once per model file, machine and
runtime (cached under ``<builds>/selfchecks``, see :func:`build_cache.builds_dir`).

The floor is what the quantized model itself can give: ONNX Runtime (the
reference executor of Q/DQ graphs) on the same file as this CPU runs it
(:func:`.int8_compat.as_run_here`) and the same volumes, capped at
:data:`MIN_AGREEMENT`, less :data:`TOLERANCE` for rounding differences
between executors. Calibration volumes can lie outside what the network
was trained for (the shipped set has two 13-slice kidney MRIs for a brain
model, where even correct INT8 agrees at 0.976), so an absolute floor
alone would refuse correct models; the reference tells a wrong runtime
(agreement 0.05 on a held-out U-Net on AVX2) from a lossy quantization,
which the build reports; below :data:`HARD_FLOOR` a model is refused
whatever the reference says. Below the floor the runtime is refused for
that model with a sentence that says what to do.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np


#: Agreement Dice with FP32 that a runtime must reach where the reference reaches it.
MIN_AGREEMENT = 0.99
#: Below this a model is refused whatever the reference says: it is no longer the network.
HARD_FLOOR = 0.9
#: How far a runtime may fall below the reference (measured: OpenVINO and ONNX
#: Runtime on the same W2A8 file differ by <= 0.0005 in agreement with FP32).
TOLERANCE = 0.005
#: Calibration volumes a check segments, at most.
MAX_VOLUMES = 4
#: Timed forwards of one patch per precision, in turns: the speed verdict is their median (timing the check's
#: few small volumes, 1-2 s of work, read 0.70x to 1.31x on one AVX2 CPU where INT8 is 1.1x per patch).
TIMED_PATCHES = 7
#: Runtimes checked on the CPU (TensorRT is checked by benchmarks/gpu_check.py).
CHECKED_RUNTIMES = ("openvino", "onnxruntime")


@dataclass
class SelfCheck:
    """One check of a quantized file on one machine with one runtime."""

    runtime: str
    machine: str
    #: Dice of the runtime's INT8 labels with FP32's, pooled over the volumes
    agreement: float
    #: the same for ONNX Runtime on the same Q/DQ file as this CPU runs it
    reference_agreement: float
    per_volume: List[float]
    adaptation: str = ""
    seconds: float = 0.0
    volumes: List[str] = field(default_factory=list)
    #: the runtime's median time per patch, FP32 / INT8 (:data:`TIMED_PATCHES` after one warm-up each)
    int8_speedup: float = float("nan")

    @property
    def floor(self) -> float:
        return max(HARD_FLOOR, min(MIN_AGREEMENT, self.reference_agreement) - TOLERANCE)

    @property
    def passed(self) -> bool:
        return self.agreement >= self.floor

    def to_dict(self) -> dict:
        return {**asdict(self), "floor": self.floor, "passed": self.passed}

    @classmethod
    def from_dict(cls, data: dict) -> "SelfCheck":
        """Inverse of :meth:`to_dict` (the derived ``floor`` and ``passed`` are recomputed)."""
        return cls(**{key: value for key, value in data.items() if key not in ("floor", "passed")})

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (f"self-check {verdict}: {self.runtime} INT8 agrees with FP32 at Dice {self.agreement:.4f} "
                f"(reference {self.reference_agreement:.4f}, floor {self.floor:.4f}) on "
                f"{len(self.per_volume)} volume(s) and runs {self.int8_speedup:.2f}x FP32's speed; {self.machine}")

    def refusal(self, model_path: Path) -> str:
        if self.reference_agreement < HARD_FLOOR:
            return (f"{model_path} is not the network it was made from: its INT8 labels agree with FP32 at "
                    f"Dice {self.agreement:.4f} on the check volumes, and the reference math gives "
                    f"{self.reference_agreement:.4f} too. Quantize again with --accuracy-budget "
                    f"{MIN_AGREEMENT} (or more weight bits), or use the FP32 model (model.fp32.onnx).")
        return (f"{model_path} runs wrong with {self.runtime} on this machine: its INT8 labels agree with "
                f"FP32 at Dice {self.agreement:.4f} where the same file's reference math gives "
                f"{self.reference_agreement:.4f} ({self.machine}). Use another runtime "
                "(--runtime onnxruntime), or the FP32 model (model.fp32.onnx) beside it.")

    @property
    def int8_slower(self) -> bool:
        """INT8 gained no speed over FP32 with this runtime here: the float model is the better pick."""
        return self.int8_speedup < 1.0

    def speed_note(self) -> str:
        """A sentence saying that the FP32 model is faster here, else ""."""
        if not self.int8_slower:
            return ""
        return (f"INT8 is not faster than FP32 with {self.runtime} on this CPU ({self.int8_speedup:.2f}x; "
                f"{self.machine}): the FP32 model (model.fp32.onnx) gives FP32's labels at least as fast.")

    def warning(self) -> str:
        """A sentence when the quantized model itself loses agreement (any runtime), else ""."""
        if self.reference_agreement >= MIN_AGREEMENT:
            return ""
        return (f"INT8 agrees with FP32 at only Dice {self.reference_agreement:.4f} on the check volumes "
                f"({', '.join(Path(name).name for name in self.volumes) or 'the input'}), by the reference "
                f"math itself: if these "
                f"volumes are what the network segments, quantize again with --accuracy-budget "
                f"{MIN_AGREEMENT}.")


def machine_description(runtime: str) -> str:
    """CPU, its int8 path and the runtime's version: what the check depends on."""
    import importlib.metadata

    from .cpu_info import describe, cpu_info
    from .int8_compat import path_here

    try:
        version = importlib.metadata.version(runtime)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    path = path_here()
    return f"{describe(cpu_info())}; {path.reason}; {runtime} {version}"


def run_check(fp32_onnx: Path, quantized_onnx: Path, volumes: Sequence[np.ndarray], spec,
              runtime: str = "openvino", threads: Optional[int] = None,
              names: Sequence[str] = ()) -> SelfCheck:
    """Segment preprocessed ``volumes`` ``(C, D, H, W)`` with FP32 and INT8 on ``runtime``, and INT8 on
    ONNX Runtime (the reference: the file as this CPU runs it), and compare their labels with FP32's.

    ``spec`` (:class:`..spec.ModelSpec`) gives the patch size, overlap and
    how outputs become labels; agreement is Dice pooled over the volumes.
    """
    from .inference import sliding_window
    from .int8_compat import as_run_here
    from .runtimes import create_runtime
    from .runtimes.onnxruntime_runtime import OnnxRuntimeRuntime
    from .sensitivity import output_error

    start = time.perf_counter()
    patch = _first_patch(np.asarray(volumes[0], np.float32), spec.roi_size)
    outputs = {}
    engines = {}
    try:
        with tempfile.TemporaryDirectory(prefix="slicer-ptq-check-") as scratch:
            engines["fp32"] = create_runtime(fp32_onnx, runtime, precision="fp32", threads=threads)
            engines["int8"] = create_runtime(quantized_onnx, runtime, threads=threads)
            if runtime != "onnxruntime":
                # The exact math of the graph this runtime runs here (int8_compat), not of the file as given;
                # that graph already fits every int16 pair, so ONNX Runtime takes it as it is.
                engines["reference"] = OnnxRuntimeRuntime(as_run_here(quantized_onnx, scratch), threads=threads,
                                                          adapt_int8=False)
            for key, engine in engines.items():
                engine.predict(patch)   # compile first
                outputs[key] = [sliding_window(engine, np.asarray(array, np.float32), spec.roi_size,
                                               overlap=spec.overlap)[None] for array in volumes]
        if "reference" in engines:   # not timed: its memory goes back before the timing
            engines.pop("reference").close()
        seconds = _median_seconds(engines["fp32"], engines["int8"], patch)
        adaptation = getattr(engines["int8"], "int8_adaptation", "")
    finally:
        for engine in engines.values():
            engine.close()
    per_volume = [output_error([ref], [out], output_kind=spec.label_rule()).dice
                  for ref, out in zip(outputs["fp32"], outputs["int8"])]
    pooled = output_error(outputs["fp32"], outputs["int8"], output_kind=spec.label_rule()).dice
    reference = output_error(outputs["fp32"], outputs.get("reference", outputs["int8"]),
                             output_kind=spec.label_rule()).dice
    return SelfCheck(runtime=runtime, machine=machine_description(runtime), agreement=float(pooled),
                     reference_agreement=float(reference), per_volume=[float(value) for value in per_volume],
                     adaptation=adaptation, seconds=time.perf_counter() - start, volumes=list(names),
                     int8_speedup=seconds[0] / max(seconds[1], 1e-9))


def _first_patch(volume: np.ndarray, roi) -> np.ndarray:
    """The volume's first ``roi`` window as a batch of one, zero-padded where the volume is smaller."""
    patch = np.zeros((1, volume.shape[0], *roi), np.float32)
    window = volume[(slice(None), *(slice(0, size) for size in roi))]
    patch[(0, slice(None), *(slice(0, size) for size in window.shape[1:]))] = window
    return patch


def _median_seconds(fp32, int8, patch: np.ndarray):
    """Median wall time per forward of ``patch``, (FP32, INT8), over :data:`TIMED_PATCHES` forwards each,
    taken in turns so that a change in the machine's load falls on both."""
    times = ([], [])
    for _ in range(TIMED_PATCHES):
        for engine, taken in zip((fp32, int8), times):
            started = time.perf_counter()
            engine.predict(patch)
            taken.append(time.perf_counter() - started)
    return float(np.median(times[0])), float(np.median(times[1]))


def _record_path(quantized_onnx: Path, runtime: str) -> Path:
    from .build_cache import SELFCHECKS_DIR, builds_dir
    from .fetch import sha256_of

    machine = machine_description(runtime)
    key = hashlib.sha256(f"{sha256_of(quantized_onnx)}|{machine}".encode()).hexdigest()[:24]
    # Beside the builds it vouches for, so SLICER_PTQ_BUILDS moves (and tests isolate) both.
    return builds_dir() / SELFCHECKS_DIR / f"{key}.json"


def recorded(quantized_onnx: Path, runtime: str) -> Optional[SelfCheck]:
    """The cached check of this file on this machine and runtime, if any (unreadable: none)."""
    path = _record_path(quantized_onnx, runtime)
    try:
        return SelfCheck.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def record(quantized_onnx: Path, check: SelfCheck) -> None:
    """Cache ``check`` for this file, machine and runtime."""
    from .atomic import replacing

    path = _record_path(quantized_onnx, check.runtime)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path, suffix=".json") as tmp:
        Path(tmp).write_text(json.dumps(check.to_dict(), indent=2))
