"""fetch.py against the real registries: pinned hashes, cache, failures."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from SlicerPTQLib import fetch as fetch_module
from SlicerPTQLib.errors import PTQError
from SlicerPTQLib.fetch import Source, fetch, sha256_of

# six 1.16.0: an 11 kB wheel, cheap to download for every test.
SIX = Source(registry="pypi", package="six", version="1.16.0",
             archive_sha256="8abb2f1d86890a2dfb989f9a77cfcfd3e47c2a354b01111771326f8aa26e0254",
             member="six.py",
             member_sha256="4ce39f422ee71467ccac8bed76beb05f8c321c7f0ceda9279ae2dfa3670106b3")
# A 12 kB member of a 1.7 MB Debian package (Apache-2.0).
ITK_MASK = Source(registry="debian", package="insighttoolkit5-examples", version="5.2.1-5+deb12u1",
                  archive_sha256="6ca1f323eac0b3cba50e786bbf0f2c76ed44b52ecb9e7aeea808ccc42bf09f69",
                  member="usr/share/doc/insighttoolkit5-examples/examples/Data/"
                         "KmeansTest_T1RawSkullStrip.nii.gz",
                  member_sha256="f3ca85fa9559f7cc4b7c3ca862355cf0e7351505bdc62e3144b7fe6f6da37f3b")


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("SLICER_PTQ_CACHE", str(cache))
    return cache


def _files(folder: Path) -> list:
    return [path for path in folder.rglob("*") if path.is_file()] if folder.exists() else []


def _fetch_or_skip(source: Source) -> Path:
    try:
        return fetch(source)
    except PTQError as exc:
        if "could not fetch" in str(exc):
            pytest.skip(f"registry unreachable: {exc}")
        raise


def test_cache_dir_follows_environment(empty_cache):
    assert fetch_module.cache_dir() == empty_cache
    assert SIX.cached_path == empty_cache / "pypi" / "six" / "1.16.0" / "six.py"


def test_fetch_verifies_and_caches_then_reuses_without_download(empty_cache):
    path = _fetch_or_skip(SIX)
    assert path == SIX.cached_path and sha256_of(path) == SIX.member_sha256
    assert _files(empty_cache) == [path], "only the member is cached, no archive or temp file"
    before = path.stat()
    start = time.perf_counter()
    again = fetch(SIX)
    elapsed = time.perf_counter() - start
    after = again.stat()
    assert again == path
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert elapsed < 0.5, f"a cache hit took {elapsed:.2f} s: it downloaded again"


def test_corrupt_cached_file_is_replaced(empty_cache):
    path = _fetch_or_skip(SIX)
    path.write_bytes(b"truncated")
    assert sha256_of(fetch(SIX)) == SIX.member_sha256


def test_archive_hash_mismatch_raises_and_caches_nothing(empty_cache):
    wrong = dataclasses.replace(SIX, archive_sha256="0" * 64)
    with pytest.raises(PTQError) as info:
        _fetch_or_skip(wrong)
    message = str(info.value)
    assert "six==1.16.0" in message and "SHA-256" in message and SIX.archive_sha256 in message
    assert _files(empty_cache) == []


def test_member_hash_mismatch_raises_and_caches_nothing(empty_cache):
    wrong = dataclasses.replace(SIX, member_sha256="f" * 64)
    with pytest.raises(PTQError, match="six.py inside six==1.16.0"):
        _fetch_or_skip(wrong)
    assert _files(empty_cache) == []


def test_missing_member_names_the_member(empty_cache):
    wrong = dataclasses.replace(SIX, member="six/missing.py")
    with pytest.raises(PTQError, match="has no file six/missing.py"):
        _fetch_or_skip(wrong)
    assert _files(empty_cache) == []


def test_unknown_package_names_it_and_the_way_out(empty_cache):
    unknown = dataclasses.replace(SIX, package="slicer-ptq-no-such-package", version="9.9.9")
    with pytest.raises(PTQError) as info:
        fetch(unknown)
    message = str(info.value)
    assert "slicer-ptq-no-such-package==9.9.9" in message
    assert "slicer-ptq quantize MODEL --calib" in message and "package index" in message
    assert _files(empty_cache) == []


def test_member_path_must_stay_inside_the_archive(empty_cache):
    with pytest.raises(PTQError, match="must be relative"):
        fetch(dataclasses.replace(SIX, member="../../etc/passwd"))


def test_debian_member_is_extracted_and_verified(empty_cache):
    path = _fetch_or_skip(ITK_MASK)
    assert sha256_of(path) == ITK_MASK.member_sha256
    assert "5.2.1-5+deb12u1" in path.parts, "cached under its version"
    assert _files(empty_cache) == [path]
