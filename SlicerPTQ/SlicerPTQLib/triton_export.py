"""A Triton Inference Server model repository from a quantized build.

``export_repository(build_dir, repo_dir)`` writes one model folder per
backend, each ``<name>_<backend>/config.pbtxt``, ``1/<model file>`` and
``slicer_ptq.json`` (the model's spec: preprocessing, patch size, labels):

- ``openvino``: the INT8 Q/DQ ONNX for Triton's OpenVINO backend (CPU);
- ``tensorrt``: a TensorRT engine as ``model.plan`` (``tensorrt_plan``,
  GPU), when the build has one or one is given;
- ``python``: the same ONNX run by this project's OpenVINO runtime in
  Triton's Python backend (:mod:`.triton_python_model`); the server in the
  ``nvidia-pytriton`` wheel has only that backend.

The spec also travels inside ``config.pbtxt`` (parameter
``slicer_ptq_spec``), so a client reads it from the server's model config
and segments without the original files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .atomic import make_public, staging_folder
from .errors import PTQError
from .spec import ModelSpec, sidecar_path

BACKENDS = ("openvino", "tensorrt", "python")
MARKER = "slicer_ptq_repository.json"
SPEC_PARAMETER = "slicer_ptq_spec"
ENGINE_SUFFIXES = (".plan", ".engine")
VERSION = "1"


def model_name(spec: ModelSpec, backend: str) -> str:
    """``<spec name>_<backend>`` with only the characters Triton model names allow."""
    base = re.sub(r"[^A-Za-z0-9_-]+", "_", spec.name).strip("_") or "model"
    return f"{base}_{backend}"


def _quantized_model(build_dir: Path) -> Path:
    report = build_dir / "quantization.json"
    if not report.is_file():
        raise PTQError(f"{build_dir} is not a build folder (no quantization.json). Give the --out folder of "
                       "slicer-ptq quantize.")
    try:
        name = json.loads(report.read_text())["files"]["quantized_onnx"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PTQError(f"Cannot read {report}: {exc}. Quantize the model again.") from exc
    path = build_dir / name
    if not path.is_file():
        raise PTQError(f"The build's quantized model {path} is missing. Quantize the model again.")
    return path


def _tensor(path: Path):
    """``(input name, output name, output channels)`` of an ONNX file."""
    import onnx

    from .export import onnx_input_spec

    info = onnx_input_spec(path)
    graph = onnx.load(str(path), load_external_data=False).graph
    if len(graph.output) != 1:
        raise PTQError(f"{path} has {len(graph.output)} outputs; Triton export supports one segmentation "
                       "output. Export the network with one output.")
    dims = graph.output[0].type.tensor_type.shape.dim
    channels = dims[1].dim_value if len(dims) > 1 and dims[1].HasField("dim_value") else None
    return info.name, graph.output[0].name, channels


def _quoted(text: str) -> str:
    """A protobuf text-format string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def config_text(name: str, spec: ModelSpec, input_name: str, output_name: str, backend: str,
                max_batch: int, dynamic_batching: bool, instances: int,
                parameters: Optional[Dict[str, str]] = None) -> str:
    """``config.pbtxt`` for one backend: FP32 patches ``[C, D, H, W]`` in and out, batched."""
    roi = list(spec.roi_size)
    head = {"openvino": 'backend: "openvino"\ndefault_model_filename: "model.onnx"',
            "tensorrt": 'platform: "tensorrt_plan"\ndefault_model_filename: "model.plan"',
            "python": 'backend: "python"'}[backend]
    kind = "KIND_GPU" if backend == "tensorrt" else "KIND_CPU"
    lines = [f"name: {_quoted(name)}", head, f"max_batch_size: {max_batch}",
             f"input [ {{ name: {_quoted(input_name)} data_type: TYPE_FP32 dims: {[spec.in_channels] + roi} }} ]",
             f"output [ {{ name: {_quoted(output_name)} data_type: TYPE_FP32 "
             f"dims: {[spec.out_channels] + roi} }} ]",
             f"instance_group [ {{ kind: {kind} count: {instances} }} ]"]
    if dynamic_batching:
        lines.append("dynamic_batching { max_queue_delay_microseconds: 2000 }")
    values = dict(parameters or {})
    values[SPEC_PARAMETER] = json.dumps(spec.to_dict(), sort_keys=True, ensure_ascii=False)
    for key, value in values.items():
        lines.append(f"parameters {{ key: {_quoted(key)} value: {{ string_value: {_quoted(value)} }} }}")
    return "\n".join(lines) + "\n"


def export_repository(build_dir: Path, repo_dir: Path, backends: Sequence[str] = ("openvino", "python"),
                      engine: Optional[Path] = None, max_batch: int = 8, dynamic_batching: bool = True,
                      instances: int = 1, threads: Optional[int] = None) -> Dict[str, Path]:
    """Write the repository for the build in ``build_dir``; returns ``{model name: folder}``.

    ``engine``: a TensorRT engine (``.plan``/``.engine``) to serve as
    ``<name>_tensorrt``; without it the build folder's own engine is used
    when there is one. ``repo_dir`` must be new, empty, or an earlier
    export (replaced whole; a half-written repository never appears).
    ``threads`` caps each Python-backend instance's CPU threads.
    """
    build_dir, repo_dir = Path(build_dir), Path(repo_dir)
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown or not backends:
        raise PTQError(f"Unknown Triton backend(s) {unknown or '(none)'}. Choose from: {', '.join(BACKENDS)}.")
    if max_batch < 1 or instances < 1:
        raise PTQError(f"--max-batch and --instances must be at least 1 (got {max_batch} and {instances}).")
    if not build_dir.is_dir():
        raise PTQError(f"Build folder {build_dir} not found. Give the --out folder of slicer-ptq quantize.")
    onnx_path = _quantized_model(build_dir)
    spec = ModelSpec.load(sidecar_path(onnx_path))
    input_name, output_name, channels = _tensor(onnx_path)
    if channels:
        spec.out_channels = channels
    engine = _engine(build_dir, engine)
    backends = list(backends)
    if engine is not None and "tensorrt" not in backends:
        backends.append("tensorrt")
    if "tensorrt" in backends and engine is None:
        raise PTQError(f"The tensorrt model needs a TensorRT engine and {build_dir} has none (.plan/.engine). "
                       "Give one with --engine, or leave tensorrt out of --backends.")
    _check_destination(repo_dir)
    repo_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(repo_dir.parent, label=f"{repo_dir.name}.")
    try:
        written = {}
        for backend in backends:
            name = model_name(spec, backend)
            folder = staging / name
            (folder / VERSION).mkdir(parents=True)
            parameters = None
            if backend == "openvino":
                shutil.copyfile(onnx_path, folder / VERSION / "model.onnx")
            elif backend == "tensorrt":
                shutil.copyfile(engine, folder / VERSION / "model.plan")
            else:
                shutil.copyfile(onnx_path, folder / VERSION / onnx_path.name)
                shutil.copyfile(Path(__file__).with_name("triton_python_model.py"), folder / VERSION / "model.py")
                parameters = {"model_file": onnx_path.name,
                              "slicer_ptq_path": str(Path(__file__).resolve().parent.parent)}
                if threads:
                    parameters["threads"] = str(threads)
            (folder / "config.pbtxt").write_text(config_text(name, spec, input_name, output_name, backend,
                                                             max_batch, dynamic_batching, instances, parameters))
            spec.save(folder / "slicer_ptq.json")
            written[name] = repo_dir / name
        (staging / MARKER).write_text(json.dumps({"build": str(build_dir.resolve()), "models": sorted(written),
                                                  "spec": spec.to_dict()}, indent=2))
        for path in [staging, *staging.rglob("*")]:
            make_public(path)
        _publish(staging, repo_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


def _engine(build_dir: Path, engine: Optional[Path]) -> Optional[Path]:
    if engine is not None:
        engine = Path(engine)
        if not engine.is_file() or engine.suffix.lower() not in ENGINE_SUFFIXES:
            raise PTQError(f"TensorRT engine {engine} not found or not a .plan/.engine file. Build one with "
                           "slicer-ptq segment --runtime tensorrt, or leave --engine out.")
        return engine
    found = sorted(path for path in build_dir.iterdir() if path.suffix.lower() in ENGINE_SUFFIXES)
    return found[0] if found else None


def _check_destination(repo_dir: Path) -> None:
    if repo_dir.exists() and not repo_dir.is_dir():
        raise PTQError(f"--repo {repo_dir} is a file. Give a folder for the model repository.")
    if repo_dir.is_dir() and any(repo_dir.iterdir()) and not (repo_dir / MARKER).is_file():
        raise PTQError(f"--repo {repo_dir} holds other files. Give a new or empty folder (an earlier "
                       "export there is replaced).")


def _publish(staging: Path, repo_dir: Path) -> None:
    """Rename the finished repository into place; an earlier export is swapped out, then removed."""
    old: Optional[Path] = None
    if repo_dir.exists():
        old = repo_dir.with_name(f".old-{repo_dir.name}-{os.getpid()}")
        os.replace(repo_dir, old)
    try:
        os.replace(staging, repo_dir)
    except OSError as exc:
        if old is not None:
            os.replace(old, repo_dir)
        raise PTQError(f"Cannot write the repository {repo_dir}: {exc}. Check permissions.") from exc
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def describe(written: Dict[str, Path]) -> List[str]:
    """One line per exported model, for the CLI."""
    return [f"{name}  {folder}" for name, folder in sorted(written.items())]
