"""Build TensorRT engines from ONNX files, the way NVIDIA documents for TensorRT 10/11.

Every engine is built from a *strongly typed* network
(``NetworkDefinitionCreationFlag.STRONGLY_TYPED``): the precision of each
layer comes from the tensor types in the ONNX graph, never from builder
flags. That is the only mode TensorRT 11 has (``BuilderFlag.FP16``/``INT8``
were removed; weak typing was deprecated in 10.12 and implicit INT8
calibration in 10.1), so:

- **int8**: the QDQ ONNX with its float parts converted to FP16 first
  (:mod:`.fp16_float_parts`, what NVIDIA's Model-Optimizer does after INT8
  quantization), keeping the network's inputs/outputs and the sensitive ops
  in FP32. Each Q/DQ-wrapped convolution becomes an INT8 kernel, the other
  layers run FP16. ``float_parts="fp32"`` builds the QDQ ONNX as it is
  (float parts in FP32).
- **fp16**: the float ONNX converted to an FP16 ONNX first
  (:func:`convert_to_fp16`, the step NVIDIA's migration guide does with
  ModelOpt AutoCast), keeping the network's inputs/outputs and the
  normalization layers in FP32.
- **fp32**: the float ONNX as it is.

One optimization profile covers the sliding-window patches: the spatial
size is the roi (optionally a min/max range) and the batch runs from 1 to
``max_batch``. The tactic timing cache is loaded before and saved after each
build, so a second build on the same GPU skips most kernel timing. The
builder records layer details (``ProfilingVerbosity.DETAILED``) so the
engine inspector can later tell which layers really run INT8.

Only :func:`build_serialized_engine` and :func:`gpu_identity` need TensorRT
and a GPU; the rest is plain ONNX work that runs anywhere.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .atomic import replacing
from .engine_cache import CachedEngine, EngineCache, EngineKey, write_atomic
from .errors import PTQError
from .fp16_float_parts import KEEP_FLOAT32_OPS

log = logging.getLogger(__name__)

PRECISIONS = ("int8", "fp16", "fp32")
FLOAT_PARTS = ("fp16", "fp32")
# Float ops kept in FP32 in the FP16 model: the same list as the INT8 engines' float parts, so the two
# compare like for like (norms and reductions over a whole 3D feature map, Softmax/Exp/Log/Pow).
FP16_KEEP_FLOAT32_OPS = KEEP_FLOAT32_OPS
#: Changes whenever :func:`convert_to_fp16` would write a different file.
FP16_RECIPE = "onnxruntime-float16/io-fp32/norm-softmax-fp32/v2"


@dataclass(frozen=True)
class BuildSettings:
    """How to build one engine.

    ``roi`` is the sliding-window patch (D, H, W); ``min_roi``/``max_roi``
    widen the profile when patches of other sizes must run (default: the roi
    only). ``max_batch`` patches go through one call. ``optimization_level``
    is TensorRT's builder optimization level (0-5, 3 is its default;
    higher searches more tactics and builds slower); ``workspace_mib`` caps
    the scratch memory tactics may use. ``float_parts`` is the type of the
    layers an INT8 engine does not quantize: "fp16" (default, as
    Model-Optimizer writes INT8 models) or "fp32" (the QDQ file as it is);
    other precisions ignore it.
    """

    precision: str = "int8"
    roi: Tuple[int, int, int] = (96, 96, 96)
    max_batch: int = 2
    min_roi: Optional[Tuple[int, int, int]] = None
    max_roi: Optional[Tuple[int, int, int]] = None
    optimization_level: int = 3
    workspace_mib: int = 4096
    float_parts: str = "fp16"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise PTQError(f"Unknown TensorRT precision '{self.precision}'. Choose one of: {', '.join(PRECISIONS)}.")
        if self.float_parts not in FLOAT_PARTS:
            raise PTQError(f"Unknown float_parts '{self.float_parts}' for INT8 engines. Choose one of: "
                           f"{', '.join(FLOAT_PARTS)}.")
        if self.max_batch < 1:
            raise PTQError(f"max_batch must be at least 1 (got {self.max_batch}).")
        if not 0 <= self.optimization_level <= 5:
            raise PTQError(f"TensorRT builder optimization level must be 0-5 (got {self.optimization_level}).")
        if self.workspace_mib < 64:
            raise PTQError(f"TensorRT workspace of {self.workspace_mib} MiB is too small; give at least 64 MiB.")
        for name in ("roi", "min_roi", "max_roi"):
            value = getattr(self, name)
            if value is not None and (len(value) != 3 or any(int(v) < 1 for v in value)):
                raise PTQError(f"{name} must be three positive sizes (D, H, W), got {value}.")

    def builder_fields(self) -> Dict[str, Any]:
        """The settings that change the engine without changing the profile."""
        return {"optimization_level": self.optimization_level, "workspace_mib": self.workspace_mib}

    def to_dict(self) -> Dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


def onnx_input(onnx_path: Path) -> Tuple[str, List[Optional[int]]]:
    """Name and dims of the model's single input; dynamic dims are None."""
    import onnx

    model = _load_onnx(onnx_path, load_weights=False)
    initializers = {init.name for init in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in initializers]
    if len(inputs) != 1:
        raise PTQError(f"{onnx_path} has {len(inputs)} inputs; the sliding-window runtime feeds exactly one "
                       "image tensor (B, C, D, H, W).")
    dims = [dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None
            for dim in inputs[0].type.tensor_type.shape.dim]
    if inputs[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise PTQError(f"{onnx_path}: input '{inputs[0].name}' is not float32; export the network with a "
                       "float32 input.")
    return inputs[0].name, dims


def profile_shapes(onnx_path: Path, settings: BuildSettings) -> Dict[str, Any]:
    """The optimization profile ``{"input", "min", "opt", "max"}`` (shapes B, C, D, H, W).

    Batch runs 1..max_batch (optimized for max_batch, which the sliding
    window fills); spatial dims cover ``min_roi``..``max_roi``, optimized for
    ``roi``. Dims the ONNX file fixes are kept and must agree with the roi.
    """
    name, dims = onnx_input(onnx_path)
    if len(dims) != 5:
        raise PTQError(f"{onnx_path}: input '{name}' has {len(dims)} dims; a 3D segmentation network takes "
                       "(B, C, D, H, W).")
    channels = dims[1]
    if channels is None:
        raise PTQError(f"{onnx_path}: the channel dim of input '{name}' is dynamic; export with a fixed "
                       "channel count.")
    roi = tuple(int(v) for v in settings.roi)
    low = tuple(int(v) for v in (settings.min_roi or roi))
    high = tuple(int(v) for v in (settings.max_roi or roi))
    if any(not lo <= mid <= hi for lo, mid, hi in zip(low, roi, high)):
        raise PTQError(f"roi {roi} must lie between min_roi {low} and max_roi {high}.")
    batch = dims[0]
    shapes = {"min": [batch or 1, channels], "opt": [batch or settings.max_batch, channels],
              "max": [batch or settings.max_batch, channels]}
    for axis, fixed in enumerate(dims[2:]):
        if fixed is not None and not low[axis] == roi[axis] == high[axis] == fixed:
            raise PTQError(f"{onnx_path} fixes spatial dim {axis} to {fixed}, but the roi asks for "
                           f"{low[axis]}..{high[axis]}; use roi {tuple(d or r for d, r in zip(dims[2:], roi))} "
                           "or re-export the network with dynamic spatial dims.")
        shapes["min"].append(low[axis])
        shapes["opt"].append(roi[axis])
        shapes["max"].append(high[axis])
    return {"input": name, **shapes}


def has_qdq(onnx_path: Path) -> bool:
    """True when the graph holds QuantizeLinear/DequantizeLinear nodes."""
    model = _load_onnx(onnx_path, load_weights=False)
    return any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in model.graph.node)


def convert_to_fp16(float_onnx: Path, out_path: Path) -> Path:
    """Write an FP16 copy of a float ONNX model for a strongly typed FP16 engine.

    Weights and activations become float16 except the ops in
    :data:`FP16_KEEP_FLOAT32_OPS`; the model input and output stay float32
    (casts are inserted), so the runtime feeds and reads float32 as for the
    other precisions. The file is written atomically.
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    float_onnx, out_path = Path(float_onnx), Path(out_path)
    if has_qdq(float_onnx):
        raise PTQError(f"{float_onnx} is a QDQ (quantized) model; FP16 and FP32 engines are built from the "
                       "float ONNX (model.fp32.onnx).")
    model = _load_onnx(float_onnx, load_weights=True)
    block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP16_KEEP_FLOAT32_OPS))
    converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=block)
    _save_onnx_atomic(converted, out_path)
    return out_path


def onnx_compute_ops(onnx_path: Path) -> Dict[str, str]:
    """``{node name: op type}`` of the Conv/ConvTranspose/MatMul/Gemm nodes (to find their engine layers)."""
    model = _load_onnx(onnx_path, load_weights=False)
    return {node.name: node.op_type for node in model.graph.node
            if node.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm") and node.name}


_LAYER_TYPES = {"Conv": "Convolution", "ConvTranspose": "Deconvolution", "MatMul": "MatrixMultiply",
                "Gemm": "MatrixMultiply"}
_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]+)\]")


def parse_layer_information(engine_json: str, onnx_ops: Optional[Dict[str, str]] = None) -> List[Dict[str, str]]:
    """Per engine layer ``{"name", "type", "precision"}`` from the inspector's JSON.

    ``engine_json`` is ``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)``
    of an engine built with ``ProfilingVerbosity.DETAILED``; ``onnx_ops``
    maps the ONNX compute nodes to their op types (:func:`onnx_compute_ops`).
    Both documented schemas are read: TensorRT 10 (tensor ``"Format/Datatype"``,
    layer ``"Weights": {"Type", "Count"}``, ``"ParameterType"``) and TensorRT 11
    (tensor ``"Datatype"`` and ``"Format"``, weights as ``"Constants"``
    tensors, generated ``"kgen"`` layers). A layer's type comes from its
    TensorRT layer/parameter type, else from the ONNX nodes it was built
    from: the exact names in its ``"Metadata"`` (``[ONNX Layer: name]``) or
    its ``" + "``-joined name, never a substring, so the Conv that reads a
    ConvTranspose's dequantized output is not taken for it. Precision is
    the weights' type when there are weights, else the first input's type.
    Layers from a ConvTranspose get ``"convtranspose": "yes"``, and a
    ``"note"`` when they are not INT8.
    """
    try:
        document = json.loads(engine_json)
    except ValueError as exc:
        raise PTQError(f"The engine inspector returned no JSON ({exc}); rebuild the engine.") from exc
    layers = document.get("Layers", []) if isinstance(document, dict) else []
    if layers and not isinstance(layers[0], dict):
        raise PTQError("The engine holds layer names only: it was built without ProfilingVerbosity.DETAILED; "
                       "rebuild it with slicer-ptq (the builder sets it).")
    onnx_ops = dict(onnx_ops or {})
    result = []
    for layer in layers:
        layer_kind = str(layer.get("LayerType", ""))
        if layer_kind in ("NoOp", "Reformat") or "Reformat" in layer_kind:
            continue
        sources = _ONNX_LAYER.findall(str(layer.get("Metadata", ""))) + str(layer.get("Name", "")).split(" + ")
        ops = [onnx_ops[name.strip()] for name in sources if name.strip() in onnx_ops]
        parameter_kind = str(layer.get("ParameterType", ""))
        is_deconv = ("deconv" in layer_kind.lower() or parameter_kind == "Deconvolution"
                     or "ConvTranspose" in ops)
        if is_deconv:
            kind = "Deconvolution"
        elif parameter_kind:
            kind = parameter_kind
        elif ops:
            kind = _LAYER_TYPES[ops[0]]
        else:
            kind = layer_kind
        entry = {"name": str(layer.get("Name", "")), "type": kind, "precision": _layer_precision(layer)}
        if is_deconv:
            entry["convtranspose"] = "yes"
            if entry["precision"] != "int8":
                entry["note"] = (f"ConvTranspose runs {entry['precision']}, not INT8: put Q/DQ on its output "
                                 "and check its weight-scale axis (docs/tensorrt.md)")
        result.append(entry)
    return result


_DTYPE_PATTERN = re.compile(r"\b(Int8|INT8|FP8|FP16|Half|BFloat16|BF16|FP32|Float|Int32|INT32|Int64|UInt8|Bool)\b",
                            re.IGNORECASE)
_DTYPE_NAMES = {"int8": "int8", "fp8": "fp8", "fp16": "fp16", "half": "fp16", "bfloat16": "bf16", "bf16": "bf16",
                "fp32": "fp32", "float": "fp32", "int32": "int32", "int64": "int64", "uint8": "uint8",
                "bool": "bool"}


def _precision_of(text: Any) -> Optional[str]:
    match = _DTYPE_PATTERN.search(str(text or ""))
    return _DTYPE_NAMES[match.group(1).lower()] if match else None


def _tensor_precision(tensor: Dict[str, Any]) -> Optional[str]:
    """TensorRT 11 ``"Datatype"`` (I/O tensors: ``"DataType"``), TensorRT 10 ``"Format/Datatype"``."""
    return _precision_of(tensor.get("Datatype") or tensor.get("DataType") or tensor.get("Format/Datatype"))


def _elements(tensor: Dict[str, Any]) -> int:
    count = 1
    for dim in tensor.get("Dimensions") or []:
        count *= int(dim) if isinstance(dim, int) and dim > 0 else 1
    return count


def _layer_precision(layer: Dict[str, Any]) -> str:
    weights = layer.get("Weights")
    if isinstance(weights, dict) and weights.get("Count", 1):
        precision = _precision_of(weights.get("Type"))
        if precision is not None:
            return precision
    constants = [tensor for tensor in layer.get("Constants") or [] if isinstance(tensor, dict)]
    for tensor in sorted(constants, key=_elements, reverse=True):
        precision = _tensor_precision(tensor)
        if precision is not None:
            return precision
    for key in ("Inputs", "Outputs"):
        for tensor in layer.get(key) or []:
            if isinstance(tensor, dict):
                precision = _tensor_precision(tensor)
                if precision is not None:
                    return precision
    return "unknown"


# -- TensorRT (GPU) ---------------------------------------------------------------------------

def tensorrt_major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def gpu_identity(device: int = 0) -> Tuple[str, str]:
    """``(GPU name, compute capability "major.minor")`` of a CUDA device (torch or cuda-python)."""
    from .runtimes import cuda_memory

    return cuda_memory.open_device(device).identity()


_LOGGER = None


def trt_logger():
    """The process-wide TensorRT logger (TensorRT treats its logger as a singleton).

    Errors are kept (the last 20) so a failure can quote them; messages the
    Python log would drop are returned from before any work is done on them,
    since a build sends thousands of VERBOSE/INFO lines through this callback.
    """
    global _LOGGER
    if _LOGGER is None:
        import tensorrt as trt

        levels = {trt.ILogger.INTERNAL_ERROR: logging.ERROR, trt.ILogger.ERROR: logging.ERROR,
                  trt.ILogger.WARNING: logging.WARNING, trt.ILogger.INFO: logging.DEBUG,
                  trt.ILogger.VERBOSE: logging.DEBUG}

        class _Logger(trt.ILogger):
            """Forwards TensorRT messages to Python logging and keeps the recent errors."""

            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.errors: List[str] = []

            def log(self, severity, msg) -> None:
                level = levels.get(severity, logging.DEBUG)
                if level >= logging.ERROR:
                    self.errors = (self.errors + [str(msg)])[-20:]
                if log.isEnabledFor(level):
                    log.log(level, "TensorRT: %s", msg)

        _LOGGER = _Logger()
    return _LOGGER


def tensorrt_failure(what: str, fix: str, exc: Optional[BaseException] = None) -> PTQError:
    """A PTQError for a failed TensorRT call that quotes the logger's last errors (the real reason)."""
    import tensorrt as trt

    errors = trt_logger().errors[-3:]
    reason = "; ".join(errors) if errors else (str(exc) if exc is not None else "no error was logged")
    return PTQError(f"TensorRT {trt.__version__} {what}: {reason}. {fix}")


def create_builder(logger):
    """``trt.Builder``; a PTQError instead of pybind11's ``TypeError`` when CUDA cannot start."""
    import tensorrt as trt

    return _created(trt.Builder, "builder", logger)


def create_runtime(logger):
    """``trt.Runtime``; a PTQError instead of pybind11's ``TypeError`` when CUDA cannot start."""
    import tensorrt as trt

    return _created(trt.Runtime, "runtime", logger)


def _created(factory, what: str, logger):
    try:
        made = factory(logger)
    except (TypeError, RuntimeError) as exc:
        raise tensorrt_failure(f"cannot create a {what}", CUDA_FIX, exc) from exc
    if made is None:
        raise tensorrt_failure(f"cannot create a {what}", CUDA_FIX)
    return made


#: The fix for a builder or runtime that cannot be created.
CUDA_FIX = ("Check the NVIDIA driver (nvidia-smi) and that TensorRT's CUDA major version (tensorrt-cu12 or "
            "tensorrt-cu13) matches the driver's")


def build_serialized_engine(onnx_path: Path, settings: BuildSettings,
                            timing_cache: Optional[Path] = None) -> Tuple[bytes, Dict[str, Any]]:
    """Parse ``onnx_path`` into a strongly typed network and build a serialized engine.

    ``onnx_path`` must already be in the precision asked for (QDQ, with its
    float parts in FP16 or not, for int8; an FP16 ONNX for fp16; float for
    fp32). No precision builder flag is set: a strongly typed network takes
    its precision from the ONNX tensor types (TensorRT 11 has no such flags). Returns the engine bytes and
    build metadata (TensorRT version, profile, build time). ``timing_cache``
    is read before the build (if present) and rewritten atomically after it.
    """
    import tensorrt as trt

    onnx_path = Path(onnx_path)
    profile = profile_shapes(onnx_path, settings)
    logger = trt_logger()
    logger.errors = []
    builder = create_builder(logger)
    # TensorRT 11 networks are always strongly typed and ignore the flag.
    flags = 0 if tensorrt_major(trt) >= 11 else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # INormalizationLayer instead of the legacy InstanceNorm plugin (works in every precision).
    parser.set_flag(trt.OnnxParserFlag.NATIVE_INSTANCENORM)
    started = time.perf_counter()
    if not parser.parse_from_file(str(onnx_path)):
        problems = "; ".join(str(parser.get_error(index)) for index in range(parser.num_errors))
        raise PTQError(f"TensorRT {trt.__version__} cannot parse {onnx_path}: {problems}. Check the model with "
                       "SlicerPTQLib.qdq_check.check_qdq and re-export it.")
    parse_seconds = time.perf_counter() - started

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mib << 20)
    config.builder_optimization_level = settings.optimization_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    _attach_timing_cache(config, timing_cache)
    optimization_profile = builder.create_optimization_profile()
    optimization_profile.set_shape(profile["input"], profile["min"], profile["opt"], profile["max"])
    config.add_optimization_profile(optimization_profile)

    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    build_seconds = time.perf_counter() - started
    if serialized is None:
        raise tensorrt_failure(f"failed to build a {settings.precision} engine from {onnx_path}",
                               "A smaller max_batch or a larger workspace may help.")
    if timing_cache is not None:
        write_atomic(Path(timing_cache), bytes(config.get_timing_cache().serialize()))
    metadata = {
        "tensorrt_version": trt.__version__,
        "precision": settings.precision,
        "settings": settings.to_dict(),
        "profile": profile,
        "onnx_file": onnx_path.name,
        "network_layers": network.num_layers,
        "parse_seconds": round(parse_seconds, 3),
        "build_seconds": round(build_seconds, 3),
        "onnx_ops": onnx_compute_ops(onnx_path),
    }
    return bytes(serialized), metadata


def default_cache_dir() -> Path:
    """Where engines are cached: ``$SLICER_PTQ_CACHE/tensorrt`` (``~/.cache/slicer-ptq/tensorrt``)."""
    from .fetch import cache_dir

    return cache_dir() / "tensorrt"


def engine_key(onnx_path: Path, settings: BuildSettings, device: int = 0) -> EngineKey:
    """The cache key of the engine ``settings`` would build from ``onnx_path`` on ``device``.

    Holds the model file's SHA-256, the precision with the quantization
    settings that made the file (from ``quantization.json`` beside it, when
    present) and, for converted files, the conversion recipe and the
    converter's version (INT8: the float parts' type), the TensorRT version, the GPU name and compute capability,
    the optimization profile and the builder settings.
    """
    import tensorrt as trt

    from .fetch import sha256_of

    onnx_path = Path(onnx_path)
    gpu_name, capability = gpu_identity(device)
    quantization: Dict[str, Any] = {"precision": settings.precision,
                                    "producer_settings": _producer_settings(onnx_path)}
    if settings.precision == "fp16":
        import onnxruntime

        # The FP16 file comes from onnxruntime's converter: another version may write another graph.
        quantization["fp16_recipe"] = FP16_RECIPE
        quantization["fp16_converter"] = f"onnxruntime {onnxruntime.__version__}"
    if settings.precision == "int8":
        quantization["float_parts"] = settings.float_parts
        if settings.float_parts == "fp16":
            import onnx

            from .fp16_float_parts import RECIPE

            # The pass uses onnx's version converter and shape inference: another version may differ.
            quantization["float_parts_recipe"] = RECIPE
            quantization["float_parts_converter"] = f"onnx {onnx.__version__}"
    return EngineKey(model_sha256=sha256_of(onnx_path), quantization=quantization,
                     tensorrt_version=trt.__version__, gpu_name=gpu_name, compute_capability=capability,
                     profile=profile_shapes(onnx_path, settings), builder=settings.builder_fields())


def engine_for(onnx_path: Path, settings: BuildSettings, cache_dir: Optional[Path] = None,
               device: int = 0) -> CachedEngine:
    """The engine of ``onnx_path`` for ``settings``: from the cache, or built and cached.

    int8 takes a QDQ model, checked first against TensorRT's Q/DQ rules
    (errors raise PTQError, warnings go into the engine's metadata), and
    converts its float parts to FP16 unless ``settings.float_parts`` is
    "fp32"; fp16 and fp32 take the float model. A cached engine whose key or file does
    not match is rebuilt, never loaded.
    """
    from .qdq_check import assert_valid

    onnx_path = Path(onnx_path)
    quantized = has_qdq(onnx_path)
    warnings: List[str] = []
    if settings.precision == "int8":
        if not quantized:
            raise PTQError(f"{onnx_path} has no Q/DQ nodes, so TensorRT cannot build INT8 kernels from it. "
                           "Quantize it first (slicer-ptq quantize --placement tensorrt) and give model.int8.onnx.")
        warnings = [str(finding) for finding in assert_valid(onnx_path, target="tensorrt")]
        if _producer_settings(onnx_path).get("placement") == "cpu":
            warnings.append(f"{onnx_path.name} was quantized with placement 'cpu' (for OpenVINO: norm and "
                            "activation outputs quantized too); TensorRT runs it, but re-quantize with "
                            "--placement tensorrt for TensorRT's fusions")
            log.warning("%s", warnings[-1])
    elif quantized:
        raise PTQError(f"{onnx_path} is a quantized (Q/DQ) model; {settings.precision} engines are built from "
                       "the float model (model.fp32.onnx).")
    cache = EngineCache(Path(cache_dir) if cache_dir is not None else default_cache_dir())
    key = engine_key(onnx_path, settings, device)
    timing_cache = cache.timing_cache_path(key.tensorrt_version, key.gpu_name, key.compute_capability)

    def build() -> Tuple[bytes, Dict[str, Any]]:
        log.info("Building a TensorRT %s engine for %s (profile %s); this takes a while once per GPU.",
                 settings.precision, onnx_path.name, key.profile)
        if settings.precision == "fp16":
            engine, metadata = _build_converted(onnx_path, settings, timing_cache, convert_to_fp16, "fp16")
        elif settings.precision == "int8" and settings.float_parts == "fp16":
            from .fp16_float_parts import convert_float_parts

            conversion = {}

            def convert(source: Path, target: Path) -> Path:
                conversion.update(convert_float_parts(source, target).to_dict())
                return target

            engine, metadata = _build_converted(onnx_path, settings, timing_cache, convert, "fp16-float-parts")
            metadata["float_parts"] = conversion
        else:
            engine, metadata = build_serialized_engine(onnx_path, settings, timing_cache)
        metadata.update({"source_onnx": str(onnx_path), "gpu_name": key.gpu_name,
                         "compute_capability": key.compute_capability, "qdq_warnings": warnings})
        return engine, metadata

    return cache.get_or_build(key, build)


def _build_converted(onnx_path: Path, settings: BuildSettings, timing_cache: Optional[Path],
                     convert, label: str) -> Tuple[bytes, Dict[str, Any]]:
    """Build from ``convert(onnx_path, temporary file)``; layer names still map to ``onnx_path``'s nodes."""
    with tempfile.TemporaryDirectory(prefix="slicer-ptq-trt-") as folder:
        converted = convert(onnx_path, Path(folder) / f"{onnx_path.stem}.{label}.onnx")
        engine, metadata = build_serialized_engine(converted, settings, timing_cache)
    metadata["onnx_ops"] = onnx_compute_ops(onnx_path)
    return engine, metadata


def _producer_settings(onnx_path: Path) -> Dict[str, Any]:
    """The settings slicer-ptq recorded when it wrote ``onnx_path`` (empty if none)."""
    from .pipeline import REPORT_NAME

    report_file = onnx_path.parent / REPORT_NAME
    if not report_file.is_file():
        return {}
    try:
        report = json.loads(report_file.read_text())
    except (OSError, ValueError):
        return {}
    if onnx_path.name not in (report.get("files") or {}).values():
        return {}
    return report.get("settings") or {}


def _attach_timing_cache(config, timing_cache: Optional[Path]) -> None:
    """Load the persisted timing cache; a stale or corrupt one is replaced by an empty cache."""
    data = b""
    if timing_cache is not None and Path(timing_cache).is_file():
        data = Path(timing_cache).read_bytes()
    try:
        cache = config.create_timing_cache(data)
    except (RuntimeError, TypeError, ValueError):
        cache = None
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("TensorRT rejected the timing cache %s (other TensorRT version or GPU); starting an "
                    "empty one.", timing_cache)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


# -- helpers ---------------------------------------------------------------------------------

def _load_onnx(path: Path, load_weights: bool):
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise PTQError(f"ONNX model {path} does not exist. Give the path of a .onnx file.")
    try:
        return onnx.load(str(path), load_external_data=load_weights)
    except (OSError, ValueError, DecodeError) as exc:
        raise PTQError(f"Cannot read ONNX model {path}: {exc}. Re-export it.") from exc


def _save_onnx_atomic(model, out_path: Path) -> None:
    import onnx

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(out_path, suffix=".onnx") as tmp:
        onnx.save(model, str(tmp))
