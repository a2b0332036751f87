"""The backend benchmark, run for real on a tiny configuration of the shipped model.

One run (PyTorch FP32, NNCF INT8 and SlicerPTQ INT8 on one real volume,
two calibration crops, two timed rounds) is shared with test_report.py
through :func:`tiny_benchmark_json`; it skips when the shipped model or
volumes cannot be fetched. The registry models (``--models``) are checked
without trained weights: the skip, the model files, the reference labels
and the markdown of a section without reference labels.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from dataclasses import asdict
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


def _bench(name: str = "bench_backends"):
    """The benchmark script, or one of its sibling modules (``backends_*``), as a module."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(SCRIPT.parent))


def test_fit_patch_centres_and_pads():
    _fit_patch = _bench("backends_measure")._fit_patch
    image = np.arange(1 * 4 * 6 * 2, dtype=np.float32).reshape(1, 4, 6, 2)
    patch = _fit_patch(image, (2, 4, 4))
    assert patch.shape == (1, 2, 4, 4)
    np.testing.assert_array_equal(patch[0, :, :, :2], image[0, 1:3, 1:5, :])
    assert not patch[0, :, :, 2:].any()


def test_registry_model_without_weights_is_skipped(tmp_path):
    """An empty weights cache: the model is recorded as not run, with why, and the run still writes its files."""
    env = dict(os.environ, SLICER_PTQ_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "out"
    completed = subprocess.run([sys.executable, str(SCRIPT), "--models", "SegResNet", "--no-report", "--out",
                                str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads((out / "benchmark.json").read_text())
    assert result["models"] == []
    [skipped] = result["skipped_models"]
    assert skipped["name"] == "SegResNet"
    assert "no trained weights of SegResNet" in skipped["reason"]
    assert "train_small_models.py --arch SegResNet" in skipped["reason"]
    assert "SegResNet not run" in completed.stderr
    assert "- model not run: SegResNet: no trained weights" in (out / "benchmark.md").read_text()


def test_unknown_model_name_is_refused():
    with pytest.raises(SystemExit):
        _bench().parse_args(["--models", "NoSuchNet"])


def test_arch_model_files_load_as_the_eager_row_runs_them(tmp_path):
    """State dict + spec sidecar (random small UNet): what quantize() reads with arch, and the torch row runs."""
    import torch

    from SlicerPTQLib import architectures
    from SlicerPTQLib.models import load_model
    from SlicerPTQLib.spec import ModelSpec, sidecar_path

    subjects = _bench("backends_subjects")
    training = subjects._sibling_scripts()[1]
    args = architectures.config_args("UNet", "small", out_channels=training.NUM_CLASSES, roi=training.ROI)
    torch.manual_seed(0)
    module = architectures.build("UNet", args).eval()
    spec = training.training_spec("UNet")
    path = subjects.write_arch_model(tmp_path / "UNet" / "UNet.pt", module, spec)
    assert ModelSpec.load(sidecar_path(path)) == spec
    loaded = load_model(path, arch="UNet", arch_args=args)
    assert loaded.spec.out_channels == training.NUM_CLASSES and loaded.spec.roi_size == training.ROI
    Variant = _bench("backends_variants").Variant
    variant = Variant("torch_fp32", "PyTorch eager FP32", "torch", str(path), "fp32",
                      extra={"arch": "UNet", "arch_args": args})
    runtime = _bench("backends_worker")._runtime(asdict(variant), None)
    batch = np.random.default_rng(0).random((1, 1, 16, 16, 16), dtype=np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(runtime.predict(batch), expected, rtol=1e-5, atol=1e-5)
    runtime.close()


def test_tissue_labels_shift_kmeans_classes(tmp_path):
    """k-means classes 1..6 become 0..5; unlabelled voxels (0) join the background."""
    import nibabel as nib

    path = tmp_path / "labels.nii.gz"
    classes = np.broadcast_to(np.arange(7, dtype=np.uint8)[:, None, None], (7, 2, 2))
    nib.save(nib.Nifti1Image(np.ascontiguousarray(classes), np.eye(4)), path)
    labels = _bench("backends_subjects").tissue_labels(path)
    assert labels.shape == (7, 2, 2)
    np.testing.assert_array_equal(labels[:, 0, 0], [0, 0, 1, 2, 3, 4, 5])


def test_markdown_of_a_section_without_reference_labels():
    """A volume without reference labels (Colin27 for the registry models) has Dice vs FP32 only."""
    Variant = _bench("backends_variants").Variant
    report = _bench("backends_report")
    variants = [Variant("torch_fp32", "PyTorch eager FP32", "torch", "UNet.pt", "fp32", 0.6),
                Variant("slicerptq_int8_max", "SlicerPTQ INT8 (max)", "openvino", "model.int8.onnx",
                        size_mb=0.2, quantize_s=5.0)]
    timings = {"total_s": 1.0, "preprocess_s": 0.1, "network_s": 0.8, "restore_s": 0.1}

    def result(reference, fp32):
        return {"timings": timings, "total_s": 1.0, "fastest_total_s": 1.0, "dice_vs_reference": reference,
                "dice_vs_fp32": fp32}

    volumes = [{"volume": "itk_t1", "results": {"torch_fp32": result(0.6, 1.0),
                                                "slicerptq_int8_max": result(0.62, 0.98)}},
               {"volume": "colin27", "results": {"torch_fp32": result(None, 1.0),
                                                 "slicerptq_int8_max": result(None, 0.96)}}]
    measured = {"times": {}, "volumes": volumes, "layers": {}, "memory": {}, "errors": {}, "infos": {},
                "cold": {}, "profile": None, "patch_shape": [1, 1, 64, 64, 64]}
    section = report.summarise("UNet (small)", variants, measured, [], [], 2)
    rows = {row["key"]: row for row in section["variants"]}
    assert rows["slicerptq_int8_max"]["dice_vs_reference_mean"] == pytest.approx(0.62)
    assert rows["slicerptq_int8_max"]["dice_vs_fp32_mean"] == pytest.approx(0.97)
    benchmark = {"cpu": {"model": "cpu"}, "threads": 2, "command": "bench", "models": [section],
                 "skipped_models": [{"name": "SegResNet", "reason": "no trained weights"}]}
    text = report.markdown(benchmark)
    assert "| itk_t1 | 0.6000 | 0.6200 |" in text
    assert "colin27" not in text
    assert text.splitlines()[-1] == "- model not run: SegResNet: no trained weights"
