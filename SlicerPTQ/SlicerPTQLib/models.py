"""Load a network from any source a user brings, with its ModelSpec.

Sources: a TorchScript file, an ONNX file, a MONAI bundle folder
(``configs/inference.json`` + ``models/model.pt``), or a MONAI architecture
name with its constructor arguments plus a state-dict file (loaded with
``weights_only=True``). The spec comes from a file the user names
(``--spec``), else from the sidecar next to the model
(:func:`spec.find_sidecar`), else from the bundle's metadata, else
defaults, which a caller may refuse (``require_spec``).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from .errors import PTQError
from .fetch import sha256_of
from .spec import Intensity, ModelSpec, find_sidecar, sidecar_candidates, sidecar_path, spec_list

TORCH_SUFFIXES = (".pt", ".pth", ".ts", ".ckpt")


@dataclass
class LoadedModel:
    """A network ready for export: either a torch module or an ONNX file."""

    source: Path
    spec: ModelSpec
    module: Any = None  # torch.nn.Module or torch.jit.ScriptModule
    onnx_path: Optional[Path] = None
    #: Where the spec came from, for the user: a file, "bundle metadata", "defaults".
    spec_origin: str = "given"

    @property
    def kind(self) -> str:
        return "onnx" if self.onnx_path is not None else "torch"


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file; a folder (bundle) hashes its files' names and hashes in name order."""
    path = Path(path)
    if path.is_file():
        return sha256_of(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(sha256_of(file).encode())
    return digest.hexdigest()


def load_model(source, arch: Optional[str] = None, arch_args: Optional[Dict[str, Any]] = None,
               spec: Optional[ModelSpec] = None, trust_bundle_code: bool = False,
               spec_file: Optional[Path] = None, require_spec: bool = False) -> LoadedModel:
    """Load ``source`` (path) into a :class:`LoadedModel`.

    ``arch`` + ``arch_args`` build a MONAI network (e.g. ``"UNet"``,
    ``{"spatial_dims": 3, ...}``) into which ``source``, a state dict, is
    loaded. ``spec`` overrides the metadata found beside the model. A MONAI
    bundle's configs are read as data (:mod:`bundle_config`); only with
    ``trust_bundle_code`` may MONAI evaluate the Python expressions in them.
    ``spec_file`` names the metadata JSON (checked before the model is
    read); ``require_spec`` refuses a model with no metadata at all instead
    of using defaults.
    """
    path = Path(source)
    if not path.exists():
        raise PTQError(f"Model not found: {path}. Give the path of a TorchScript (.pt), ONNX (.onnx) "
                       "file, a MONAI bundle folder, or a state dict with --arch.")
    origin = "given"
    if spec is None and spec_file is not None:
        spec, origin = ModelSpec.load(Path(spec_file)), str(spec_file)
    elif spec is None and not path.is_dir():
        found = find_sidecar(path)
        if found is None and require_spec:
            raise PTQError(missing_spec_message(path))
        if found is not None:
            spec, origin = ModelSpec.load(found), str(found)
        else:
            origin = "defaults"
    loaded = _load_any(path, arch, arch_args, spec, trust_bundle_code)
    if loaded.spec_origin == "given":
        loaded.spec_origin = origin
    loaded.spec.check(loaded.spec_origin if loaded.spec_origin not in ("given", "defaults")
                      else "the model metadata")
    return loaded


def missing_spec_message(path: Path, given_with: str = "--spec FILE") -> str:
    """The refusal for a model with no metadata: where it was looked for and how to write one
    (``given_with``: how this caller names a metadata file)."""
    looked = " or ".join(candidate.name for candidate in sidecar_candidates(path))
    example = json.dumps({"name": path.name.split(".")[0], "out_channels": 2, "roi_size": [96, 96, 96],
                          "modality": "MR", "intensity": {"kind": "zscore"}, "output": "softmax",
                          "labels": {"1": "foreground"}})
    return (f"No model metadata for {path} (looked for {looked} beside it); write a JSON file such as "
            f"{example} (every field: docs/model-metadata.md) and pass it with {given_with} or save it as "
            f"{sidecar_candidates(path)[0].name}.")


def _load_any(path: Path, arch, arch_args, spec: Optional[ModelSpec], trust_bundle_code: bool) -> LoadedModel:
    if path.is_dir():
        return _load_bundle(path, spec, trust_bundle_code)
    if arch is not None:
        return _load_state_dict(path, arch, arch_args or {}, spec)
    if path.suffix.lower() == ".onnx":
        return _load_onnx(path, spec)
    if path.suffix.lower() in TORCH_SUFFIXES:
        return _load_torchscript(path, spec)
    raise PTQError(f"Cannot tell what kind of model {path} is from its extension '{path.suffix}'. "
                   f"Use .onnx, one of {TORCH_SUFFIXES} (TorchScript, or a state dict with --arch NAME), "
                   "or a MONAI bundle folder.")


def _spec_beside(path: Path, override: Optional[ModelSpec]) -> ModelSpec:
    if override is not None:
        return override
    return ModelSpec(name=path.name.split(".")[0])


def _load_onnx(path: Path, spec: Optional[ModelSpec]) -> LoadedModel:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for corrupt files
        raise PTQError(f"{path} is not a readable ONNX file ({exc}). Re-export the model.") from exc
    if not model.graph.node:  # an empty file parses as an empty model: say so here, under the user's name
        raise PTQError(f"{path} holds no ONNX graph ({path.stat().st_size} bytes): the export or copy did not "
                       "finish. Re-export the model.")
    return LoadedModel(source=path, spec=_spec_beside(path, spec), onnx_path=path)


def _load_torchscript(path: Path, spec: Optional[ModelSpec]) -> LoadedModel:
    import torch

    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as exc:
        if _looks_like_state_dict(path):
            raise PTQError(f"{path} holds weights only (a state dict), not a TorchScript model. "
                           "Name its architecture: --arch UNet --arch-args '{...}'.") from exc
        raise PTQError(f"Cannot load {path} as TorchScript ({exc}). Export it with torch.jit.script/trace, "
                       "or give an ONNX file.") from exc
    module.eval()
    return LoadedModel(source=path, spec=_spec_beside(path, spec), module=module)


def _looks_like_state_dict(path: Path) -> bool:
    """A ``torch.save`` file: a zip with ``data.pkl`` and no TorchScript ``constants.pkl``, or a legacy pickle."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as handle:
            return handle.read(1) == b"\x80"  # pickle's PROTO opcode: torch.save before zip files
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(name.endswith("data.pkl") for name in names) and not any(name.endswith("constants.pkl")
                                                                         for name in names)


def build_monai_network(arch: str, arch_args: Dict[str, Any]):
    """Instantiate ``arch``: a registry entry (``architectures.REGISTRY``, with
    its export rules) or any other ``monai.networks.nets`` class."""
    from . import architectures
    from monai.networks import nets

    if arch_args.get("pretrained"):
        raise PTQError(f"--arch-args asks {arch} for pretrained weights, which would be downloaded from a model "
                       "hub; SlicerPTQ loads the weights from the state dict you give. Drop \"pretrained\".")
    if architectures.ALIASES.get(arch, arch) in architectures.REGISTRY:
        return architectures.build(arch, arch_args)
    constructor = getattr(nets, arch, None) if not arch.startswith("_") else None
    if not _is_network_class(constructor):
        known = sorted(set(architectures.REGISTRY) | {name for name in dir(nets)
                                                      if name[0].isupper() and _is_network_class(getattr(nets, name))})
        problem = (f"Unknown architecture '{arch}'" if constructor is None else
                   f"'{arch}' is not a network (--arch takes a torch.nn.Module class of monai.networks.nets)")
        raise PTQError(f"{problem}. Known networks: {', '.join(known)}.")
    try:
        return constructor(**arch_args)
    except TypeError as exc:
        raise PTQError(f"Bad arguments for {arch}: {exc}. Pass them as JSON with --arch-args.") from exc


def _is_network_class(candidate) -> bool:
    import torch

    return isinstance(candidate, type) and issubclass(candidate, torch.nn.Module)


def _load_weights_into(module, weights: Path) -> None:
    import torch

    try:
        state = torch.load(str(weights), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors vary by file
        raise PTQError(_weights_error(weights, exc)) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # Lightning / MONAI checkpoint layout
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise PTQError(f"Weights {weights} do not fit the architecture: {str(exc)[:500]}. "
                       "Check --arch and --arch-args against how the network was trained.") from exc
    module.eval()


def _weights_error(weights: Path, exc: Exception) -> str:
    """Why ``weights`` cannot be read, in our words: torch's own text advises ``weights_only=False``,
    which would run the pickled code, so it never reaches the user."""
    text = str(exc)
    if "weights_only" in text or "Unsupported global" in text or "Unsupported operand" in text:
        return (f"Weights {weights} hold pickled Python objects besides tensors, which SlicerPTQ does not load "
                "because unpickling them can run code. Save the state dict only "
                "(torch.save(model.state_dict(), path)), or export TorchScript or ONNX.")
    first_line = text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__
    return f"Cannot read weights {weights} ({first_line}). Give a state dict saved with torch.save."


def _load_state_dict(path: Path, arch: str, arch_args: Dict[str, Any], spec: Optional[ModelSpec]) -> LoadedModel:
    module = build_monai_network(arch, arch_args)
    _load_weights_into(module, path)
    model_spec = _spec_beside(path, spec)
    model_spec.in_channels = int(arch_args.get("in_channels", model_spec.in_channels))
    model_spec.out_channels = int(arch_args.get("out_channels", model_spec.out_channels))
    return LoadedModel(source=path, spec=model_spec, module=module)


def _load_bundle(folder: Path, spec: Optional[ModelSpec], trust_bundle_code: bool = False) -> LoadedModel:
    from .bundle_config import BundleConfig, TrustedBundleConfig

    config_file = next((folder / "configs" / name for name in ("inference.json", "inference.yaml", "inference.yml")
                        if (folder / "configs" / name).is_file()), None)
    if config_file is None:
        raise PTQError(f"{folder} is not a MONAI bundle: configs/inference.json (or .yaml) is missing.")
    metadata_file = folder / "configs" / "metadata.json"
    metadata = metadata_file if metadata_file.is_file() else None
    config = (TrustedBundleConfig(config_file, folder, metadata) if trust_bundle_code
              else BundleConfig.read(config_file, folder, metadata))
    torchscript = folder / "models" / "model.ts"
    weights = folder / "models" / "model.pt"
    if torchscript.is_file():
        loaded = _load_torchscript(torchscript, spec or ModelSpec(name=folder.name))
        module = loaded.module
    elif weights.is_file():
        module = config.network("network_def")
        _load_weights_into(module, weights)
    else:
        raise PTQError(f"Bundle {folder} has no models/model.pt or models/model.ts.")
    origin = "given"
    if spec is None:
        beside = sidecar_path(folder)
        spec, origin = (ModelSpec.load(beside), str(beside)) if beside.is_file() else \
            (bundle_spec(config, folder.name), f"the bundle metadata of {folder}")
    return LoadedModel(source=folder, spec=spec, module=module, spec_origin=origin)


def bundle_spec(config, name: str) -> ModelSpec:
    """Translate a bundle's metadata and inference config (a :class:`bundle_config.BundleConfig`) into a
    ModelSpec; only the keys read here are resolved, so code elsewhere in the config never runs."""
    spec = ModelSpec(name=name)
    meta = config.raw("_meta_", {}) or {}
    data_format = meta.get("network_data_format", {})
    image = next(iter(data_format.get("inputs", {}).values()), {})
    pred = next(iter(data_format.get("outputs", {}).values()), {})
    spec.in_channels = int(image.get("num_channels", spec.in_channels))
    spec.out_channels = int(pred.get("num_channels", spec.out_channels))
    spec.modality = str(image.get("modality", spec.modality))
    channel_def = pred.get("channel_def") or {}
    labels = {int(k): str(v) for k, v in channel_def.items() if int(k) > 0}
    if labels:
        spec.labels = labels
    spec.description = str(meta.get("description", ""))
    for key, transform in _walk_transforms(config.raw("preprocessing", {}), "preprocessing"):
        _apply_transform(spec, key, transform, config)
    if isinstance(config.raw("inferer"), dict) and "roi_size" in config.raw("inferer"):
        spec.roi_size = tuple(spec_list(config.value("inferer::roi_size")))
        spec.overlap = float(config.value("inferer::overlap", spec.overlap))
    postprocessing = json.dumps(config.raw("postprocessing", {}))
    spec.output = "sigmoid" if "sigmoid" in postprocessing.lower() and "softmax" not in postprocessing.lower() \
        else "softmax"
    return spec


def _walk_transforms(node, key: str):
    """``(config key, transform)`` for every mapping with a ``_target_`` under ``node``."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield key, node
        for name, value in node.items():
            yield from _walk_transforms(value, f"{key}::{name}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk_transforms(value, f"{key}::{index}")


def _apply_transform(spec: ModelSpec, key: str, transform: dict, config) -> None:
    target = str(transform["_target_"]).split(".")[-1]

    def arg(name, default=None):
        return config.value(f"{key}::{name}", default)

    if target in ("Orientationd", "Orientation"):
        spec.orientation = str(arg("axcodes", "RAS"))
    elif target in ("Spacingd", "Spacing"):
        spec.spacing = tuple(float(v) for v in arg("pixdim"))
    elif target in ("ScaleIntensityRanged", "ScaleIntensityRange"):
        spec.intensity = Intensity(kind="clip_scale", **{
            name: float(arg(name)) for name in ("a_min", "a_max", "b_min", "b_max") if name in transform})
    elif target in ("NormalizeIntensityd", "NormalizeIntensity"):
        spec.intensity = Intensity(kind="zscore", nonzero=bool(arg("nonzero", False)))
