"""One run on an NVIDIA GPU that checks what only a GPU can settle about the TensorRT path.

Steps, in order (each prints a line and is added to the JSON as soon as it
ends; a failing step records its error and the next one still runs):

1. ``environment``: Python, TensorRT, torch, cuda-python, onnxruntime
   versions; ``tensorrt_available()``; creating a builder and a runtime.
2. ``tiny_unet``: FP32, FP16 and INT8 engines of a small MONAI 3D UNet
   (with ConvTranspose3d upsampling), INT8 with its float parts in FP16
   (the default) and in FP32, each vs ONNX Runtime on the graph the engine
   was built from (max abs diff, argmax agreement on a smooth phantom, not
   noise; the FP16-float-parts engine also vs the FP32 QDQ file), the
   precision of every engine layer, and a cache hit on a second load.
3. ``convtranspose_axis``: Conv -> ConvTranspose3d -> Conv quantized with
   ConvTranspose weight scales on axis 0, axis 1 and per tensor, each
   INT8 engine vs ONNX Runtime on the same QDQ file, and whether the
   ConvTranspose layer ran INT8 (engine inspector).
4. ``inspector_fixtures``: the inspector JSON of every engine built above,
   saved under ``<out>/inspector/`` (fixtures for the layer-precision parser).
5. ``speed``: INT8 (FP16 float parts) vs FP16 vs FP32 GPU time per 96^3
   patch (CUDA events) of a mid-sized UNet at batch 1 and 2, and INT8 with
   FP32 float parts (what the FP16 float parts gain).
6. ``shipped_model``: ``bench_gpu.py`` on the shipped model end to end.

Usage (about 10 minutes on one H100; ``--skip-shipped`` saves most of it)::

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check] [--skip-shipped]

Without a usable GPU and TensorRT it says why in one sentence, writes the
``environment`` step and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import platform
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_gpu beside this script
RESULTS = Path(__file__).resolve().parent / "results" / "gpu_check"
EXIT_NO_GPU = 2
TINY_ROI = (32, 32, 32)
SPEED_ROI = (96, 96, 96)


class Check:
    """Runs steps, keeps going after failures, rewrites ``<out>/gpu_check.json`` after each step."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results: Dict[str, Dict] = {}
        self.runtimes: Dict[str, object] = {}  # engines kept for the inspector step

    def step(self, name: str, work: Callable[[], Dict]) -> Dict:
        from SlicerPTQLib.evaluation import write_json

        started = time.perf_counter()
        try:
            record = {"ok": True, **work()}
        except Exception as exc:  # a GPU check must record every failure and go on
            record = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                      "traceback": traceback.format_exc(limit=8)}
        record["seconds"] = round(time.perf_counter() - started, 2)
        self.results[name] = record
        write_json(self.results, self.out / "gpu_check.json")
        summary = {key: value for key, value in record.items() if key != "traceback"}
        print(f"[{name}] {json.dumps(summary, default=str)[:1500]}", flush=True)
        return record


def environment() -> Dict:
    from SlicerPTQLib.runtimes.tensorrt_runtime import tensorrt_available

    versions = {"python": platform.python_version()}
    for module in ("tensorrt", "torch", "onnxruntime", "onnx", "cuda.bindings"):
        try:
            versions[module] = str(getattr(importlib.import_module(module), "__version__", "?"))
        except Exception as exc:  # a missing or broken package is a finding, not a crash
            versions[module] = f"unavailable ({type(exc).__name__}: {exc})"
    usable, reason = tensorrt_available()
    record = {"versions": versions, "tensorrt_available": usable, "reason": reason}
    if usable:
        from SlicerPTQLib.tensorrt_build import create_builder, create_runtime, trt_logger

        record["builder"] = type(create_builder(trt_logger())).__name__
        record["runtime"] = type(create_runtime(trt_logger())).__name__
    return record


def export_unet(path: Path, channels, roi) -> Path:
    import torch
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=channels,
               strides=(2,) * (len(channels) - 1), num_res_units=1).eval()
    axes = {0: "batch", 2: "d", 3: "h", 4: "w"}
    torch.onnx.export(net, torch.randn(1, 1, *roi), str(path), opset_version=17, dynamo=False,
                      input_names=["input"], output_names=["output"], dynamic_axes={"input": axes, "output": axes})
    return path


def phantom(batch: int, roi) -> np.ndarray:
    """Smooth blobs in [0, 1] (a segmentation-like input; argmax on noise would mean nothing)."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, size) for size in roi], indexing="ij"))
    images = []
    for index in range(batch):
        centre = np.array([0.3, -0.2, 0.1]) * (1 - 2 * (index % 2))
        radius = 0.45 + 0.1 * index
        distance = np.sqrt(((grid - centre.reshape(3, 1, 1, 1)) ** 2).sum(axis=0))
        images.append(1 / (1 + np.exp((distance - radius) * 12)))
    return np.asarray(images, dtype=np.float32)[:, None]


def quantize(fp32: Path, out: Path, roi, placement: str = "tensorrt") -> Path:
    from SlicerPTQLib.calibration import sample_crops
    from SlicerPTQLib.qdq import quantize_onnx

    images = [phantom(1, tuple(2 * r for r in roi))[0]]
    quantize_onnx(fp32, out, sample_crops(images, roi, 4, seed=0), placement=placement)
    return out


def onnxruntime_output(model: Path, batch: np.ndarray) -> np.ndarray:
    from SlicerPTQLib.onnx_graph import cpu_session

    session = cpu_session(str(model))
    return session.run(None, {session.get_inputs()[0].name: batch})[0]


def engine_reference(model: Path, float_parts: str, batch: np.ndarray) -> np.ndarray:
    """ONNX Runtime's output on the graph TensorRT builds: a QDQ file with FP16 float parts when the engine has them."""
    from SlicerPTQLib.fp16_float_parts import convert_float_parts
    from SlicerPTQLib.tensorrt_build import has_qdq

    if float_parts == "fp16" and has_qdq(model):
        converted = model.with_name(f"{model.stem}.fp16-float-parts.onnx")
        convert_float_parts(model, converted)
        model = converted
    return onnxruntime_output(model, batch)


def compare(engine_output: np.ndarray, reference: np.ndarray) -> Dict:
    return {"max_abs_diff": float(np.abs(engine_output - reference).max()),
            "reference_max_abs": float(np.abs(reference).max()),
            "argmax_agreement": float((engine_output.argmax(1) == reference.argmax(1)).mean())}


def open_engines(check: Check, fp32: Path, int8: Path, roi):
    """``(name, (model, float parts, runtime))`` for each engine of ``bench_gpu.ENGINES``, opened one at a time."""
    from bench_gpu import ENGINES
    from SlicerPTQLib.runtimes.tensorrt_runtime import TensorRTRuntime

    for name, (precision, float_parts) in ENGINES.items():
        model = int8 if precision == "int8" else fp32
        yield name, (model, float_parts, TensorRTRuntime(model, precision=precision, roi=roi, max_batch=2,
                                                         cache_dir=check.out / "engines", float_parts=float_parts))


def tiny_unet(check: Check) -> Dict:
    from SlicerPTQLib.runtimes.tensorrt_runtime import TensorRTRuntime

    work = check.out / "tiny_unet"
    work.mkdir(exist_ok=True)
    fp32 = export_unet(work / "tiny.fp32.onnx", (8, 16, 32), TINY_ROI)
    int8 = quantize(fp32, work / "tiny.int8.onnx", TINY_ROI)
    batch = phantom(2, TINY_ROI)
    record = {}
    for name, (model, float_parts, runtime) in open_engines(check, fp32, int8, TINY_ROI):
        check.runtimes[f"tiny_{name}"] = runtime
        output = runtime.predict(batch)
        record[name] = {"built": runtime.built, "device_memory": runtime.memory.name,
                        **compare(output, engine_reference(model, float_parts, batch)),
                        "layer_precisions": dict(Counter(layer["precision"] for layer in runtime.layer_precisions()))}
        if name == "int8":
            record[name]["vs_fp32_qdq"] = compare(output, onnxruntime_output(model, batch))
    again = TensorRTRuntime(int8, precision="int8", roi=TINY_ROI, max_batch=2, cache_dir=check.out / "engines")
    record["second_load_cache_hit"] = not again.built
    again.close()
    return record


def convtranspose_axis(check: Check) -> Dict:
    import torch

    from SlicerPTQLib.qdq import PLACEMENTS
    from SlicerPTQLib.runtimes.tensorrt_runtime import TensorRTRuntime

    work = check.out / "convtranspose"
    work.mkdir(exist_ok=True)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 16, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv3d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
                              torch.nn.ConvTranspose3d(32, 16, 2, stride=2), torch.nn.ReLU(),
                              torch.nn.Conv3d(16, 2, 3, padding=1)).eval()
    fp32 = work / "deconv.fp32.onnx"
    axes = {0: "batch"}
    torch.onnx.export(net, torch.randn(1, 1, *TINY_ROI), str(fp32), opset_version=17, dynamo=False,
                      input_names=["input"], output_names=["output"], dynamic_axes={"input": axes, "output": axes})
    batch = phantom(2, TINY_ROI)
    record = {}
    for label, axis in (("axis0", 0), ("axis1", 1), ("per_tensor", None)):
        name = f"tensorrt_convtranspose_{label}"
        PLACEMENTS[name] = dataclasses.replace(PLACEMENTS["tensorrt"], name=name, conv_transpose_axis=axis)
        try:
            qdq = quantize(fp32, work / f"deconv.{label}.int8.onnx", TINY_ROI, placement=name)
            runtime = TensorRTRuntime(qdq, precision="int8", roi=TINY_ROI, max_batch=2,
                                      cache_dir=check.out / "engines")
            check.runtimes[f"deconv_{label}"] = runtime
            deconv = [layer for layer in runtime.layer_precisions() if layer.get("convtranspose")]
            record[label] = {**compare(runtime.predict(batch), engine_reference(qdq, "fp16", batch)),
                             "convtranspose_layers": deconv,
                             "convtranspose_ran_int8": bool(deconv) and all(layer["precision"] == "int8"
                                                                           for layer in deconv)}
        except Exception as exc:  # one axis failing must not hide the others
            record[label] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            PLACEMENTS.pop(name, None)
    return record


def inspector_fixtures(check: Check) -> Dict:
    folder = check.out / "inspector"
    folder.mkdir(exist_ok=True)
    saved = {}
    for name, runtime in check.runtimes.items():
        text = runtime.layer_information()
        (folder / f"{name}.json").write_text(text)
        saved[name] = {"file": str(folder / f"{name}.json"), "layers": len(json.loads(text).get("Layers", []))}
    return {"saved": saved}


def speed(check: Check, repeats: int) -> Dict:
    work = check.out / "speed"
    work.mkdir(exist_ok=True)
    fp32 = export_unet(work / "mid.fp32.onnx", (16, 32, 64, 128), SPEED_ROI)
    int8 = quantize(fp32, work / "mid.int8.onnx", SPEED_ROI)
    record = {}
    for name, (_, _, runtime) in open_engines(check, fp32, int8, SPEED_ROI):
        try:
            row = {"engine_mb": runtime.engine_path.stat().st_size / 2 ** 20}
            for batch in (1, 2):
                inputs = runtime.memory.upload(phantom(batch, SPEED_ROI))
                for _ in range(5):
                    runtime.run_device(inputs)
                runtime.memory.synchronize()
                times = runtime.memory.timed(lambda: runtime.run_device(inputs), repeats)
                row[f"batch{batch}_median_ms_per_patch"] = float(np.median(times)) / batch
            record[name] = row
        finally:
            runtime.close()
    for baseline in ("fp16", "fp32", "int8_fp32_float"):
        if baseline in record and "int8" in record:
            record[f"int8_speedup_vs_{baseline}"] = {
                f"batch{b}": record[baseline][f"batch{b}_median_ms_per_patch"]
                / record["int8"][f"batch{b}_median_ms_per_patch"] for b in (1, 2)}
    return record


def shipped_model(check: Check) -> Dict:
    import bench_gpu

    out = check.out / "bench_gpu.json"
    status = bench_gpu.main(["--repeats", "20", "--volume-repeats", "1", "--work", str(check.out / "shipped"),
                             "--cache-dir", str(check.out / "engines"), "--out", str(out)])
    record = {"exit_status": status}
    if out.is_file():
        results = json.loads(out.read_text())
        record.update({key: results.get(key) for key, _, _, _ in bench_gpu.COMPARISONS})
        record["dice_vs_fp32"] = {p: row.get("dice_vs_fp32") for p, row in results.get("engines", {}).items()}
    return record


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--repeats", type=int, default=30, help="timed engine calls per setting")
    parser.add_argument("--skip-shipped", action="store_true", help="leave out step 6 (bench_gpu)")
    args = parser.parse_args(argv)
    check = Check(args.out)
    record = check.step("environment", environment)
    if not record.get("tensorrt_available"):
        print(f"gpu_check: cannot check TensorRT on this machine: {record.get('reason') or record.get('error')}.",
              file=sys.stderr)
        return EXIT_NO_GPU
    check.step("tiny_unet", lambda: tiny_unet(check))
    check.step("convtranspose_axis", lambda: convtranspose_axis(check))
    check.step("inspector_fixtures", lambda: inspector_fixtures(check))
    for runtime in check.runtimes.values():
        runtime.close()
    check.step("speed", lambda: speed(check, args.repeats))
    if not args.skip_shipped:
        check.step("shipped_model", lambda: shipped_model(check))
    print(f"wrote {check.out / 'gpu_check.json'}")
    return 0 if all(record["ok"] for record in check.results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
