"""The TensorRT engine cache: keys, validation, rebuilds and atomic writes (CPU only).

The builder here is a counting callable returning bytes, which is all the
cache sees of TensorRT; these tests exercise the cache's own logic.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from SlicerPTQLib import engine_cache
from SlicerPTQLib.engine_cache import EngineCache, EngineKey, read_sidecar, sidecar_for
from SlicerPTQLib.errors import PTQError

ENGINE = bytes(range(256)) * 40


def make_key(**changes) -> EngineKey:
    key = EngineKey(
        model_sha256="ab" * 32,
        quantization={"precision": "int8", "producer_settings": {"method": "max", "placement": "tensorrt"}},
        tensorrt_version="10.13.3.9",
        gpu_name="NVIDIA RTX A4000",
        compute_capability="8.6",
        profile={"input": "input", "min": [1, 1, 96, 96, 96], "opt": [2, 1, 96, 96, 96],
                 "max": [2, 1, 96, 96, 96]},
        builder={"optimization_level": 3, "workspace_mib": 4096},
    )
    return dataclasses.replace(key, **changes)


class CountingBuilder:
    def __init__(self, payload: bytes = ENGINE) -> None:
        self.calls = 0
        self.payload = payload

    def __call__(self):
        self.calls += 1
        return self.payload, {"build_seconds": 1.5, "call": self.calls}


def test_digest_changes_with_every_field():
    base = make_key()
    variants = {
        "model_sha256": make_key(model_sha256="cd" * 32),
        "quantization": make_key(quantization={"precision": "int8",
                                               "producer_settings": {"method": "entropy"}}),
        "precision": make_key(quantization={"precision": "fp16", "producer_settings": {}}),
        "tensorrt_version": make_key(tensorrt_version="11.4.0.106"),
        "gpu_name": make_key(gpu_name="NVIDIA GeForce RTX 4090"),
        "compute_capability": make_key(compute_capability="8.9"),
        "profile": make_key(profile={"input": "input", "min": [1, 1, 96, 96, 96], "opt": [4, 1, 96, 96, 96],
                                     "max": [4, 1, 96, 96, 96]}),
        "builder": make_key(builder={"optimization_level": 5, "workspace_mib": 4096}),
    }
    digests = {name: key.digest() for name, key in variants.items()}
    assert base.digest() not in digests.values()
    assert len(set(digests.values())) == len(digests)


def test_digest_is_stable_and_ignores_dict_order():
    reordered = make_key(quantization={"producer_settings": {"placement": "tensorrt", "method": "max"},
                                       "precision": "int8"})
    assert reordered.digest() == make_key().digest()
    assert make_key(profile={"input": "input", "min": (1, 1, 96, 96, 96), "opt": (2, 1, 96, 96, 96),
                             "max": (2, 1, 96, 96, 96)}).digest() == make_key().digest()


def test_key_with_non_json_value_is_refused():
    with pytest.raises(PTQError, match="not JSON"):
        make_key(builder={"logger": object()}).digest()


def test_build_once_then_hit(tmp_path):
    cache = EngineCache(tmp_path)
    builder = CountingBuilder()
    first = cache.get_or_build(make_key(), builder)
    second = cache.get_or_build(make_key(), builder)
    assert builder.calls == 1
    assert first.built and not second.built
    assert second.read_bytes() == ENGINE
    assert second.metadata == {"build_seconds": 1.5, "call": 1}
    record = json.loads(first.sidecar_path.read_text())
    assert record["key"] == make_key().to_dict()
    assert record["engine_bytes"] == len(ENGINE)


def test_other_key_builds_its_own_entry(tmp_path):
    cache = EngineCache(tmp_path)
    builder = CountingBuilder()
    cache.get_or_build(make_key(), builder)
    other = cache.get_or_build(make_key(compute_capability="9.0"), builder)
    assert builder.calls == 2 and other.built
    assert len(list(tmp_path.glob("*.engine"))) == 2


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "delete_sidecar", "garbage_sidecar",
                                    "sidecar_for_other_key", "delete_engine"])
def test_corrupt_entry_is_rebuilt_not_loaded(tmp_path, damage):
    cache = EngineCache(tmp_path)
    builder = CountingBuilder()
    entry = cache.get_or_build(make_key(), builder)
    engine_path, sidecar = entry.engine_path, entry.sidecar_path
    if damage == "truncate":
        engine_path.write_bytes(ENGINE[: len(ENGINE) // 2])
    elif damage == "flip_byte":
        data = bytearray(ENGINE)
        data[100] ^= 0xFF
        engine_path.write_bytes(bytes(data))
    elif damage == "delete_sidecar":
        sidecar.unlink()
    elif damage == "garbage_sidecar":
        sidecar.write_text("{not json")
    elif damage == "sidecar_for_other_key":
        record = json.loads(sidecar.read_text())
        record["key"]["tensorrt_version"] = "8.6.1"
        sidecar.write_text(json.dumps(record))
    elif damage == "delete_engine":
        engine_path.unlink()
    assert cache.lookup(make_key()) is None
    rebuilt = cache.get_or_build(make_key(), builder)
    assert builder.calls == 2 and rebuilt.built
    assert rebuilt.read_bytes() == ENGINE
    assert cache.get_or_build(make_key(), builder).built is False


def test_failed_write_leaves_no_files(tmp_path, monkeypatch):
    cache = EngineCache(tmp_path)
    real_replace = os.replace

    def replace_engine_then_fail(source, destination):
        if str(destination).endswith(".json"):
            raise OSError(28, "No space left on device")
        real_replace(source, destination)

    monkeypatch.setattr(engine_cache.os, "replace", replace_engine_then_fail)
    with pytest.raises(OSError, match="No space"):
        cache.get_or_build(make_key(), CountingBuilder())
    assert list(tmp_path.iterdir()) == []


def test_failed_engine_write_leaves_no_temp_file(tmp_path, monkeypatch):
    def fail(*_args):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(engine_cache.os, "fsync", fail)
    with pytest.raises(OSError):
        EngineCache(tmp_path).store(make_key(), ENGINE, {})
    assert list(tmp_path.iterdir()) == []


def test_builder_error_stores_nothing(tmp_path):
    def broken_builder():
        raise PTQError("TensorRT failed to build")

    with pytest.raises(PTQError):
        EngineCache(tmp_path).get_or_build(make_key(), broken_builder)
    assert list(tmp_path.iterdir()) == []


def test_empty_engine_is_refused(tmp_path):
    with pytest.raises(PTQError, match="no engine bytes"):
        EngineCache(tmp_path).get_or_build(make_key(), CountingBuilder(payload=b""))
    assert list(tmp_path.glob("*")) == []


def test_standalone_engine_needs_a_matching_sidecar(tmp_path):
    entry = EngineCache(tmp_path).store(make_key(), ENGINE, {"precision": "int8"})
    assert read_sidecar(entry.engine_path)["metadata"] == {"precision": "int8"}
    copy = tmp_path / "copy.engine"
    copy.write_bytes(ENGINE)
    with pytest.raises(PTQError, match="sidecar is missing"):
        read_sidecar(copy)
    sidecar_for(copy).write_text(entry.sidecar_path.read_text())
    copy.write_bytes(ENGINE[:-1])
    with pytest.raises(PTQError, match="truncated"):
        read_sidecar(copy)


def test_timing_cache_path_depends_on_version_and_gpu(tmp_path):
    cache = EngineCache(tmp_path)
    paths = {cache.timing_cache_path("10.13", "A4000", "8.6"), cache.timing_cache_path("10.13", "A4000", "8.9"),
             cache.timing_cache_path("11.4", "A4000", "8.6")}
    assert len(paths) == 3
    assert all(path.parent == tmp_path for path in paths)
