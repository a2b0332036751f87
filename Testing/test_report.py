"""The HTML report, built from a real benchmark JSON (the tiny run of test_bench_backends)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from SlicerPTQLib import report
from SlicerPTQLib.errors import PTQError
from test_bench_backends import tiny_benchmark_json

PIL = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def benchmark_json(tmp_path_factory) -> Path:
    return tiny_benchmark_json(tmp_path_factory)


def _images(index: Path):
    sources = re.findall(r'<img src="([^"]+)"', index.read_text())
    return [index.parent / source for source in sources]


def _check_png(path: Path, kind: str) -> None:
    width, height = report.IMAGE_SIZES[kind]
    with PIL.open(path) as image:
        assert image.size == (int(width * report.DPI), int(height * report.DPI)), path.name
        pixels = np.asarray(image.convert("RGB"))
    # Something is drawn: many distinct colours, not a blank canvas.
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20, path.name


def test_report_renders_every_chart(benchmark_json, tmp_path):
    index = report.build_report(benchmark_json, tmp_path / "report")
    assert index == tmp_path / "report" / "index.html"
    html = index.read_text()
    for label in ("PyTorch eager FP32", "NNCF INT8 (OpenVINO)", "SlicerPTQ INT8 (max)"):
        assert label in html
    cpu = json.loads(benchmark_json.read_text())["cpu"]
    assert f"INT8 path: {cpu['int8_path']}" in html and "none found" not in html
    images = {path.name: path for path in _images(index)}
    kinds = {"_latency.png": "latency", "_size.png": "size", "_volume_time.png": "volume_time",
             "_dice.png": "dice", "_overlay.png": "overlay", "_layers.png": "layers"}
    for suffix, kind in kinds.items():
        found = [path for name, path in images.items() if name.endswith(suffix)]
        assert found, f"no {kind} chart in the report"
        for path in found:
            _check_png(path, kind)
    layer_charts = [name for name in images if name.endswith("_layers.png")]
    assert any("slicerptq_int8_max" in name for name in layer_charts)
    assert any("nncf_int8" in name for name in layer_charts)
    written = {path.name for path in (tmp_path / "report").iterdir()}
    assert written == {"index.html"} | set(images), "temporary files left behind"


def test_demo_json_renders(benchmark_json, tmp_path):
    """A demo.json (slicer-ptq demo's shape) renders too; built here from the real run's numbers."""
    bench = json.loads(benchmark_json.read_text())
    rows = {row["key"]: row for row in bench["models"][0]["variants"]}
    volume = bench["models"][0]["volumes"][0]
    fp32, int8 = volume["results"]["torch_fp32"], volume["results"]["slicerptq_int8_max"]
    demo = {
        "cpu": bench["cpu"], "model": rows["torch_fp32"]["file"], "settings": {"method": "max"},
        "size_mb": {"torchscript": rows["torch_fp32"]["size_mb"], "quantized_onnx": rows["slicerptq_int8_max"]["size_mb"]},
        "patch_latency": [{"backend": "PyTorch eager FP32", "median_s": rows["torch_fp32"]["patch_median_s"],
                           "p90_s": rows["torch_fp32"]["patch_p90_s"]},
                          {"backend": "OpenVINO INT8", "median_s": rows["slicerptq_int8_max"]["patch_median_s"],
                           "p90_s": rows["slicerptq_int8_max"]["patch_p90_s"]}],
        "volumes": [{"volume": volume["volume"], "time_fp32_s": fp32["total_s"],
                     "time_quantized_s": int8["total_s"], "dice_fp32_vs_reference": fp32["dice_vs_reference"],
                     "dice_quantized_vs_reference": int8["dice_vs_reference"],
                     "dice_quantized_vs_fp32": int8["dice_vs_fp32"]}],
    }
    demo_json = tmp_path / "demo.json"
    demo_json.write_text(json.dumps(demo))
    index = report.build_report(demo_json, tmp_path / "demo_report")
    names = [path.name for path in _images(index)]
    assert any(name.endswith("_latency.png") for name in names)
    assert any(name.endswith("_dice.png") for name in names)
    for path in _images(index):
        if path.name.endswith("_latency.png"):
            _check_png(path, "latency")


def test_unknown_json_is_a_clear_error(tmp_path):
    stray = tmp_path / "other.json"
    stray.write_text(json.dumps({"hello": 1}))
    with pytest.raises(PTQError, match="other.json"):
        report.build_report(stray, tmp_path / "out")
    with pytest.raises(PTQError, match="missing.json"):
        report.build_report(tmp_path / "missing.json", tmp_path / "out")
