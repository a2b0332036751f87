"""The backend benchmark, run for real on a tiny configuration of the shipped model.

One run (PyTorch FP32, NNCF INT8 and SlicerPTQ INT8 on one real volume,
two calibration crops, two timed rounds) is shared with test_report.py
through :func:`tiny_benchmark_json`; it skips when the shipped model or
volumes cannot be fetched.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Dict

import numpy as np
import pytest

from SlicerPTQLib import shipped
from SlicerPTQLib.errors import PTQError

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "bench_backends.py"
TINY_ARGS = ["--only", "torch_fp32", "nncf_int8", "slicerptq_int8_max", "--methods", "max", "--max-volumes", "1",
             "--repeats", "2", "--warmup", "1", "--volume-repeats", "1", "--num-crops", "2", "--no-lowbit",
             "--no-profile", "--no-report"]
_RUNS: Dict[str, Path] = {}


def tiny_benchmark_json(tmp_path_factory) -> Path:
    """Run the benchmark once per session on the tiny configuration; the path of its JSON."""
    if "json" not in _RUNS:
        try:
            shipped.shipped_model()
            shipped.calibration_volumes()
            shipped.evaluation_volumes()
        except PTQError as exc:
            pytest.skip(f"shipped model or volumes unavailable: {exc}")
        out = tmp_path_factory.mktemp("bench")
        completed = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *TINY_ARGS],
                                   capture_output=True, text=True, timeout=900)
        assert completed.returncode == 0, completed.stderr[-3000:]
        _RUNS["json"] = out / "benchmark.json"
    return _RUNS["json"]


@pytest.fixture(scope="session")
def tiny_benchmark(tmp_path_factory) -> Path:
    return tiny_benchmark_json(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_result(tiny_benchmark) -> Dict:
    return json.loads(tiny_benchmark.read_text())


def _variants(result: Dict) -> Dict[str, Dict]:
    return {row["key"]: row for row in result["models"][0]["variants"]}


def test_every_variant_was_measured(tiny_result):
    variants = _variants(tiny_result)
    assert set(variants) == {"torch_fp32", "nncf_int8", "slicerptq_int8_max"}
    for row in variants.values():
        assert "error" not in row, row.get("error")
        assert len(row["patch_times_s"]) == 2
        assert 0 < row["patch_min_s"] <= row["patch_median_s"] <= row["patch_p90_s"] + 1e-9
        assert row["patch_cpu_median_s"] > 0
        # Peak memory is the worker's own, measured after the model ran.
        assert row["peak_rss_mb"] > row["rss_after_imports_mb"] > 0
        assert row["volume_mean_s"] > 0
    assert tiny_result["threads"] == 2
    assert tiny_result["cpu"]["model"]


def test_int8_models_run_int8_kernels_and_are_smaller(tiny_result):
    variants = _variants(tiny_result)
    for key in ("nncf_int8", "slicerptq_int8_max"):
        layers = variants[key]["int8_layers"]
        assert layers["conv_int8"] > 0, f"{key}: no convolution ran in INT8"
        assert variants[key]["quantize_s"] > 0
    # Real int8 weight initializers: the Q/DQ file is far smaller than the TorchScript FP32 file.
    assert variants["slicerptq_int8_max"]["size_mb"] < 0.5 * variants["torch_fp32"]["size_mb"]


def test_segmentations_agree_with_reference_and_fp32(tiny_result):
    model = tiny_result["models"][0]
    volume = model["volumes"][0]
    for key, result in volume["results"].items():
        # deepbet reaches Dice ~0.95 on these real volumes; a broken pipeline does not.
        assert result["dice_vs_reference"] > 0.85, key
        assert result["dice_vs_fp32"] > 0.95, key
    assert volume["results"]["torch_fp32"]["dice_vs_fp32"] == pytest.approx(1.0)
    timings = volume["results"]["slicerptq_int8_max"]["timings"]
    stages = timings["preprocess_s"] + timings["network_s"] + timings["restore_s"]
    assert stages == pytest.approx(timings["total_s"], rel=0.05)
    assert timings["forward_s"] <= timings["network_s"] + 1e-6


def test_slices_and_markdown_written(tiny_benchmark, tiny_result):
    volume = tiny_result["models"][0]["volumes"][0]
    with np.load(tiny_benchmark.parent / volume["slices"]) as slices:
        for axis in range(3):
            image, fp32, int8 = slices[f"image_{axis}"], slices[f"fp32_{axis}"], slices[f"int8_{axis}"]
            assert image.shape == fp32.shape == int8.shape and image.ndim == 2
            assert fp32.any() and int8.any()
    table = (tiny_benchmark.parent / "benchmark.md").read_text()
    for label in ("PyTorch eager FP32", "NNCF INT8 (OpenVINO)", "SlicerPTQ INT8 (max)"):
        assert label in table
    assert any(line.startswith("- SlicerPTQ INT8 (max): per patch") for line in table.splitlines())


def test_fit_patch_centres_and_pads():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from bench_backends import _fit_patch
    finally:
        sys.path.remove(str(SCRIPT.parent))
    image = np.arange(1 * 4 * 6 * 2, dtype=np.float32).reshape(1, 4, 6, 2)
    patch = _fit_patch(image, (2, 4, 4))
    assert patch.shape == (1, 2, 4, 4)
    np.testing.assert_array_equal(patch[0, :, :, :2], image[0, 1:3, 1:5, :])
    assert not patch[0, :, :, 2:].any()
