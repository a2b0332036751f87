"""SlicerPTQ against what users already run, on the same patches and volumes, in one run.

Backends (each in its own worker process, so its peak memory is its own):
PyTorch eager FP32 (what MONAI users run), ONNX Runtime FP32, OpenVINO FP32
(precision hint f32 set explicitly), OpenVINO BF16, OpenVINO's own
quantizer NNCF INT8 (same FP32 ONNX, same calibration crops), SlicerPTQ
INT8 for each calibration method, and SlicerPTQ low-bit weights when
``SlicerPTQLib.lowbit`` is there.

Measured per backend: per-patch latency (median, p90 after warm-up; backends
interleaved in a shuffled order every round, so machine noise hits all
alike), whole-volume wall time split into preprocessing / network /
blending / restoring, peak RSS (``resource.getrusage`` in the worker), file
size, quantization time, Dice vs the reference masks and vs PyTorch FP32,
and the executed precision of every OpenVINO layer. A sliding-window
profile (a real volume at its native size, several windows) shows where the
whole-volume time goes once the network is INT8.

``--models`` adds, after (or instead of) the shipped model, registry
architectures whose small 6-class version ``train_small_models.py`` trained
(weights from the cache): calibrated on MNI152 2009a + MNI152 + the ITK
T1, evaluated on the ITK T1 (its k-means labels are the training reference)
and Colin27 (Dice vs FP32 only). Each model is one section of the JSON and the markdown.

Run (about 10 minutes on 2 cores; --quick about 4)::

    python benchmarks/bench_backends.py [--quick] [--models shipped UNet SegResNet] [--out DIR]

Writes ``DIR/benchmark.json``, ``DIR/benchmark.md``, per-volume slice files
(``slices/*.npz``) and ``DIR/report/index.html`` (SlicerPTQLib.report).
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing as mp
import os
import random
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

METHODS = ("max", "percentile", "entropy", "mse")
DEFAULT_METHOD = "max"
BENCHMARKS = Path(__file__).resolve().parent
RESULTS = BENCHMARKS / "results"
SHIPPED = "shipped"
#: The registry models' volumes (shipped.CATALOG names), as bench_architectures.py uses them.
REGISTRY_CALIBRATION = ("mni2009a", "mni152", "itk_t1")
REGISTRY_EVALUATION = ("itk_t1", "colin27")
#: Sliding-window settings of the profile: MONAI's usual overlap and blending.
PROFILE_OVERLAP = 0.5
PROFILE_MODE = "gaussian"


@dataclass
class Variant:
    """One backend + model file to measure."""

    key: str
    label: str
    backend: str
    path: str
    precision: Optional[str] = None
    size_mb: Optional[float] = None
    quantize_s: Optional[float] = None
    note: str = ""
    extra: Dict = field(default_factory=dict)


@dataclass
class Subject:
    """One model to benchmark, with its volumes.

    ``path`` is a TorchScript file, or a state dict built as ``arch`` with
    ``arch_args``. ``cases`` are ``(volume, image, reference file or None)``;
    ``reference`` reads a reference file into labels. ``folder`` (under the
    results folder's ``models/`` and ``slices/``) keeps models apart; the
    shipped model's is "". ``info`` goes into the JSON section as is.
    """

    name: str
    path: Path
    calibration: List[Path]
    cases: List[Tuple[str, Path, Optional[Path]]]
    reference: Callable[[Path], np.ndarray]
    folder: str = ""
    arch: Optional[str] = None
    arch_args: Optional[Dict] = None
    info: Dict = field(default_factory=dict)


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


class _NullRuntime:
    """Returns zeros of the right shape at once: what is left is the sliding window's own cost."""

    name = "none"
    precision = "none"

    def __init__(self, out_channels: int):
        self.out_channels = out_channels

    def predict(self, batch):
        return np.zeros((batch.shape[0], self.out_channels, *batch.shape[2:]), dtype=np.float32)


def _peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (10^6 bytes).

    On Linux ``getrusage``'s ``ru_maxrss`` survives ``execve``: a worker
    spawned by a large parent starts at the parent's peak (measured here:
    a 30 MB child reported the 530 MB of its parent). ``VmHWM`` in
    /proc/self/status is the peak of this process's own memory map.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    from SlicerPTQLib.metrics import peak_rss_mb

    return peak_rss_mb()


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
        # What the first segmentation would otherwise import lazily (MONAI's sliding window).
        importlib.import_module("monai.inferers")

        from SlicerPTQLib.inference import segment_volume, sliding_window
        from SlicerPTQLib.spec import ModelSpec
        from SlicerPTQLib.volumes import read_volume

        rss_imports = _peak_rss_mb()
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
                sliding_window(timed, image, argument["roi"], overlap=argument["overlap"], mode=PROFILE_MODE)
                total = time.perf_counter() - begin
                conn.send(("ok", {"total_s": total, "forward_s": timed.predict_s, "windows": timed.calls}))
            elif command == "layers":
                conn.send(("ok", runtime.layer_precisions()))
            elif command == "memory":
                conn.send(("ok", {"peak_rss_mb": _peak_rss_mb(), "rss_imports_mb": rss_imports}))
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


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _size_mb(*paths: Path) -> float:
    return sum(Path(p).stat().st_size for p in paths if Path(p).is_file()) / 2**20


def _lowbit_reason() -> str:
    try:
        importlib.import_module("SlicerPTQLib.lowbit")
    except ImportError as exc:
        return f"SlicerPTQLib.lowbit is not importable ({exc})"
    return ""


def build_variants(model: Path, calibration: Sequence[Path], out: Path, methods: Sequence[str], num_crops: int,
                   lowbit: bool, nncf: bool = True, nncf_same_float: bool = True, norm_inputs: bool = True,
                   seed: int = 0, arch: Optional[str] = None, arch_args: Optional[Dict] = None):
    """Quantize with SlicerPTQ (each method, low-bit) and NNCF; returns (variants, spec path, skipped).

    With ``arch``, ``model`` is a state dict of that architecture built with ``arch_args``.
    """
    from SlicerPTQLib.calibration import sample_crops
    from SlicerPTQLib.pipeline import prepared_arrays, quantize

    skipped: List[Dict] = []
    ours: List[Variant] = []
    first = None
    for method in methods:
        _log(f"SlicerPTQ INT8 quantization, method {method}, {num_crops} crops")
        start = time.perf_counter()
        result = quantize(model, calibration, out / f"slicerptq_int8_{method}", method=method,
                          num_crops=num_crops, seed=seed, arch=arch, arch_args=arch_args)
        seconds = time.perf_counter() - start
        first = first or result
        ours.append(Variant(f"slicerptq_int8_{method}", f"SlicerPTQ INT8 ({method})", "openvino",
                            str(result.quantized_onnx), size_mb=_size_mb(result.quantized_onnx), quantize_s=seconds,
                            note="includes the FP32 ONNX export"))
    fp32_onnx = first.fp32_onnx
    variants = [
        Variant("torch_fp32", "PyTorch eager FP32", "torch", str(model), "fp32", _size_mb(model),
                extra={"arch": arch, "arch_args": arch_args} if arch else {}),
        Variant("onnxruntime_fp32", "ONNX Runtime FP32", "onnxruntime", str(fp32_onnx), "fp32",
                _size_mb(fp32_onnx)),
        Variant("openvino_fp32", "OpenVINO FP32", "openvino", str(fp32_onnx), "fp32", _size_mb(fp32_onnx)),
        Variant("openvino_bf16", "OpenVINO BF16", "openvino", str(fp32_onnx), "bf16", _size_mb(fp32_onnx)),
    ]
    crops = None
    if nncf or nncf_same_float or norm_inputs:
        # Exactly the crops quantize() calibrated on: same volumes, roi, count and seed.
        crops = sample_crops(prepared_arrays(calibration, first.spec), first.spec.roi_size, num_crops, seed)
    if nncf:
        variants.append(_nncf_variant(fp32_onnx, crops, out))
    same_float = float_compute_nodes(Path(ours[0].path)) if nncf_same_float else []
    if same_float:
        # NNCF told to keep float exactly the layers SlicerPTQ kept float: the same
        # choice, so the remaining gap is placement and kernels.
        variants.append(_nncf_variant(fp32_onnx, crops, out, same_float))
    variants += ours
    if norm_inputs:
        variant, reason = _norm_inputs_variant(fp32_onnx, crops, out)
        if variant:
            variants.append(variant)
        else:
            skipped.append({"label": "SlicerPTQ INT8 (max, + Q/DQ on norm inputs)", "reason": reason})
    reason = _lowbit_reason() if lowbit else "not asked for"
    if reason:
        skipped.append({"label": "SlicerPTQ W4A8 (low-bit weights)", "reason": reason})
    else:
        _log("SlicerPTQ low-bit quantization, 4-bit weights")
        try:
            start = time.perf_counter()
            result = quantize(model, calibration, out / "slicerptq_w4a8", method=DEFAULT_METHOD,
                              num_crops=num_crops, seed=seed, weight_bits=4, arch=arch, arch_args=arch_args)
            seconds = time.perf_counter() - start
            packed = f"; packed 4-bit weights {_size_mb(result.packed_weights):.2f} MB" if result.packed_weights else ""
            variants.append(Variant("slicerptq_w4a8", "SlicerPTQ W4A8 (ADMM)", "openvino",
                                    str(result.quantized_onnx), size_mb=_size_mb(result.quantized_onnx),
                                    quantize_s=seconds, note="4-bit weight grid stored as int8 initializers" + packed))
        except Exception as exc:  # a failing optional variant must not sink the whole benchmark
            skipped.append({"label": "SlicerPTQ W4A8 (low-bit weights)", "reason": f"{type(exc).__name__}: {exc}"})
    return variants, first.quantized_onnx.with_name("model.json"), skipped


def _nncf_variant(fp32_onnx: Path, crops, out: Path, ignored: Sequence[str] = ()) -> Variant:
    from SlicerPTQLib.nncf_baseline import quantize_with_nncf

    key = "nncf_int8_same_float" if ignored else "nncf_int8"
    _log(f"NNCF INT8 quantization on the same {len(crops)} crops" + (f", ignoring {list(ignored)}" if ignored else ""))
    result = quantize_with_nncf(fp32_onnx, crops, out / key / "model.int8.xml", ignored_names=ignored)
    note = f"preset {result.preset}, target CPU, {result.num_crops} crops; from the FP32 ONNX (export not counted)"
    if ignored:
        return Variant(key, "NNCF INT8, SlicerPTQ's float layers ignored", "openvino", str(result.xml),
                       size_mb=result.size_mb, quantize_s=result.seconds,
                       note=f"{note}; IgnoredScope {list(ignored)}")
    return Variant(key, "NNCF INT8 (OpenVINO)", "openvino", str(result.xml), size_mb=result.size_mb,
                   quantize_s=result.seconds, note=note)


COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})


def float_compute_nodes(quantized_onnx: Path) -> List[str]:
    """Names of the compute nodes a Q/DQ ONNX file leaves in float.

    A node runs in float when its activation or its weight does not come
    out of a DequantizeLinear (e.g. a one-channel stem that reads the image).
    """
    import onnx

    graph = onnx.load(str(quantized_onnx), load_external_data=False).graph
    producers = {output: node for node in graph.node for output in node.output}
    names = []
    for node in graph.node:
        if node.op_type in COMPUTE_OPS and len(node.input) > 1:
            sources = [producers.get(name) for name in node.input[:2]]
            if any(source is None or source.op_type != "DequantizeLinear" for source in sources):
                names.append(node.name)
    return names


NORMS = frozenset({"InstanceNormalization", "BatchNormalization", "GroupNormalization"})
NORM_PLACEMENT = "cpu+norm-inputs"


def _norm_inputs_variant(fp32_onnx: Path, crops, out: Path):
    """An ablation: the "cpu" placement plus Q/DQ on the inputs of norm layers (what NNCF does).

    Then OpenVINO fuses the quantize into the preceding convolution (int8
    output instead of f32) and runs InstanceNorm (MVN) in int8. Returns
    (variant, "") or (None, why not).
    """
    import dataclasses

    from SlicerPTQLib import qdq

    base = qdq.PLACEMENTS["cpu"]
    if NORMS <= base.input_ops:
        return None, "the 'cpu' placement already quantizes norm inputs"
    # Registered in this process only, to measure the proposal beside the shipped placement.
    qdq.PLACEMENTS.setdefault(NORM_PLACEMENT, dataclasses.replace(base, name=NORM_PLACEMENT,
                                                                    input_ops=base.input_ops | NORMS))
    _log("ablation: 'cpu' placement + Q/DQ on norm inputs (max)")
    path = out / "slicerptq_int8_norm_inputs" / "model.int8.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    qdq.quantize_onnx(fp32_onnx, path, crops, method=DEFAULT_METHOD, placement=NORM_PLACEMENT)
    seconds = time.perf_counter() - start
    return Variant("slicerptq_int8_norm_inputs", "SlicerPTQ INT8 (max, + Q/DQ on norm inputs)", "openvino",
                   str(path), size_mb=_size_mb(path), quantize_s=seconds,
                   note="ablation, not the shipped placement; FP32 export not counted"), ""


def brain_mask(path: Path) -> np.ndarray:
    """The shipped model's reference: a brain mask, or a brain-extracted image, as 0/1 labels."""
    from SlicerPTQLib.shipped import reference_mask

    return reference_mask(path).array


def tissue_labels(path: Path) -> np.ndarray:
    """The registry models' reference: the ITK T1's k-means classes 1..6 as labels 0..5.

    Mapped as the training maps them (``train_small_models.tissue_classes``),
    but on the volume's own grid, where the benchmark compares label maps.
    """
    from SlicerPTQLib.volumes import read_volume

    return _sibling_scripts()[1].tissue_classes(read_volume(path).array).astype(np.uint8)


def _middle_slices(array: np.ndarray) -> List[np.ndarray]:
    return [np.take(array, array.shape[axis] // 2, axis=axis) for axis in range(3)]


def save_slices(path: Path, image: np.ndarray, fp32: np.ndarray, int8: np.ndarray, fp32_label: str,
                int8_label: str) -> None:
    """Three orthogonal middle slices of image / FP32 labels / INT8 labels, for the report."""
    arrays = {"fp32_label": np.array(fp32_label), "int8_label": np.array(int8_label)}
    for name, volume in (("image", image.astype(np.float32)), ("fp32", fp32.astype(np.uint8)),
                         ("int8", int8.astype(np.uint8))):
        for axis, plane in enumerate(_middle_slices(volume)):
            arrays[f"{name}_{axis}"] = plane
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q))


def measure(variants: List[Variant], spec_path: Path, cases, out: Path, threads: int, repeats: int,
            warmup: int, volume_repeats: int, profile: bool, seed: int = 0,
            reference: Optional[Callable[[Path], np.ndarray]] = None, slices: Path = Path("slices")) -> Dict:
    """Start one worker per variant and run the interleaved measurements.

    ``reference`` reads the cases' reference files (default: brain masks);
    slice files go to ``out/<slices>``.
    """
    from SlicerPTQLib.preprocess import prepare
    from SlicerPTQLib.spec import ModelSpec
    from SlicerPTQLib.volumes import read_volume

    spec = ModelSpec.load(spec_path)
    context = mp.get_context("spawn")
    _log(f"starting {len(variants)} workers ({threads} threads each)")
    workers = [Worker(context, variant, spec_path, threads) for variant in variants]
    for worker in workers:
        worker.wait_ready()
        if worker.error:
            _log(f"{worker.variant.label} failed to load: {worker.error.splitlines()[0]}")
    rng = random.Random(seed)
    try:
        # The same real patch for everyone: the first evaluation volume, preprocessed.
        first_image = read_volume(Path(cases[0][1]))
        patch = _fit_patch(prepare(first_image, spec)[0], spec.roi_size)[None]
        patch_file = out / "patch.npy"
        np.save(patch_file, patch)
        times = patch_latency(workers, patch_file, warmup, repeats, rng)
        cold, volume_rows = whole_volumes(workers, cases, spec, out, volume_repeats, rng, reference or brain_mask,
                                          slices)
        layers, memory = {}, {}
        for worker in workers:
            if worker.variant.backend == "openvino":
                layers[worker.variant.key] = worker.ask("layers") or []
            # Before the profile, whose larger image would raise some workers' peaks.
            memory[worker.variant.key] = worker.ask("memory")
        profile_result = sliding_window_profile(workers, first_image, spec, out) if profile else None
        errors = {w.variant.key: w.error for w in workers if w.error}
        infos = {w.variant.key: w.info for w in workers}
    finally:
        for worker in workers:
            worker.close()
    return {"times": times, "volumes": volume_rows, "layers": {k: v for k, v in layers.items() if v},
            "memory": memory, "errors": errors, "infos": infos, "cold": cold, "profile": profile_result,
            "patch_shape": list(patch.shape)}


def patch_latency(workers: List[Worker], patch_file: Path, warmup: int, repeats: int,
                  rng: random.Random) -> Dict[str, Dict[str, List[float]]]:
    """Wall and CPU seconds per forward of the same patch, every worker once per round in a shuffled order."""
    for worker in workers:
        worker.ask("patch", str(patch_file))
    _log(f"per-patch latency: {warmup} warm-up + {repeats} interleaved rounds")
    times: Dict[str, Dict[str, List[float]]] = {w.variant.key: {"wall": [], "cpu": []} for w in workers}
    for _ in range(warmup):
        for worker in workers:
            worker.ask("forward")
    for _ in range(repeats):
        order = list(workers)
        rng.shuffle(order)
        for worker in order:
            answer = worker.ask("forward")
            if answer is not None:
                times[worker.variant.key]["wall"].append(answer[0])
                times[worker.variant.key]["cpu"].append(answer[1])
    return times


def whole_volumes(workers: List[Worker], cases, spec, out: Path, volume_repeats: int, rng: random.Random,
                  reference: Callable[[Path], np.ndarray], slices_dir: Path = Path("slices")):
    """Segment every volume with every worker (interleaved rounds); returns (cold times, per-volume rows).

    Each row holds per variant the median stage timings, Dice (mean over
    the spec's labels) vs the reference labels (None for a case without
    any) and vs PyTorch FP32; slices of image / FP32 / INT8 labels go to
    ``out/<slices_dir>/<volume>.npz``.
    """
    from SlicerPTQLib.metrics import mean_dice
    from SlicerPTQLib.volumes import read_volume

    _log("whole volumes: one untimed warm-up segmentation per backend")
    cold = {}
    for worker in workers:
        answer = worker.ask("volume", str(cases[0][1]))
        if answer is not None:
            cold[worker.variant.key] = answer[1]["total_s"]
    _log(f"whole volumes: {len(cases)} volume(s) x {volume_repeats} interleaved round(s)")
    labels = sorted(spec.labels)
    rows = []
    for name, image_path, mask_path in cases:
        truth = reference(Path(mask_path)) if mask_path else None
        runs: Dict[str, List[Dict]] = {}
        label_maps: Dict[str, np.ndarray] = {}
        for _ in range(volume_repeats):
            order = list(workers)
            rng.shuffle(order)
            for worker in order:
                answer = worker.ask("volume", str(image_path))
                if answer is not None:
                    label_maps[worker.variant.key] = answer[0]
                    runs.setdefault(worker.variant.key, []).append(answer[1])
        baseline = label_maps.get("torch_fp32")
        results = {}
        for key, timings in runs.items():
            median = {stage: float(np.median([run[stage] for run in timings])) for stage in timings[0]}
            results[key] = {"timings": median, "total_s": median["total_s"],
                            "fastest_total_s": float(min(run["total_s"] for run in timings)),
                            "dice_vs_reference": (mean_dice(label_maps[key], truth, labels)
                                                  if truth is not None else None),
                            "dice_vs_fp32": (mean_dice(label_maps[key], baseline, labels)
                                             if baseline is not None else None)}
        shape = truth.shape if truth is not None else next((m.shape for m in label_maps.values()), None)
        row = {"volume": name, "shape": list(shape) if shape else None, "results": results}
        int8_key = f"slicerptq_int8_{DEFAULT_METHOD}"
        if baseline is not None and int8_key in label_maps:
            slices = slices_dir / f"{name}.npz"
            save_slices(out / slices, read_volume(Path(image_path)).array, baseline, label_maps[int8_key],
                        "PyTorch FP32", f"SlicerPTQ INT8 ({DEFAULT_METHOD})")
            row["slices"] = slices.as_posix()
        rows.append(row)
    return cold, rows


def _fit_patch(image: np.ndarray, roi: Sequence[int]) -> np.ndarray:
    """A (C, *roi) patch from a (C, D, H, W) image: centre crop, zero-padded where the image is smaller."""
    patch = np.zeros((image.shape[0], *roi), dtype=np.float32)
    source, target = [slice(None)], [slice(None)]
    for size, length in zip(image.shape[1:], roi):
        start = max((size - length) // 2, 0)
        width = min(size, length)
        source.append(slice(start, start + width))
        target.append(slice(0, width))
    patch[tuple(target)] = image[tuple(source)]
    return patch


def sliding_window_profile(workers: List[Worker], volume, spec, out: Path) -> Dict:
    """Where whole-volume time goes when there are many windows.

    The first evaluation volume is reoriented and intensity-normalised like
    the model's input but kept at its native size (rounded up to the
    model's spatial multiple), then run through the sliding window (roi =
    the model's, overlap 0.5, gaussian blending) by PyTorch FP32, NNCF INT8
    and SlicerPTQ INT8; a runtime that returns zeros at once gives the
    blending/stitching cost alone.
    """
    import nibabel as nib

    from SlicerPTQLib.inference import sliding_window, window_count
    from SlicerPTQLib.preprocess import normalize_intensity, plan_grid

    _log("sliding-window profile")
    grid = plan_grid(volume, spec)
    transform = nib.orientations.ornt_transform(grid.start_ornt, grid.target_ornt)
    native = nib.orientations.apply_orientation(np.asarray(volume.array, dtype=np.float32), transform)
    multiple = spec.spatial_multiple
    shape = [int(np.ceil(size / multiple) * multiple) for size in native.shape]
    image = np.zeros([1] + shape, dtype=np.float32)
    image[(0,) + tuple(slice(0, s) for s in native.shape)] = normalize_intensity(native, spec.intensity)
    image_file = out / "profile_image.npy"
    np.save(image_file, image)

    rows = {}
    for worker in workers:
        if worker.variant.key in ("torch_fp32", f"slicerptq_int8_{DEFAULT_METHOD}", "nncf_int8"):
            answer = worker.ask("sliding_window", {"image": str(image_file), "roi": list(spec.roi_size),
                                                   "overlap": PROFILE_OVERLAP})
            if answer:
                answer["blend_s"] = max(answer["total_s"] - answer["forward_s"], 0.0)
                answer["stitch_share"] = answer["blend_s"] / answer["total_s"] if answer["total_s"] else None
                rows[worker.variant.key] = answer
    null_runs = []
    for _ in range(3):  # the first call also pays MONAI's import in this process
        start = time.perf_counter()
        sliding_window(_NullRuntime(spec.out_channels), image, spec.roi_size, overlap=PROFILE_OVERLAP,
                       mode=PROFILE_MODE)
        null_runs.append(time.perf_counter() - start)
    stitching_only = min(null_runs[1:])
    image_file.unlink()
    return {"image_shape": shape, "roi": list(spec.roi_size), "overlap": PROFILE_OVERLAP, "mode": PROFILE_MODE,
            "windows": window_count(shape, spec.roi_size, PROFILE_OVERLAP), "stitching_only_s": stitching_only,
            "runs": rows}


def summarise(model_name: str, variants: List[Variant], measured: Dict, skipped: List[Dict], calibration,
              threads: int) -> Dict:
    """One model's section of the benchmark JSON, with the headline ratios."""
    torch_median = None
    rows = []
    for variant in variants:
        measured_times = measured["times"].get(variant.key) or {"wall": [], "cpu": []}
        times = measured_times["wall"]
        row = {"key": variant.key, "label": variant.label, "backend": variant.backend, "file": variant.path,
               "precision": (measured["infos"].get(variant.key) or {}).get("precision", variant.precision),
               "size_mb": variant.size_mb, "quantize_s": variant.quantize_s, "note": variant.note}
        if times:
            row.update({"patch_median_s": float(np.median(times)), "patch_p90_s": _pct(times, 90),
                        "patch_min_s": float(np.min(times)), "patch_times_s": times,
                        "patch_cpu_median_s": float(np.median(measured_times["cpu"]))})
        memory = measured["memory"].get(variant.key)
        if memory:
            row["peak_rss_mb"] = memory["peak_rss_mb"]
            row["rss_after_imports_mb"] = memory["rss_imports_mb"]
        results = [vol["results"][variant.key] for vol in measured["volumes"] if variant.key in vol["results"]]
        if results:
            row["volume_mean_s"] = float(np.mean([r["total_s"] for r in results]))
            row["volume_fastest_mean_s"] = float(np.mean([r["fastest_total_s"] for r in results]))
            references = [r["dice_vs_reference"] for r in results if r["dice_vs_reference"] is not None]
            if references:
                row["dice_vs_reference_mean"] = float(np.mean(references))
            if all(r["dice_vs_fp32"] is not None for r in results):
                row["dice_vs_fp32_mean"] = float(np.mean([r["dice_vs_fp32"] for r in results]))
        layers = measured["layers"].get(variant.key)
        if layers:
            convs = [layer for layer in layers if layer["type"] in ("Convolution", "Deconvolution")]
            row["int8_layers"] = {"conv_int8": sum(1 for layer in convs if layer["precision"] in ("int8", "uint8")),
                                  "conv_total": len(convs),
                                  "all_int8": sum(1 for layer in layers if layer["precision"] in ("int8", "uint8")),
                                  "all_total": len(layers)}
        if variant.key in measured["cold"]:
            row["first_volume_s"] = measured["cold"][variant.key]
        if variant.key in measured["errors"]:
            row["error"] = measured["errors"][variant.key]
        if variant.key == "torch_fp32":
            torch_median = row.get("patch_median_s")
        rows.append(row)
    for row in rows:
        if torch_median and row.get("patch_median_s"):
            row["speedup_vs_torch"] = torch_median / row["patch_median_s"]
    summary, findings = headline(rows, measured.get("profile"))
    findings += stage_findings(rows, measured["volumes"])
    return {"name": model_name, "patch_shape": measured["patch_shape"], "threads": threads,
            "calibration": [Path(p).name for p in calibration], "variants": rows, "skipped": skipped,
            "volumes": measured["volumes"], "layer_precisions": measured["layers"],
            "profile": measured.get("profile"), "summary": summary, "findings": findings}


def headline(rows: List[Dict], profile: Optional[Dict]):
    """The acceptance ratios, computed from this run's numbers, and sentences stating them."""
    by_key = {row["key"]: row for row in rows}
    summary: Dict = {}
    findings: List[str] = []
    nncf = by_key.get("nncf_int8", {})
    torch_row = by_key.get("torch_fp32", {})
    ours = [row for row in rows if row["key"].startswith("slicerptq_int8") and row.get("patch_median_s")]
    for row in ours:
        method = row["key"][len("slicerptq_int8_"):]
        entry = {}
        if nncf.get("patch_median_s"):
            entry["patch_speed_vs_nncf"] = nncf["patch_median_s"] / row["patch_median_s"]
            # The fastest round is the least disturbed by other processes on a shared machine.
            entry["patch_speed_vs_nncf_min"] = nncf["patch_min_s"] / row["patch_min_s"]
            entry["patch_cpu_vs_nncf"] = nncf["patch_cpu_median_s"] / row["patch_cpu_median_s"]
        if nncf.get("dice_vs_reference_mean") is not None and row.get("dice_vs_reference_mean") is not None:
            entry["dice_minus_nncf"] = row["dice_vs_reference_mean"] - nncf["dice_vs_reference_mean"]
        if torch_row.get("volume_mean_s") and row.get("volume_mean_s"):
            entry["volume_speedup_vs_torch"] = torch_row["volume_mean_s"] / row["volume_mean_s"]
            entry["volume_speedup_vs_torch_fastest"] = (torch_row["volume_fastest_mean_s"]
                                                        / row["volume_fastest_mean_s"])
        if torch_row.get("patch_median_s"):
            entry["patch_speedup_vs_torch"] = torch_row["patch_median_s"] / row["patch_median_s"]
        same_float = by_key.get("nncf_int8_same_float", {})
        if same_float.get("patch_median_s"):
            entry["patch_speed_vs_nncf_same_float"] = same_float["patch_median_s"] / row["patch_median_s"]
            entry["patch_cpu_vs_nncf_same_float"] = same_float["patch_cpu_median_s"] / row["patch_cpu_median_s"]
        summary[method] = entry
    for method, entry in summary.items():
        parts = []
        if "patch_speed_vs_nncf" in entry:
            parts.append(f"per patch {entry['patch_speed_vs_nncf']:.2f}x NNCF's speed by median, "
                         f"{entry['patch_speed_vs_nncf_min']:.2f}x by fastest round, "
                         f"{entry['patch_cpu_vs_nncf']:.2f}x by CPU time "
                         f"({'meets' if entry['patch_speed_vs_nncf'] >= 1.0 else 'misses'} >= 1.0)")
        if "dice_minus_nncf" in entry:
            parts.append(f"Dice vs reference {entry['dice_minus_nncf']:+.4f} vs NNCF")
        if "patch_speed_vs_nncf_same_float" in entry:
            parts.append(f"vs NNCF keeping the same layers float {entry['patch_speed_vs_nncf_same_float']:.2f}x "
                         f"by median, {entry['patch_cpu_vs_nncf_same_float']:.2f}x by CPU time")
        if "volume_speedup_vs_torch" in entry:
            parts.append(f"whole volume {entry['volume_speedup_vs_torch']:.2f}x faster than PyTorch FP32 by "
                         f"median, {entry['volume_speedup_vs_torch_fastest']:.2f}x by fastest round "
                         f"({'meets' if entry['volume_speedup_vs_torch'] >= 3.0 else 'misses'} >= 3x)")
        label = by_key[f"slicerptq_int8_{method}"]["label"]
        findings.append(f"{label}: " + "; ".join(parts) + ".")
    if profile and profile.get("runs"):
        runs = profile["runs"]
        ours_key = f"slicerptq_int8_{DEFAULT_METHOD}"
        if "torch_fp32" in runs and ours_key in runs:
            summary["sliding_window_speedup_vs_torch"] = runs["torch_fp32"]["total_s"] / runs[ours_key]["total_s"]
            findings.append(f"Sliding window of {profile['windows']} windows: SlicerPTQ INT8 ({DEFAULT_METHOD}) "
                            f"{summary['sliding_window_speedup_vs_torch']:.2f}x faster than PyTorch FP32 with "
                            "the same windows and blending.")
        findings.append(f"Blending/stitching alone (a runtime returning zeros): {profile['stitching_only_s']:.2f} s "
                        f"for {profile['windows']} windows.")
        for key, run in runs.items():
            findings.append(f"Sliding window {profile['image_shape']} ({run['windows']} windows of "
                            f"{profile['roi']}, overlap {profile['overlap']}) with {key}: {run['total_s']:.2f} s, "
                            f"of which network {run['forward_s']:.2f} s and blending/stitching "
                            f"{run['blend_s']:.2f} s ({100 * (run['stitch_share'] or 0):.0f}%).")
    return summary, findings


def stage_findings(rows: List[Dict], volumes: List[Dict]) -> List[str]:
    """Where the whole-volume time of PyTorch FP32 and SlicerPTQ INT8 goes, mean over volumes."""
    findings = []
    for key in ("torch_fp32", f"slicerptq_int8_{DEFAULT_METHOD}"):
        runs = [vol["results"][key]["timings"] for vol in volumes if key in vol["results"]]
        if not runs:
            continue
        mean = {stage: float(np.mean([run[stage] for run in runs])) for stage in runs[0]}
        outside = mean["preprocess_s"] + mean["restore_s"] + mean.get("blend_s", 0.0)
        label = next(row["label"] for row in rows if row["key"] == key)
        findings.append(f"Whole volume, {label}: {mean['total_s']:.3f} s = preprocess {mean['preprocess_s']:.3f} + "
                        f"network {mean.get('forward_s', mean['network_s']):.3f} + windows/blending "
                        f"{mean.get('blend_s', 0.0):.3f} + labels/resample back {mean['restore_s']:.3f}; "
                        f"{100 * outside / mean['total_s']:.0f}% is outside the network.")
    return findings


def markdown(benchmark: Dict) -> str:
    """The benchmark as markdown tables (one per model, plus Dice per volume)."""
    from SlicerPTQLib.evaluation import format_table

    cpu = benchmark["cpu"]
    lines = [f"CPU: {cpu.get('model')}; INT8 path: {cpu.get('int8_path')} ({' '.join(cpu.get('isa', []))}); "
             f"{benchmark['threads']} threads per backend; load average at the end "
             f"{', '.join(f'{v:.1f}' for v in benchmark.get('load_average_at_end') or [])}; "
             f"command: `{benchmark['command']}`", ""]
    for model in benchmark["models"]:
        lines.append(f"### {model['name']} (patch {model['patch_shape']})")
        lines.append("")
        table = []
        for row in model["variants"]:
            layers = row.get("int8_layers")
            table.append({
                "backend": row["label"],
                "patch median s": row.get("patch_median_s"), "patch p90 s": row.get("patch_p90_s"),
                "patch min s": row.get("patch_min_s"), "patch CPU s": row.get("patch_cpu_median_s"),
                "x PyTorch": _fixed(row.get("speedup_vs_torch"), 2),
                "volume s": _fixed(row.get("volume_mean_s"), 3),
                "volume fastest s": _fixed(row.get("volume_fastest_mean_s"), 3),
                "file MB": _fixed(row.get("size_mb"), 2),
                "peak RSS MB": _fixed(row.get("peak_rss_mb"), 0), "quantize s": _fixed(row.get("quantize_s"), 1),
                "Dice ref": row.get("dice_vs_reference_mean"), "Dice vs FP32": row.get("dice_vs_fp32_mean"),
                "INT8 conv": f"{layers['conv_int8']}/{layers['conv_total']}" if layers else "",
            })
        lines.append(format_table(table))
        lines.append("")
        per_volume = []
        for volume in model["volumes"]:
            if all(result["dice_vs_reference"] is None for result in volume["results"].values()):
                continue  # no reference labels for this volume: Dice vs FP32 only
            entry = {"volume": volume["volume"]}
            for row in model["variants"]:
                result = volume["results"].get(row["key"])
                entry[row["label"]] = result["dice_vs_reference"] if result else None
            per_volume.append(entry)
        if per_volume:
            lines.append("Dice vs reference per volume")
            lines.append("")
            lines.append(format_table(per_volume))
            lines.append("")
        for skipped in model.get("skipped", []):
            lines.append(f"- not run: {skipped['label']}: {skipped['reason']}")
        for finding in model.get("findings", []):
            lines.append(f"- {finding}")
        lines.append("")
    for skipped in benchmark.get("skipped_models", []):
        lines.append(f"- model not run: {skipped['name']}: {skipped['reason']}")
    return "\n".join(lines)


def _fixed(value, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def default_crops(spec, calibration: Sequence[Path]) -> int:
    """Calibration crops: one per volume when the patch is the whole resized volume, else 20.

    With ``resize == roi_size`` every crop of a volume is the volume itself,
    so 20 crops from 4 volumes are 5 copies of each and give the same
    ranges as 4 (max) or the same histograms up to scale (percentile,
    entropy, mse) at a fifth of the cost.
    """
    if spec.resize is not None and tuple(spec.resize) == tuple(spec.roi_size):
        return len(calibration)
    return 20


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from SlicerPTQLib import architectures
    from SlicerPTQLib.errors import PTQError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<UTC time>)")
    parser.add_argument("--models", nargs="+", default=[SHIPPED], metavar="NAME",
                        help="models, one section each: 'shipped' (deepbet, the default) and/or registry "
                             "architectures (e.g. UNet SegResNet) whose small 6-class version "
                             "train_small_models.py trained; a name without cached weights is skipped")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and crops (about 4 minutes)")
    parser.add_argument("--threads", type=int, default=2, help="threads per backend (default 2)")
    parser.add_argument("--repeats", type=int, help="interleaved timed patch rounds (default 15, quick 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forwards per backend first")
    parser.add_argument("--volume-repeats", type=int, help="whole-volume rounds per volume (default 3, quick 1)")
    parser.add_argument("--num-crops", type=int,
                        help="calibration crops (default: one per calibration volume when the model takes the "
                             "whole volume resized to its patch, as deepbet does, since more crops would only "
                             "repeat them; else 20)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="SlicerPTQ calibration methods (default all)")
    parser.add_argument("--max-volumes", type=int, help="use only the first N evaluation volumes")
    parser.add_argument("--no-lowbit", action="store_true", help="skip the low-bit (4-bit weight) variant")
    parser.add_argument("--no-profile", action="store_true", help="skip the many-window sliding-window profile")
    parser.add_argument("--no-report", action="store_true", help="do not render the HTML report")
    parser.add_argument("--no-ablation", action="store_true",
                        help="skip the Q/DQ-on-norm-inputs placement ablation")
    parser.add_argument("--only", nargs="+", metavar="KEY",
                        help="measure only these variants (keys: torch_fp32 onnxruntime_fp32 openvino_fp32 "
                             "openvino_bf16 nncf_int8 nncf_int8_same_float slicerptq_int8_<method> "
                             "slicerptq_int8_norm_inputs slicerptq_w4a8)")
    args = parser.parse_args(argv)
    for name in args.models:
        if name != SHIPPED:
            try:
                architectures.get(name)
            except PTQError as exc:
                parser.error(f"--models: {exc}")
    args.repeats = args.repeats or (5 if args.quick else 15)
    args.volume_repeats = args.volume_repeats or (1 if args.quick else 3)
    args.methods = args.methods or list(METHODS)
    if DEFAULT_METHOD not in args.methods:
        args.methods = [DEFAULT_METHOD] + args.methods
    return args


def _sibling_scripts():
    """``bench_architectures`` and ``train_small_models`` from this folder, imported when first needed."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    import bench_architectures
    import train_small_models

    return bench_architectures, train_small_models


def shipped_subject(max_volumes: Optional[int] = None) -> Subject:
    """deepbet's brain extraction on the shipped volumes, each with its reference brain mask."""
    from SlicerPTQLib import shipped

    return Subject("deepbet brain extraction (LinkNet3d, shipped)", shipped.shipped_model(),
                   shipped.calibration_volumes(), shipped.evaluation_volumes()[:max_volumes], brain_mask)


def write_arch_model(path: Path, module, spec) -> Path:
    """``module``'s state dict at ``path`` and ``spec`` beside it: what ``load_model(path, arch=...)`` reads."""
    import torch

    from SlicerPTQLib.spec import sidecar_path

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(module.state_dict(), path)
    spec.save(sidecar_path(path))
    return path


def registry_subject(name: str, out: Path, max_volumes: Optional[int] = None) -> Subject:
    """The small 6-class ``name`` trained by train_small_models.py, written to ``out/models/<name>/``.

    Raises PTQError when its trained weights are not in the cache.
    """
    from SlicerPTQLib import architectures, shipped
    from SlicerPTQLib.errors import PTQError
    from SlicerPTQLib.fetch import cache_dir, fetch
    from SlicerPTQLib.spec import ModelSpec

    bench_architectures, training = _sibling_scripts()
    entry = architectures.get(name)
    record = bench_architectures.cached_record(entry.name, None)
    if record is None:
        raise PTQError(f"no trained weights of {entry.name} in {cache_dir() / 'trained'}; train them with "
                       f"python benchmarks/train_small_models.py --arch {entry.name}")
    path = write_arch_model(out / "models" / entry.name / f"{entry.name}.pt", training.load_trained(record),
                            ModelSpec.from_dict(record["spec"]))
    images = {volume.name: volume.image for volume in shipped.CATALOG}
    references = {"itk_t1": training.LABELS}  # the labels it was trained on; Colin27 has none
    cases = [(volume, fetch(images[volume]), fetch(references[volume]) if volume in references else None)
             for volume in REGISTRY_EVALUATION]
    info = {"arch": entry.name, "arch_args": record["arch_args"],
            "weights": {key: record.get(key) for key in ("weights", "steps", "seconds", "train_mean_dice")},
            "reference": "itk_t1: its k-means labels (the training volume); colin27: none, Dice vs FP32 only"}
    return Subject(f"{entry.name} (small, 6 tissue classes, trained {record['steps']} steps)", path,
                   [fetch(images[volume]) for volume in REGISTRY_CALIBRATION], cases[:max_volumes], tissue_labels,
                   folder=entry.name, arch=entry.name, arch_args=record["arch_args"], info=info)


def bench_model(subject: Subject, args: argparse.Namespace, out: Path) -> Dict:
    """Quantize and measure one model; returns its section of the benchmark JSON."""
    from SlicerPTQLib.spec import ModelSpec, sidecar_path

    _log(f"model {subject.path.name}; calibration {[p.name for p in subject.calibration]}; "
         f"evaluation {[c[0] for c in subject.cases]}")
    num_crops = args.num_crops or default_crops(ModelSpec.load(sidecar_path(subject.path)), subject.calibration)
    wanted = set(args.only or [])
    lowbit = not args.no_lowbit and (not wanted or "slicerptq_w4a8" in wanted)
    ablation = not args.no_ablation and (not wanted or "slicerptq_int8_norm_inputs" in wanted)
    variants, spec_path, skipped = build_variants(
        subject.path, subject.calibration, out / "models" / subject.folder, args.methods, num_crops, lowbit,
        nncf=not wanted or "nncf_int8" in wanted,
        nncf_same_float=not wanted or "nncf_int8_same_float" in wanted,
        norm_inputs=ablation and subject.arch is None, arch=subject.arch, arch_args=subject.arch_args)
    if ablation and subject.arch is not None:
        skipped.append({"label": "SlicerPTQ INT8 (max, + Q/DQ on norm inputs)",
                        "reason": "placement ablation, run for the shipped model only"})
    if wanted:
        variants = [variant for variant in variants if variant.key in wanted]
    measured = measure(variants, spec_path, subject.cases, out, args.threads, args.repeats, args.warmup,
                       args.volume_repeats, not args.no_profile, reference=subject.reference,
                       slices=Path("slices") / subject.folder)
    section = summarise(subject.name, variants, measured, skipped, subject.calibration, args.threads)
    section["num_crops"] = num_crops
    section.update(subject.info)
    return section


def run(args: argparse.Namespace, command: str) -> Path:
    """Run the whole benchmark; returns the JSON path."""
    # Pinned before anything starts a thread pool; spawned workers inherit it.
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[variable] = str(args.threads)
    import torch

    from SlicerPTQLib.cpu_info import cpu_summary
    from SlicerPTQLib.errors import PTQError

    torch.set_num_threads(args.threads)
    out = args.out or RESULTS / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sections, skipped_models = [], []
    for name in args.models:
        if name == SHIPPED:
            sections.append(bench_model(shipped_subject(args.max_volumes), args, out))
            continue
        try:
            sections.append(bench_model(registry_subject(name, out, args.max_volumes), args, out))
        except Exception as exc:  # an untrained or failing registry model must not sink the others
            reason = str(exc) if isinstance(exc, PTQError) else f"{type(exc).__name__}: {exc}"
            _log(f"{name} not run: {reason}")
            if not isinstance(exc, PTQError):
                _log(traceback.format_exc(limit=4))
            skipped_models.append({"name": name, "reason": reason})
    benchmark = {
        "kind": "slicer-ptq-benchmark", "version": 1,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command, "cpu": cpu_summary(), "threads": args.threads,
        # Other processes share this machine: the load tells how noisy the timings are.
        "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "settings": {"quick": args.quick, "repeats": args.repeats, "warmup": args.warmup,
                     "volume_repeats": args.volume_repeats, "num_crops": args.num_crops,
                     "methods": args.methods, "versions": _versions()},
        "models": sections, "skipped_models": skipped_models,
    }
    benchmark["wall_s"] = time.perf_counter() - started
    json_path = out / "benchmark.json"
    _write_atomic(json_path, json.dumps(benchmark, indent=2, default=str))
    _write_atomic(out / "benchmark.md", markdown(benchmark))
    if not args.no_report:
        from SlicerPTQLib.report import build_report

        index = build_report(json_path, out / "report")
        _log(f"report: {index}")
    print(markdown(benchmark))
    _log(f"done in {time.perf_counter() - started:.0f} s: {json_path}")
    return json_path


def _versions() -> Dict[str, str]:
    versions = {}
    for name in ("torch", "onnxruntime", "openvino", "nncf", "monai"):
        try:
            versions[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            versions[name] = "missing"
    return versions


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/bench_backends.py " + " ".join(argv if argv is not None else sys.argv[1:])
    run(args, command.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
