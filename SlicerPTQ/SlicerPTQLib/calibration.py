"""Calibration: patches from unlabeled volumes and activation ranges.

``sample_crops`` turns a few preprocessed volumes into network-sized
patches (no labels needed: half the crops are centred on bright tissue
found by an Otsu threshold); ``collect_ranges`` runs the FP32 ONNX model on
them and lets one observer per tensor choose its INT8 clipping bound,
streaming the statistics with bounded memory (:class:`RangeCollector`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from . import onnx_graph
from .errors import PTQError
from .observers import MaxObserver, PercentileObserver, histogram_amax, make_observer
from .progress import ProgressCallback, track

# Foreground search looks at a strided subsample of at most this many voxels.
_FOREGROUND_SAMPLE_VOXELS = 1 << 20
#: Activations fetched in one forward for the histogram methods stay under this many bytes.
MEMORY_BUDGET = 1 << 30


def sample_crops(images: Sequence[np.ndarray], roi: Sequence[int], num_crops: int,
                 seed: int, foreground_fraction: float = 0.5) -> List[np.ndarray]:
    """Draw ``num_crops`` float32 patches ``(C, *roi)`` from ``images`` ``(C, D, H, W)``.

    Images are used round-robin. ``foreground_fraction`` of the crops are
    centred on a random voxel brighter than the image's Otsu threshold
    (channel mean), the rest are placed uniformly at random. Images
    smaller than ``roi`` are padded with their minimum. The same ``seed``
    gives the same crops. A patch already drawn (same image, same place:
    always so for an image no larger than ``roi``) is not repeated, so
    fewer than ``num_crops`` may come back.
    """
    if len(images) == 0:
        raise PTQError("No calibration volumes were given; pass --calib with one or more "
                       "unlabeled volumes of the kind the model segments.")
    roi = tuple(int(v) for v in roi)
    if len(roi) != 3 or min(roi) < 1:
        raise PTQError(f"The crop size must be 3 positive ints, got {roi}.")
    if num_crops < 1:
        raise PTQError(f"The number of calibration crops must be at least 1, got {num_crops}.")
    if not 0.0 <= foreground_fraction <= 1.0:
        raise PTQError(f"foreground_fraction must be in [0, 1], got {foreground_fraction}.")
    for index, image in enumerate(images):
        if np.ndim(image) != 4:
            raise PTQError(f"Calibration volume {index} has shape {np.shape(image)}; "
                           "expected (C, D, H, W) after preprocessing.")

    rng = np.random.default_rng(seed)
    centred = np.zeros(num_crops, dtype=bool)
    centred[:int(round(num_crops * foreground_fraction))] = True
    rng.shuffle(centred)

    padded: Dict[int, np.ndarray] = {}
    foreground: Dict[int, np.ndarray] = {}
    drawn = set()
    crops = []
    for k in range(num_crops):
        index = k % len(images)
        if index not in padded:
            padded[index] = _pad_to(np.asarray(images[index]), roi)
        image = padded[index]
        spatial = np.array(image.shape[1:])
        room = spatial - np.array(roi)
        start = None
        if centred[k]:
            if index not in foreground:
                foreground[index] = _foreground_voxels(image)
            voxels = foreground[index]
            if len(voxels):
                centre = voxels[rng.integers(len(voxels))]
                start = np.clip(centre - np.array(roi) // 2, 0, room)
        if start is None:
            start = np.array([rng.integers(r + 1) for r in room])
        if (index, tuple(int(s) for s in start)) in drawn:
            continue  # the same patch again adds nothing but time
        drawn.add((index, tuple(int(s) for s in start)))
        window = tuple(slice(int(s), int(s) + size) for s, size in zip(start, roi))
        crops.append(np.ascontiguousarray(image[(slice(None),) + window], dtype=np.float32))
    return crops


def _pad_to(image: np.ndarray, roi: Sequence[int]) -> np.ndarray:
    """Pad (C, D, H, W) evenly on both sides to at least ``roi``, with its minimum."""
    short = [max(0, size - dim) for size, dim in zip(roi, image.shape[1:])]
    if not any(short):
        return image
    pads = [(0, 0)] + [(s // 2, s - s // 2) for s in short]
    return np.pad(image, pads, mode="constant", constant_values=float(np.min(image)))


def _foreground_voxels(image: np.ndarray) -> np.ndarray:
    """(N, 3) voxel indices above the Otsu threshold, on a strided subsample."""
    intensity = image.mean(axis=0) if image.shape[0] > 1 else image[0]
    stride = max(1, int(np.ceil((intensity.size / _FOREGROUND_SAMPLE_VOXELS) ** (1 / 3))))
    sample = intensity[::stride, ::stride, ::stride]
    threshold = otsu_threshold(sample)
    return np.argwhere(sample > threshold) * stride


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """The intensity that best splits ``values`` into two classes (Otsu)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0 or values.min() == values.max():
        return float(values.min()) if values.size else 0.0
    counts, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(counts * centres)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def collect_ranges(fp32_onnx: Path, tensor_names: Sequence[str], crops: Sequence[np.ndarray],
                   method: str = "max",
                   progress_callback: Optional[ProgressCallback] = None,
                   memory_budget: int = MEMORY_BUDGET) -> Dict[str, float]:
    """Clipping bound ``amax`` of each named float tensor of the FP32 model.

    Runs ``fp32_onnx`` in ONNX Runtime (CPU) on every crop ``(C, D, H, W)``
    (batch of one) and lets the ``method`` observer of each tensor choose
    its bound; statistics stream with bounded memory (:class:`RangeCollector`).
    """
    collector = RangeCollector(fp32_onnx, tensor_names, [method], memory_budget)
    collector.feed(crops, progress_callback)
    return collector.ranges(method)


class RangeCollector:
    """Calibration statistics of many tensors, streamed with bounded memory.

    Fetching every activation of a crop at once held them all in memory
    (9 GB for a 192^3 network). Instead ``max |x|`` of every tensor comes
    from reductions added to the graph (three scalars per tensor, one
    forward per crop, run by OpenVINO in f32 where installed); the histogram methods (percentile, entropy, mse)
    fetch the tensors in groups whose float32 size, from shape inference
    at the crop's shape, stays under ``memory_budget`` bytes: one forward
    per crop and group, one group's session alive at a time. One histogram
    per tensor serves every histogram method, so ``methods`` may list
    several (automatic method choice) at no extra forward.
    """

    def __init__(self, fp32_onnx: Path, tensor_names: Sequence[str], methods: Sequence[str],
                 memory_budget: int = MEMORY_BUDGET) -> None:
        for method in methods:
            make_observer(method)  # an unknown method fails here, before any forward
        self.fp32_onnx = Path(fp32_onnx)
        self.names = list(dict.fromkeys(tensor_names))
        self.memory_budget = int(memory_budget)
        self.peaks = {name: MaxObserver() for name in self.names}
        self.keeps_histograms = any(method != "max" for method in methods)
        self.histograms = {name: PercentileObserver() for name in self.names} if self.keeps_histograms else {}
        self.crops_seen = 0
        self.groups_used = 0

    def feed(self, crops: Sequence[np.ndarray], progress_callback: Optional[ProgressCallback] = None) -> None:
        """Add ``crops`` (``(C, D, H, W)`` each, one shape) to every tensor's statistics."""
        if len(crops) == 0:
            raise PTQError("No calibration crops to run; pass --calib with one or more volumes.")
        model = onnx_graph.load_model(self.fp32_onnx)
        input_name = onnx_graph.image_input_name(model)
        inner = [name for name in self.names if name != input_name]
        reductions = _with_reductions(model, inner) if inner else model
        fetched = [f"{name}{suffix}" for name in inner for suffix in _REDUCTION_SUFFIXES]
        # With the input as the only tensor the model's own outputs are run, so a bad crop still fails here.
        wanted = fetched or [value.name for value in reductions.graph.output]
        session = self._reduction_runner(reductions, input_name, (1, *np.shape(crops[0])), wanted)
        del reductions
        for index, crop in enumerate(track(crops, "calibrate", callback=progress_callback)):
            batch = np.asarray(crop, dtype=np.float32)[None]
            outputs = self._run(session, wanted, input_name, batch, index)
            if input_name in self.peaks:
                self.peaks[input_name].update(batch)
            for position, name in enumerate(inner):
                high, low, total = outputs[3 * position:3 * position + 3]
                # The sum is NaN or Inf exactly when the tensor holds one: the observer refuses it.
                self._update(self.peaks[name], name, index, np.array([high, low, total * 0.0], np.float32))
        del session
        if not self.keeps_histograms:
            self.crops_seen += len(crops)
            return
        self._seed_histogram_ranges()
        if input_name in self.histograms:
            for crop in crops:
                self.histograms[input_name].update(np.asarray(crop, dtype=np.float32))
        groups = _groups(model, input_name, np.shape(crops[0]), inner, self.memory_budget)
        self.groups_used = max(self.groups_used, len(groups))
        steps = track(range(len(groups) * len(crops)), "calibrate histograms", callback=progress_callback)
        next(steps, None)
        for group in groups:
            session = onnx_graph.cpu_session(onnx_graph.with_extra_outputs(model, group), memory_arena=False)
            for index, crop in enumerate(crops):
                outputs = self._run(session, group, input_name, np.asarray(crop, dtype=np.float32)[None], index)
                for name, output in zip(group, outputs):
                    self._update(self.histograms[name], name, index, output)
                del outputs
                next(steps, None)
            del session
        self.crops_seen += len(crops)

    def ranges(self, method: str) -> Dict[str, float]:
        """``{tensor: amax}`` as ``method`` chooses from the statistics fed so far."""
        if method == "max":
            return {name: self.peaks[name].amax() for name in self.names}
        if not self.keeps_histograms:
            raise PTQError(f"Method {method!r} needs histograms, which this collector was not asked to keep.")
        return {name: histogram_amax(self.histograms[name], method) for name in self.names}

    def _seed_histogram_ranges(self) -> None:
        """Start each empty histogram at the tensor's known peak, so it never needs to grow and merge bins."""
        for name, histogram in self.histograms.items():
            if histogram.range == 0.0 and self.peaks[name].amax() > 0.0:
                histogram.range = histogram.peak = self.peaks[name].amax()

    def _reduction_runner(self, reductions, input_name: str, shape, names: List[str]):
        """Something with ``run(names, feeds)`` for the reduction graph.

        OpenVINO (f32) runs these full-volume forwards about 3x faster than
        ONNX Runtime on the CPU, at the crop's fixed shape; ONNX Runtime
        serves where OpenVINO is missing.
        """
        try:
            import openvino as ov
        except ImportError:
            ov = None
        if ov is None:
            return onnx_graph.cpu_session(reductions, memory_arena=False)
        declared = next(value for value in reductions.graph.input if value.name == input_name)
        fixed = [dim.dim_value for dim in declared.type.tensor_type.shape.dim]
        try:
            if any(size > 0 and size != want for size, want in zip(fixed, shape)):
                # A static graph is calibrated at its own size only, as ONNX Runtime enforces.
                raise ValueError(f"the model takes a fixed input of shape {tuple(fixed)}")
            core = ov.Core()
            network = core.read_model(reductions.SerializeToString(), b"")
            network.reshape({input_name: list(shape)})
            compiled = core.compile_model(network, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses for shapes the graph rejects
            raise PTQError(f"The FP32 model {self.fp32_onnx} failed on calibration crop 0 of shape {tuple(shape)}: "
                           f"{str(exc).strip().splitlines()[0][:300]}. Use a crop size the model accepts "
                           "(its fixed input size, or a multiple of its downsampling).") from exc
        return _OpenVINOForward(compiled)

    def _run(self, session, fetched, input_name: str, batch: np.ndarray, index: int):
        try:
            return session.run(fetched, {input_name: batch})
        except Exception as exc:
            raise PTQError(f"The FP32 model {self.fp32_onnx} failed on calibration crop {index} of "
                           f"shape {batch.shape}: {exc}. Use a crop size the model accepts "
                           "(its fixed input size, or a multiple of its downsampling).") from exc


    @staticmethod
    def _update(observer, name: str, index: int, values: np.ndarray) -> None:
        try:
            observer.update(values)
        except PTQError as exc:
            raise PTQError(f"Tensor {name!r} on calibration crop {index}: {exc}") from exc


class _OpenVINOForward:
    """A compiled OpenVINO model answering ``run(names, feeds)`` like an ONNX Runtime session."""

    def __init__(self, compiled) -> None:
        self.compiled = compiled
        self.request = compiled.create_infer_request()

    def run(self, names: Sequence[str], feeds: Dict[str, np.ndarray]):
        results = self.request.infer(feeds)
        return [np.asarray(results[self.compiled.output(name)]) for name in names]


# Per tensor: its maximum, minimum and sum (the sum only to detect NaN/Inf).
_REDUCTION_SUFFIXES = ("::ptq_max", "::ptq_min", "::ptq_sum")


def _with_reductions(model, names: Sequence[str]):
    """A copy of ``model`` whose outputs are ReduceMax/ReduceMin/ReduceSum of each of ``names``."""
    import onnx
    from onnx import helper

    reduced = onnx.ModelProto()
    reduced.CopyFrom(model)
    del reduced.graph.output[:]
    for index, name in enumerate(names):
        for op, suffix in zip(("ReduceMax", "ReduceMin", "ReduceSum"), _REDUCTION_SUFFIXES):
            reduced.graph.node.append(helper.make_node(op, [name], [name + suffix], keepdims=0,
                                                       name=f"ptq_calibration_{op}_{index}"))
            reduced.graph.output.append(helper.make_tensor_value_info(name + suffix, onnx.TensorProto.FLOAT, None))
    return reduced


def _groups(model, input_name: str, crop_shape, names: Sequence[str], budget: int) -> List[List[str]]:
    """``names`` in graph order, cut into groups whose float32 size at ``crop_shape`` stays within ``budget``."""
    sizes = tensor_bytes(model, input_name, (1, *crop_shape))
    known = [size for size in sizes.values() if size]
    # A size shape inference could not work out counts as the largest one it could.
    fallback = max(known) if known else 4 * int(np.prod(crop_shape)) * 64
    groups: List[List[str]] = []
    used = budget + 1
    for name in names:
        size = sizes.get(name) or fallback
        if used + size > budget or not groups:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


def tensor_bytes(model, input_name: str, input_shape: Sequence[int]) -> Dict[str, int]:
    """float32 bytes of every tensor whose shape inference fixes at ``input_shape`` (others absent)."""
    import onnx

    shaped = onnx.ModelProto()
    shaped.CopyFrom(model)
    for value in shaped.graph.input:
        if value.name == input_name:
            for dim, size in zip(value.type.tensor_type.shape.dim, input_shape):
                dim.Clear()
                dim.dim_value = int(size)
    try:
        inferred = onnx.shape_inference.infer_shapes(shaped, data_prop=True)
    except Exception:  # shape inference gives up on some exported graphs: every size is then unknown
        return {}
    sizes = {}
    for value in list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and all(dim.HasField("dim_value") and dim.dim_value > 0 for dim in dims):
            sizes[value.name] = 4 * int(np.prod([dim.dim_value for dim in dims]))
    return sizes
