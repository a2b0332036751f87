"""A quantized model checks itself where it runs, and is refused where it is wrong."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import numpy_helper  # noqa: E402

from SlicerPTQLib import build_cache, pipeline, selfcheck  # noqa: E402
from SlicerPTQLib.errors import PTQError  # noqa: E402


@pytest.fixture(scope="module")
def build(shipped_model_path, calibration_paths, tmp_path_factory):
    cache = tmp_path_factory.mktemp("builds")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLICER_PTQ_BUILDS", str(cache))
        result = pipeline.quantize(shipped_model_path, calibration_paths[:2], tmp_path_factory.mktemp("b"),
                                   num_crops=4)
    return result, cache


def test_a_build_checks_itself_on_its_calibration_volumes(build, monkeypatch):
    result, cache = build
    check = result.report["self_check"]
    assert check["runtime"] == "openvino" and check["passed"], check
    assert check["agreement"] >= check["floor"] and len(check["per_volume"]) == 2
    assert abs(check["agreement"] - check["reference_agreement"]) < selfcheck.TOLERANCE
    assert "int8:" in check["machine"] and "openvino" in check["machine"]   # CPU, int8 path, version
    monkeypatch.setenv("SLICER_PTQ_BUILDS", str(cache))
    cached = selfcheck.recorded(result.quantized_onnx, "openvino")
    assert cached is not None and cached.agreement == check["agreement"]
    # Recorded beside the builds (SLICER_PTQ_BUILDS), so moving or isolating builds moves the checks too.
    assert build_cache.builds_dir() == cache and any((cache / "selfchecks").glob("*.json"))


def test_segment_uses_the_cached_check(build, evaluation_cases, monkeypatch):
    result, cache = build
    monkeypatch.setenv("SLICER_PTQ_BUILDS", str(cache))
    _, timings = pipeline.segment(result.quantized_onnx, evaluation_cases[0][1])
    assert timings["self_check"].startswith("self-check passed: openvino")


def _broken_copy(result, folder):
    """The build with half its weight scales negated: a wrong INT8 model with valid files.

    ONNX Runtime computes the same wrong numbers, so the reference agrees
    with the runtime: the check must then refuse by the hard floor.
    """
    for name in ("model.fp32.onnx", "model.json", "quantization.json"):
        shutil.copy(result.out_dir / name, folder / name)
    model = onnx.load(str(result.quantized_onnx))
    scales = [t for t in model.graph.initializer if t.name.endswith("_scale") and len(t.dims) == 1]
    for tensor in scales[len(scales) // 2:]:
        tensor.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(tensor), tensor.name))
    onnx.save(model, str(folder / "model.int8.onnx"))
    return folder / "model.int8.onnx"


def test_a_wrong_int8_model_is_refused_with_what_to_do(build, evaluation_cases, tmp_path, monkeypatch):
    result, _ = build
    monkeypatch.setenv("SLICER_PTQ_BUILDS", str(tmp_path / "builds"))
    broken = _broken_copy(result, tmp_path)
    with pytest.raises(PTQError, match=r"is not the network it was made from.*Dice 0\.\d+.*--accuracy-budget"):
        pipeline.segment(broken, evaluation_cases[0][1])
    # The verdict is cached for this machine: a second call refuses without re-running.
    assert selfcheck.recorded(broken, "openvino").passed is False
    labels, timings = pipeline.segment(broken, evaluation_cases[0][1], self_check=False)
    assert timings["self_check"] == "not self-checked: turned off" and labels.array.size


def test_the_cli_refuses_in_one_sentence(build, evaluation_cases, tmp_path):
    result, _ = build
    broken = _broken_copy(result, tmp_path)
    env = {**__import__("os").environ, "SLICER_PTQ_BUILDS": str(tmp_path / "builds")}
    done = subprocess.run([sys.executable, "-m", "SlicerPTQLib.cli", "segment", str(broken),
                           str(evaluation_cases[0][1]), "--out", str(tmp_path / "x.nii.gz")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "not the network" in done.stderr and not (tmp_path / "x.nii.gz").exists()


def test_without_an_fp32_model_beside_it_the_check_says_so(build, evaluation_cases, tmp_path, monkeypatch):
    result, _ = build
    monkeypatch.setenv("SLICER_PTQ_BUILDS", str(tmp_path / "builds"))
    for name in ("model.int8.onnx", "model.json"):
        shutil.copy(result.out_dir / name, tmp_path / name)
    _, timings = pipeline.segment(tmp_path / "model.int8.onnx", evaluation_cases[0][1])
    assert timings["self_check"].startswith("not self-checked: no FP32 model")


def test_the_floor_follows_the_reference_math_up_to_the_absolute_floor():
    wrong_runtime = selfcheck.SelfCheck("openvino", "cpu", agreement=0.05, reference_agreement=0.998,
                                        per_volume=[0.05])
    assert not wrong_runtime.passed and json.loads(json.dumps(wrong_runtime.to_dict()))["passed"] is False
    assert "runs wrong with openvino" in wrong_runtime.refusal(Path("m.onnx"))
    assert "--runtime onnxruntime" in wrong_runtime.refusal(Path("m.onnx"))
    assert np.isclose(wrong_runtime.floor, selfcheck.MIN_AGREEMENT - selfcheck.TOLERANCE)
    lossy_model = selfcheck.SelfCheck("openvino", "cpu", agreement=0.978, reference_agreement=0.980,
                                      per_volume=[0.978])   # e.g. W2A8: the loss is the model's, not the runtime's
    assert lossy_model.passed and "--accuracy-budget" in lossy_model.warning()
    assert selfcheck.SelfCheck("openvino", "cpu", 0.997, 0.998, [0.997]).warning() == ""
