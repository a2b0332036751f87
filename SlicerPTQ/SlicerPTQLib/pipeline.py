"""The user-level jobs: quantize a model, segment a volume, compare models.

Every entry point (CLI, Slicer worker, Python console) goes through these
functions, so a volume travels one path: read -> prepare -> network ->
restore -> label map.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from . import build_cache
from .atomic import staging_folder
from .errors import PTQError
from .metrics import file_size_mb
from .models import LoadedModel, file_sha256, load_model
from .progress import ProgressCallback
from .spec import ModelSpec, find_sidecar, sidecar_path
from .volume import Volume

VolumeSource = Union[str, Path, Volume]
METHODS = ("max", "percentile", "entropy", "mse", "auto")
WEIGHT_BITS = (8, 4, 3, 2)
REPORT_NAME = "quantization.json"


@dataclass
class QuantizeResult:
    """Where a quantization run put its files, and what it measured."""

    out_dir: Path
    fp32_onnx: Path
    quantized_onnx: Path
    spec: ModelSpec
    report: Dict = field(default_factory=dict)
    packed_weights: Optional[Path] = None


def quantized_name(weight_bits: int) -> str:
    """``model.int8.onnx`` for W8A8, ``model.w4a8.onnx`` for 4-bit weights."""
    return "model.int8.onnx" if weight_bits == 8 else f"model.w{weight_bits}a8.onnx"


def _check_settings(method: str, weight_bits: int, num_crops: int, placement: str,
                    accuracy_budget: Optional[float] = None, seed: int = 0,
                    roi: Optional[Sequence[int]] = None) -> None:
    from .limits import check_num_crops, check_roi, check_seed

    if method not in METHODS:
        raise PTQError(f"Unknown calibration method '{method}'. Choose one of: {', '.join(METHODS)}.")
    if weight_bits not in WEIGHT_BITS:
        raise PTQError(f"Weight bits must be one of {WEIGHT_BITS}, not {weight_bits}.")
    check_num_crops(num_crops)
    check_seed(seed)
    if roi is not None:
        check_roi(roi)
    if placement not in ("cpu", "tensorrt"):
        raise PTQError(f"Unknown Q/DQ placement '{placement}'. Choose 'cpu' (OpenVINO) or 'tensorrt'.")
    if accuracy_budget is not None:
        check_accuracy_budget(accuracy_budget)
        if weight_bits < 8:
            raise PTQError("--accuracy-budget picks INT8 layers to keep in float; it does not combine with "
                           "low-bit weights. Drop one of --accuracy-budget and --weight-bits.")


def check_accuracy_budget(budget: float) -> None:
    """Refuse an accuracy budget that is not an agreement Dice."""
    if not 0.0 < budget <= 1.0:
        raise PTQError(f"The accuracy budget (--accuracy-budget) is an agreement Dice with FP32 in (0, 1], "
                       f"e.g. 0.99; got {budget}.")


def _prepare_out_dir(out_dir: Path) -> List[Path]:
    """Create ``out_dir`` if missing; returns the folders created, deepest first (to undo on failure)."""
    from .output_paths import check_output_folder

    check_output_folder(out_dir)
    created = [folder for folder in [out_dir, *out_dir.parents] if not folder.exists()]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PTQError(f"Cannot create output folder {out_dir}: {exc.strerror or exc}. Choose a folder you "
                       "can write to.") from exc
    return created


def _remove_if_empty(folders: Sequence[Path]) -> None:
    """Undo :func:`_prepare_out_dir` after a failed run: a folder the run created and left empty goes."""
    for folder in folders:
        try:
            folder.rmdir()  # only ever removes an empty folder
        except OSError:
            return


def check_sources(sources: Sequence[VolumeSource], what: str = "Calibration volume") -> None:
    """Refuse missing files and folders among volume paths before any work."""
    for source in sources:
        if not isinstance(source, Volume):
            from .volumes import check_volume_path

            check_volume_path(Path(source), what)


def read_any(source: VolumeSource) -> Volume:
    """A Volume from a path or a Volume (passed through)."""
    if isinstance(source, Volume):
        return source
    from .volumes import read_volume

    return read_volume(Path(source))


def prepared_arrays(sources: Sequence[VolumeSource], spec: ModelSpec,
                    progress: Optional[ProgressCallback] = None, warnings: Optional[List[str]] = None) -> List:
    """Read and preprocess volumes to network arrays ``(C, D, H, W)``; plausibility
    warnings (:mod:`plausibility`) are appended to ``warnings`` when given."""
    from . import plausibility
    from .preprocess import prepare
    from .progress import track

    if not sources:
        raise PTQError("No calibration volumes given. Pass a few unlabeled volumes of the kind the model "
                       "segments (--calib FILE... or a folder).")
    arrays = []
    for source in track(list(sources), "read volumes", callback=progress):
        volume = read_any(source)
        if warnings is not None:
            warnings.extend(plausibility.check(volume, spec))
        arrays.append(prepare(volume, spec)[0])
    return arrays


def build_folder(model_source: Path, spec: ModelSpec, calibration: Sequence[VolumeSource], settings: Dict) -> Path:
    """``<builds>/<key>`` (:func:`build_cache.builds_dir`): the key covers the model file, its spec, the settings
    and every calibration voxel."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256(file_sha256(Path(model_source)).encode())
    digest.update(json.dumps(spec.to_dict(), sort_keys=True).encode())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for source in calibration:
        if isinstance(source, Volume):
            array = np.ascontiguousarray(source.array)
            digest.update(f"{array.dtype}{array.shape}".encode())
            digest.update(array.tobytes())
            digest.update(np.asarray(source.affine, dtype=np.float64).tobytes())
        else:
            digest.update(file_sha256(Path(source)).encode())
    return build_cache.builds_dir() / digest.hexdigest()[:20]


def _cached(out_dir: Path) -> Optional[QuantizeResult]:
    """The verified build in ``out_dir`` (see :func:`build_cache.verify`), else None."""
    report_file = out_dir / REPORT_NAME
    if not report_file.is_file() or not build_cache.reusable(out_dir):
        return None
    report = json.loads(report_file.read_text())
    files = {key: out_dir / name for key, name in report.get("files", {}).items()}
    if not files or not all(path.is_file() for path in files.values()):
        return None
    report["cached"] = True
    return QuantizeResult(out_dir=out_dir, fp32_onnx=files["fp32_onnx"], quantized_onnx=files["quantized_onnx"],
                          spec=ModelSpec.load(sidecar_path(files["quantized_onnx"])), report=report,
                          packed_weights=files.get("packed_weights"))


def quantize(model: Union[str, Path], calibration: Sequence[VolumeSource], out_dir: Optional[Path] = None,
             method: str = "max", num_crops: int = 20, roi: Optional[Sequence[int]] = None, seed: int = 0,
             placement: str = "cpu", weight_bits: int = 8, lowbit_solver: str = "admm",
             arch: Optional[str] = None, arch_args: Optional[Dict] = None, spec: Optional[ModelSpec] = None,
             keep_float: Sequence[str] = (), accuracy_budget: Optional[float] = None,
             progress: Optional[ProgressCallback] = None, trust_bundle_code: bool = False,
             spec_file: Optional[Path] = None, require_spec: bool = False, modality: Optional[str] = None
             ) -> QuantizeResult:
    """Calibrate ``model`` on unlabeled ``calibration`` volumes and write a QDQ ONNX model.

    ``accuracy_budget`` (e.g. 0.99): keep the layers INT8 hurts most in
    float (:func:`sensitivity.mixed_precision`) until the model's labels
    agree with FP32's at this Dice over the whole calibration volumes;
    ``quantization.json`` then says which layers stayed float and why.

    Writes ``model.fp32.onnx``, ``model.int8.onnx`` (or ``model.w4a8.onnx``
    and a packed weight file for low-bit weights), ``model.json`` (the
    spec) and ``quantization.json`` (settings, sizes, per-op counts) into
    ``out_dir``. Without ``out_dir`` the result goes to a cache folder keyed
    by the model, the settings and the calibration data, and a second call
    returns it without recomputing.

    A MONAI bundle ``model`` is read as data; ``trust_bundle_code`` lets
    MONAI evaluate the Python expressions in its configs (trusted authors only).
    ``spec_file`` names the metadata (else it is looked for beside the
    model; ``require_spec`` refuses defaults); ``modality`` picks the
    preprocessing for that input modality (:meth:`ModelSpec.for_modality`).

    Example::

        result = quantize("net.pt", ["a.nii.gz", "b.nii.gz"], Path("out"))
        result.quantized_onnx  # out/model.int8.onnx
    """
    from .limits import check_roi

    _check_settings(method, weight_bits, num_crops, placement, accuracy_budget, seed, roi)
    if not calibration:
        raise PTQError("No calibration volumes given. Pass a few unlabeled volumes of the kind the model "
                       "segments (--calib FILE... or a folder).")
    check_sources(calibration)
    if out_dir is not None:
        from .output_paths import check_output_folder

        check_output_folder(Path(out_dir))
    loaded = load_model(model, arch=arch, arch_args=arch_args, spec=spec, trust_bundle_code=trust_bundle_code,
                        spec_file=spec_file, require_spec=require_spec)
    loaded.spec = loaded.spec.for_modality(modality)
    if roi is not None:
        loaded.spec.roi_size = check_roi(roi, loaded.spec.spatial_multiple, loaded.source)
        loaded.spec.check("--roi")
    settings = {"method": method, "num_crops": num_crops, "seed": seed, "placement": placement,
                "weight_bits": weight_bits, "lowbit_solver": lowbit_solver if weight_bits < 8 else None,
                "keep_float": sorted(keep_float), "roi": list(loaded.spec.roi_size),
                "accuracy_budget": accuracy_budget}
    in_cache = out_dir is None
    if in_cache:
        out_dir = build_folder(loaded.source, loaded.spec, calibration, settings)
        hit = _cached(out_dir)
        if hit is not None:
            return hit
        # Staged beside the cache folder, which then appears whole with one rename.
        created = _prepare_out_dir(out_dir.parent)
        parent = out_dir.parent
        label = f"{out_dir.name}."
    else:
        out_dir = Path(out_dir)
        created = _prepare_out_dir(out_dir)
        parent, label = out_dir, ""
    published = False
    staging = None
    try:
        staging = _staging(parent, label)
        result = _quantize_into(loaded, calibration, staging, settings, keep_float, progress)
        result = _publish(result, staging, out_dir, whole_folder=in_cache)
        published = True
        return result
    except OSError as exc:  # a full disk or a location that turned read-only mid-run
        raise PTQError(f"Cannot write the build into {out_dir}: {exc.strerror or exc}. Free disk space or "
                       "choose another --out.") from exc
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if not published:
            _remove_if_empty(created)


def _staging(parent: Path, label: str) -> Path:
    try:
        return staging_folder(parent, label=label)
    except OSError as exc:
        raise PTQError(f"Cannot write into {parent}: {exc.strerror or exc}. Choose a folder you can "
                       "write to.") from exc


def _export_fp32(loaded: LoadedModel, path: Path) -> None:
    from .export import export_onnx, onnx_input_spec

    if loaded.kind == "onnx":
        try:
            shutil.copyfile(loaded.onnx_path, path)
        except OSError as exc:
            raise PTQError(f"Cannot copy {loaded.source} into the build folder: {exc.strerror or exc}. "
                           "Free disk space or choose another --out.") from exc
    else:
        spec = loaded.spec
        export_onnx(loaded.module, path, in_channels=spec.in_channels,
                    example_shape=(1, spec.in_channels, *spec.roi_size), dynamic_spatial=spec.dynamic_spatial,
                    spatial_multiple=spec.spatial_multiple)
    info = onnx_input_spec(path)
    if info.channels is not None and info.channels != loaded.spec.in_channels:
        raise PTQError(f"{loaded.source} takes {info.channels} input channel(s) but its metadata says "
                       f"{loaded.spec.in_channels}. Fix in_channels in {sidecar_path(loaded.source)}.")


def _quantize_into(loaded: LoadedModel, calibration: Sequence[VolumeSource], folder: Path, settings: Dict,
                   keep_float: Sequence[str], progress: Optional[ProgressCallback]) -> QuantizeResult:
    from . import onnx_graph
    from .calibration import collect_ranges, sample_crops
    from .qdq import PLACEMENTS, choose_activation_tensors, quantize_onnx

    spec = loaded.spec
    fp32_onnx = folder / "model.fp32.onnx"
    _export_fp32(loaded, fp32_onnx)
    spec.out_channels = _onnx_out_channels(fp32_onnx, spec.out_channels)
    spec.check(f"the metadata of {loaded.source} ({loaded.spec_origin})")
    warnings: List[str] = []
    arrays = prepared_arrays(calibration, spec, progress, warnings)
    _check_channels(arrays, spec, calibration)
    crops = sample_crops(arrays, spec.roi_size, settings["num_crops"], settings["seed"])
    from .float_policy import float_policy_nodes

    # Attention-score paths and input-independent branches stay float by
    # policy (per op pattern, any model); the user's choices come on top.
    keep_float = frozenset(keep_float) | frozenset(float_policy_nodes(fp32_onnx))
    # One range table serves the low-bit solver's simulated prefix and the
    # QDQ writer, so both see the same activation scales.
    tensors = choose_activation_tensors(onnx_graph.load_model(fp32_onnx), PLACEMENTS[settings["placement"]],
                                        keep_float)
    if settings["method"] == "auto":
        from .method_choice import choose_method
        from .selfcheck import MAX_VOLUMES

        # As many whole volumes as the self-check segments: each is segmented once per shortlisted method.
        choice, ranges = choose_method(fp32_onnx, tensors, crops, settings["placement"], keep_float,
                                       spec.label_rule(), progress, volumes=arrays[:MAX_VOLUMES],
                                       roi=spec.roi_size, overlap=spec.overlap)
        method, method_record = choice.chosen, choice.to_dict()
    else:
        ranges = collect_ranges(fp32_onnx, tensors, crops, settings["method"], progress)
        method = settings["method"]
        method_record = {"requested": method, "chosen": method, "reason": "given (--method)"}
    weight_quant = None
    packed = None
    lowbit_report = None
    if settings["weight_bits"] < 8:
        from . import lowbit

        lowbit_result = lowbit.quantize_weights(fp32_onnx, crops[0], settings["weight_bits"],
                                                settings["lowbit_solver"], activation_ranges=ranges,
                                                progress_callback=progress, placement=settings["placement"],
                                                keep_float=keep_float)
        weight_quant = lowbit_result.weight_quant
        packed = folder / f"model.w{settings['weight_bits']}.packed.npz"
        lowbit.save_packed(packed, lowbit_result)
        lowbit_report = lowbit_result.summary()
    quantized = folder / quantized_name(settings["weight_bits"])
    sensitivity_report = None
    if settings.get("accuracy_budget") is not None:
        from .sensitivity import Budget, mixed_precision

        sensitivity = mixed_precision(fp32_onnx, quantized, crops, Budget("dice", settings["accuracy_budget"]),
                                      method=method, placement=settings["placement"],
                                      keep_policy_float=False, keep_float=keep_float, ranges=ranges,
                                      volumes=arrays, roi=spec.roi_size, overlap=spec.overlap,
                                      output_kind=spec.label_rule(), progress_callback=progress)
        qdq_summary = sensitivity.report
        sensitivity_report = sensitivity_summary(sensitivity)
    else:
        qdq_summary = quantize_onnx(fp32_onnx, quantized, ranges, placement=settings["placement"],
                                    weight_quant=weight_quant, keep_float=keep_float).to_dict()
    qdq_summary["method"] = method  # the ranges were handed over as a table: name the method that made them
    spec.save(sidecar_path(quantized))
    check = _check_build(fp32_onnx, quantized, arrays, spec, calibration, progress)
    report = {
        "model": str(loaded.source),
        "model_sha256": file_sha256(loaded.source),
        "spec_source": loaded.spec_origin,
        "settings": settings,
        "calibration": [_source_name(source) for source in calibration],
        "calibration_method": method_record,
        # Patches already drawn (a volume no larger than the roi gives one) are not repeated.
        "crops": {"requested": settings["num_crops"], "distinct": len(crops)},
        "size_mb": {"fp32_onnx": file_size_mb(fp32_onnx), "quantized_onnx": file_size_mb(quantized)},
        "qdq": qdq_summary,
        "self_check": check.to_dict(),
        "warnings": warnings,
    }
    if sensitivity_report is not None:
        report["sensitivity"] = sensitivity_report
    if lowbit_report is not None:
        report["lowbit"] = lowbit_report
        report["size_mb"]["packed_weights"] = file_size_mb(packed)
    return QuantizeResult(out_dir=folder, fp32_onnx=fp32_onnx, quantized_onnx=quantized, spec=spec,
                          report=report, packed_weights=packed)


def _check_build(fp32_onnx: Path, quantized: Path, arrays, spec: ModelSpec,
                 calibration: Sequence[VolumeSource], progress: Optional[ProgressCallback]):
    """OpenVINO's INT8 labels vs FP32's on (up to 4) calibration volumes, cached for this machine."""
    from . import selfcheck

    if progress is not None:
        progress("self-check", 0, 1)
    names = [_source_name(source) for source in calibration][:selfcheck.MAX_VOLUMES]
    check = selfcheck.run_check(fp32_onnx, quantized, arrays[:selfcheck.MAX_VOLUMES], spec, names=names)
    selfcheck.record(quantized, check)
    if progress is not None:
        progress("self-check", 1, 1)
    return check


def describe_self_check(check: Dict) -> str:
    """The build's self-check (``quantization.json``'s ``"self_check"``) in one or two lines."""
    from .selfcheck import SelfCheck

    result = SelfCheck.from_dict(check)
    lines = [result.summary()]
    if not result.passed:
        lines.append(result.refusal(Path("This build")))
    lines += [note for note in (result.warning(), result.speed_note()) if note]
    return "\n".join(lines)


def _source_name(source: VolumeSource) -> str:
    return source.name if isinstance(source, Volume) else str(source)


def sensitivity_summary(result) -> Dict:
    """What ``quantization.json`` keeps of a :class:`sensitivity.SensitivityResult`."""
    return {"budget_dice": result.budget.threshold, "met": result.met, "checked_on": result.checked_on,
            "full_int8_dice": result.full_int8.dice, "final_dice": result.final.dice,
            "layers_kept_float": [layer.name for layer in result.layers if layer.name in result.fallback],
            "nodes_kept_float": result.fallback, "layers_analysed": len(result.layers),
            "evaluations": result.evaluations, "seconds": result.seconds,
            "worst_layers": [{"name": layer.name, "op_type": layer.op_type, "relative_mse": layer.relative_mse,
                              "dice": layer.dice} for layer in result.layers[:5]]}


def describe_sensitivity(summary: Dict) -> str:
    """The accuracy-budget outcome (a :func:`sensitivity_summary`) in one line for the user."""
    where = "calibration volumes" if summary.get("checked_on") == "volumes" else "calibration crops"
    budget, final = summary["budget_dice"], summary["final_dice"]
    if not summary["met"]:
        # mixed_precision then writes the fully quantized model: no count of float layers met the budget.
        return (f"Accuracy budget {budget} not met on the {where}: agreement with FP32 "
                f"{summary['full_int8_dice']:.4f} fully INT8, {final:.4f} with all "
                f"{summary['layers_analysed']} layers in float. The model is fully INT8; lower the budget "
                "or run FP32.")
    layers = summary["layers_kept_float"]
    if not layers:
        return f"Agreement with FP32 on the {where}: {final:.4f} (budget {budget}); no layer kept float."
    if len(layers) == summary["layers_analysed"]:
        return (f"Accuracy budget {budget} met on the {where} only with all {len(layers)} layers kept float "
                f"(fully INT8: {summary['full_int8_dice']:.4f}), so nothing runs in INT8. Lower the budget to "
                "keep some layers INT8, or run FP32.")
    return (f"Agreement with FP32 on the {where}: {final:.4f} (budget {budget}, "
            f"{summary['full_int8_dice']:.4f} fully INT8); {len(layers)} of {summary['layers_analysed']} "
            f"layers kept float: {', '.join(layers)}.")


def _check_channels(arrays, spec: ModelSpec, sources) -> None:
    for array, source in zip(arrays, sources):
        if array.shape[0] != spec.in_channels:
            raise PTQError(f"Volume {source} gives {array.shape[0]} channel(s) but the model takes "
                           f"{spec.in_channels}. Give volumes of the modality the model was trained on.")


def _onnx_out_channels(path: Path, default: int) -> int:
    import onnx

    dims = onnx.load(str(path), load_external_data=False).graph.output[0].type.tensor_type.shape.dim
    return int(dims[1].dim_value) if len(dims) > 1 and dims[1].dim_value > 0 else default


def _publish(result: QuantizeResult, staging: Path, out_dir: Path, whole_folder: bool) -> QuantizeResult:
    """Seal the finished build in ``staging`` (report, then manifest) and publish it into ``out_dir``:
    the cache folder with one rename, a user's folder file by file with the manifest last."""
    files = {"fp32_onnx": result.fp32_onnx, "quantized_onnx": result.quantized_onnx,
             "spec": sidecar_path(result.quantized_onnx)}
    if result.packed_weights is not None:
        files["packed_weights"] = result.packed_weights
    result.report["files"] = {key: path.name for key, path in files.items()}
    (staging / REPORT_NAME).write_text(json.dumps(result.report, indent=2))
    build_cache.seal(staging)
    if whole_folder:
        build_cache.publish_folder(staging, out_dir)
    else:
        build_cache.publish_files(staging, out_dir)
    moved = {key: out_dir / path.name for key, path in files.items()}
    return QuantizeResult(out_dir=out_dir, fp32_onnx=moved["fp32_onnx"], quantized_onnx=moved["quantized_onnx"],
                          spec=result.spec, report=result.report, packed_weights=moved.get("packed_weights"))


def model_spec_for(model_path: Path, spec_file: Optional[Path] = None, modality: Optional[str] = None) -> ModelSpec:
    """The spec of a model file (``spec_file``, else beside it), or a clear error if there is none."""
    if spec_file is not None:
        return ModelSpec.load(Path(spec_file)).for_modality(modality)
    candidate = find_sidecar(Path(model_path))
    if candidate is None:
        from .models import missing_spec_message

        raise PTQError(missing_spec_message(Path(model_path)))
    return ModelSpec.load(candidate).for_modality(modality)


def default_backend(model_path: Path) -> str:
    """OpenVINO for ONNX files (real INT8 kernels on the CPU), torch for TorchScript."""
    return "openvino" if Path(model_path).suffix.lower() == ".onnx" else "torch"


def segment(model_path: Union[str, Path], volume: VolumeSource, runtime: Optional[str] = None,
            precision: Optional[str] = None, batch_size: int = 1, threads: Optional[int] = None,
            progress: Optional[ProgressCallback] = None, self_check: bool = True,
            spec_file: Optional[Path] = None, modality: Optional[str] = None) -> Tuple[Volume, Dict]:
    """Segment one volume; returns the label map on the input grid and timings (s).

    A quantized model is first checked on this machine and runtime
    (:func:`ensure_checked`, cached); ``self_check=False`` skips that. The
    timings dict carries the check's summary as ``"self_check"`` and the
    plausibility warnings (:mod:`plausibility`) as ``"warnings"``.
    ``spec_file`` and ``modality`` choose the metadata as in :func:`model_spec_for`.
    A regression model returns a float volume instead of labels.
    """
    from .inference import segment_volume
    from .runtimes import create_runtime

    from . import plausibility

    model_path = Path(model_path)
    spec = model_spec_for(model_path, spec_file, modality)
    runtime = runtime or default_backend(model_path)
    image = read_any(volume)
    warnings = plausibility.check(image, spec)
    engine = create_runtime(model_path, runtime, precision=precision, threads=threads, batch_size=batch_size)
    try:
        check = ensure_checked(model_path, runtime, spec, image, threads, progress) \
            if self_check and engine.precision == "int8" else "not self-checked: " + (
                "turned off" if engine.precision == "int8" else "a float model")
        labels, timings = segment_volume(engine, image, spec, batch_size=batch_size,
                                         progress_callback=progress)
    finally:
        engine.close()
    timings["self_check"] = check
    timings["warnings"] = warnings
    return labels, timings


def ensure_checked(model_path: Path, runtime: str, spec: ModelSpec, image: Volume,
                   threads: Optional[int] = None, progress: Optional[ProgressCallback] = None) -> str:
    """Self-check a quantized file on this machine and runtime; PTQError when it fails.

    Runs once per file, machine and runtime: on the build's calibration
    volumes where they still exist, else on ``image``. Returns the check's
    one-line summary, or a sentence saying why no check could run (no FP32
    model beside the file, or a runtime checked elsewhere).
    """
    from . import selfcheck

    if runtime not in selfcheck.CHECKED_RUNTIMES:
        return f"not self-checked: {runtime} is checked by benchmarks/gpu_check.py"
    check = selfcheck.recorded(model_path, runtime)
    if check is None:
        build = _build_report(model_path)
        fp32_onnx = model_path.parent / build.get("files", {}).get("fp32_onnx", "model.fp32.onnx")
        if not fp32_onnx.is_file():
            return f"not self-checked: no FP32 model beside {model_path.name} ({fp32_onnx.name}) to compare with"
        sources = [Path(name) for name in build.get("calibration", []) if Path(name).is_file()]
        sources = sources[:selfcheck.MAX_VOLUMES] or [image]
        if progress is not None:
            progress("self-check", 0, 1)
        check = selfcheck.run_check(fp32_onnx, model_path, prepared_arrays(sources, spec), spec,
                                    runtime=runtime, threads=threads,
                                    names=[_source_name(source) for source in sources])
        selfcheck.record(model_path, check)
        if progress is not None:
            progress("self-check", 1, 1)
    if not check.passed:
        raise PTQError(check.refusal(model_path))
    return "\n".join(line for line in (check.summary(), check.speed_note()) if line)


def _build_report(model_path: Path) -> Dict:
    """``quantization.json`` of the build ``model_path`` belongs to ({} if none or unreadable)."""
    try:
        return json.loads((model_path.parent / REPORT_NAME).read_text())
    except (OSError, ValueError):
        return {}


def write_outputs(labels: Volume, spec: ModelSpec, out: Path) -> List[Path]:
    """Write a label map (NIfTI/NRRD by extension); ``.seg.nrrd`` writes a Slicer segmentation."""
    out = Path(out)
    if spec.output == "regression" and out.name.endswith(".seg.nrrd"):
        raise PTQError(f"Model {spec.name} gives a regression map (a float volume), not segments; write it as "
                       f".nii.gz or .nrrd instead of {out.name}.")
    if out.name.endswith(".seg.nrrd"):
        from .segmentation_io import write_seg_nrrd

        write_seg_nrrd(labels, spec, out)
    else:
        from .volumes import write_volume

        write_volume(labels, out)
    return [out]
