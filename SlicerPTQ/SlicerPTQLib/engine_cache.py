"""A folder of built TensorRT engines, keyed by everything that shapes them.

An engine is only valid for the exact model file, precision settings,
TensorRT version, GPU (name and compute capability), input profile and
builder settings it was built with. Each entry is ``<digest>.engine`` plus a
``<digest>.engine.json`` sidecar holding the full key and the engine's
SHA-256. A lookup re-reads both and rebuilds (never loads) an entry whose
sidecar is missing, unreadable, for another key, or whose engine file is
truncated or altered. Files are written to a temporary name in the same
folder and renamed (``os.replace``), so a crash never leaves a half-written
engine under a real name. Pure Python: no TensorRT needed.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from .errors import PTQError
from .fetch import sha256_of

log = logging.getLogger(__name__)

ENGINE_SUFFIX = ".engine"
SIDECAR_FORMAT = 1
_TEMP_PREFIX = ".partial-"

#: ``build() -> (serialized engine bytes, metadata dict)``
EngineBuilder = Callable[[], Tuple[bytes, Dict[str, Any]]]


@dataclass(frozen=True)
class EngineKey:
    """Everything a serialized engine depends on.

    ``quantization`` holds the precision and the settings that produced the
    model file (calibration method, placement, ...); ``profile`` the
    optimization profile (``{"input": name, "min": shape, "opt": shape,
    "max": shape}``); ``builder`` the builder settings (optimization level,
    workspace). All values must be JSON-serializable.
    """

    model_sha256: str
    quantization: Dict[str, Any]
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    profile: Dict[str, Any]
    builder: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        """The key as plain JSON data (tuples become lists)."""
        raw = {"model_sha256": self.model_sha256, "quantization": self.quantization,
               "tensorrt_version": self.tensorrt_version, "gpu_name": self.gpu_name,
               "compute_capability": self.compute_capability, "profile": self.profile,
               "builder": self.builder}
        try:
            return json.loads(json.dumps(raw, sort_keys=True))
        except (TypeError, ValueError) as exc:
            raise PTQError(f"Engine cache key holds a value that is not JSON data ({exc}); "
                           "pass numbers, strings, lists and dicts only.") from exc

    def digest(self) -> str:
        """SHA-256 of the canonical JSON of the key."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass
class CachedEngine:
    """An engine file that passed validation, with its sidecar metadata."""

    engine_path: Path
    sidecar_path: Path
    metadata: Dict[str, Any]
    built: bool

    def read_bytes(self) -> bytes:
        return self.engine_path.read_bytes()


class EngineCache:
    """Validated, atomically written engines under one folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def paths(self, key: EngineKey) -> Tuple[Path, Path]:
        """``(engine file, sidecar file)`` for ``key``."""
        engine_path = self.folder / (key.digest()[:32] + ENGINE_SUFFIX)
        return engine_path, sidecar_for(engine_path)

    def lookup(self, key: EngineKey) -> Optional[CachedEngine]:
        """The valid entry for ``key``, or None (an invalid entry is deleted)."""
        engine_path, sidecar = self.paths(key)
        if not engine_path.exists() and not sidecar.exists():
            return None
        problem = validate_entry(engine_path, sidecar, key)
        if problem is not None:
            log.warning("Discarding cached TensorRT engine %s: %s; it will be rebuilt.", engine_path.name, problem)
            _remove(engine_path, sidecar)
            return None
        return CachedEngine(engine_path, sidecar, json.loads(sidecar.read_text())["metadata"], built=False)

    def store(self, key: EngineKey, engine: bytes, metadata: Optional[Dict[str, Any]] = None) -> CachedEngine:
        """Write ``engine`` and its sidecar atomically; the sidecar goes last.

        If either write fails, neither file is left behind under its real
        name and no temporary file stays in the folder.
        """
        if not isinstance(engine, (bytes, bytearray, memoryview)) or len(engine) == 0:
            raise PTQError("The TensorRT builder returned no engine bytes; see the TensorRT log above "
                           "for the layer that failed.")
        self.folder.mkdir(parents=True, exist_ok=True)
        engine_path, sidecar = self.paths(key)
        engine = bytes(engine)
        record = {
            "format": SIDECAR_FORMAT,
            "key": key.to_dict(),
            "key_digest": key.digest(),
            "engine_file": engine_path.name,
            "engine_bytes": len(engine),
            "engine_sha256": hashlib.sha256(engine).hexdigest(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "metadata": dict(metadata or {}),
        }
        try:
            sidecar_text = json.dumps(record, indent=2, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise PTQError(f"Engine metadata is not JSON data ({exc}).") from exc
        try:
            write_atomic(engine_path, engine)
            write_atomic(sidecar, sidecar_text.encode())
        except BaseException:
            _remove(engine_path, sidecar)
            raise
        return CachedEngine(engine_path, sidecar, record["metadata"], built=True)

    def get_or_build(self, key: EngineKey, build: EngineBuilder) -> CachedEngine:
        """The cached engine for ``key``; calls ``build()`` and stores it on a miss."""
        hit = self.lookup(key)
        if hit is not None:
            return hit
        engine, metadata = build()
        return self.store(key, engine, metadata)

    def timing_cache_path(self, tensorrt_version: str, gpu_name: str, compute_capability: str) -> Path:
        """Where the tactic timing cache of one TensorRT version and GPU lives."""
        label = f"{tensorrt_version}|{gpu_name}|{compute_capability}"
        return self.folder / f"timing-{hashlib.sha256(label.encode()).hexdigest()[:16]}.cache"


def sidecar_for(engine_path: Path) -> Path:
    """The metadata file of an engine: ``net.engine`` -> ``net.engine.json``."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def read_sidecar(engine_path: Path) -> Dict[str, Any]:
    """The validated sidecar record of a standalone engine file, or PTQError saying why not."""
    engine_path = Path(engine_path)
    problem = validate_entry(engine_path, sidecar_for(engine_path))
    if problem is not None:
        raise PTQError(f"Will not load the TensorRT engine {engine_path}: {problem}. Give the ONNX model "
                       "instead; its engine is rebuilt and cached.")
    return json.loads(sidecar_for(engine_path).read_text())


def validate_entry(engine_path: Path, sidecar: Path, key: Optional[EngineKey] = None) -> Optional[str]:
    """Why an engine file and its sidecar cannot be trusted, or None if they can.

    Checks that the sidecar parses, matches ``key`` (when given) and
    describes exactly this engine file (size and SHA-256).
    """
    if not sidecar.is_file():
        return "its metadata sidecar is missing"
    if not engine_path.is_file():
        return "its engine file is missing"
    try:
        record = json.loads(sidecar.read_text())
    except (OSError, ValueError) as exc:
        return f"its metadata sidecar is unreadable ({exc})"
    if not isinstance(record, dict) or record.get("format") != SIDECAR_FORMAT:
        return "its metadata sidecar has an unknown format"
    if key is not None and record.get("key") != key.to_dict():
        return "it was built for other settings, another model file, TensorRT version or GPU"
    size = engine_path.stat().st_size
    if record.get("engine_bytes") != size:
        return f"the engine file has {size} bytes, its sidecar says {record.get('engine_bytes')} (truncated?)"
    if record.get("engine_sha256") != sha256_of(engine_path):
        return "the engine file's SHA-256 differs from its sidecar (corrupted or replaced)"
    if not isinstance(record.get("metadata"), dict):
        return "its metadata sidecar has no metadata"
    return None


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``.

    Creates the folder if needed; on any failure the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp_name, path)
    except BaseException:
        try:
            os.unlink(temp_name)
        except FileNotFoundError:
            pass
        raise


def _remove(*paths: Path) -> None:
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
