"""Peak memory and time of calibrating a whole-volume network: SlicerPTQ vs NNCF (issue 18).

A 192^3 single-input network (MONAI UNet, 16-32-64-128 channels, random
initial weights: memory and time do not depend on the weights) is exported
to FP32 ONNX once; then each contender runs in a fresh process on the same
20 crops of 192^3 (seeded normal noise: the statistics' values do not
change their cost), and the process reports its peak resident memory
(``VmHWM``) and wall time:

- ``slicer-ptq max``: ``collect_ranges`` (in-graph reductions) + ``quantize_onnx``;
- ``slicer-ptq percentile``: the same with histograms fetched in groups
  under the 1 GiB budget;
- ``nncf``: ``nncf.quantize`` on the OpenVINO model (performance preset).

Before issue 18 ``collect_ranges`` fetched every activation of a crop at
once: 9.0 GB and 887 s for a 192^3 network, against 97 s for NNCF.

    python benchmarks/bench_calibration_memory.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from SlicerPTQLib.atomic import replacing

SIZE = 192
CONTENDERS = ("slicer-ptq max", "slicer-ptq percentile", "nncf")


def build_onnx(path: Path, size: int) -> None:
    import torch

    from SlicerPTQLib import architectures
    from SlicerPTQLib.export import export_onnx

    torch.manual_seed(0)
    args = dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128), strides=(2, 2, 2),
                num_res_units=1)
    export_onnx(architectures.build("UNet", args).eval(), path, 1, (1, 1, size, size, size))


def crops(count: int, size: int):
    rng = np.random.default_rng(0)
    return [rng.normal(size=(1, size, size, size)).astype(np.float32) for _ in range(count)]


def peak_rss_gb() -> float:
    """This process's own peak resident memory (``VmHWM``): ``ru_maxrss`` survives ``execve`` on Linux and
    would report the parent's peak when that was higher."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def measure(contender: str, fp32: Path, count: int, size: int) -> dict:
    """Run one contender in this process; returns seconds and peak RSS (GB)."""
    from SlicerPTQLib import onnx_graph
    from SlicerPTQLib.calibration import collect_ranges
    from SlicerPTQLib.float_policy import float_policy_nodes
    from SlicerPTQLib.qdq import PLACEMENTS, choose_activation_tensors, quantize_onnx

    data = crops(count, size)
    baseline = peak_rss_gb()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        if contender == "nncf":
            from SlicerPTQLib.nncf_baseline import quantize_with_nncf

            quantize_with_nncf(fp32, data, Path(folder) / "model.xml")
        else:
            method = contender.split()[-1]
            keep_float = frozenset(float_policy_nodes(fp32))
            tensors = choose_activation_tensors(onnx_graph.load_model(fp32), PLACEMENTS["cpu"], keep_float)
            ranges = collect_ranges(fp32, tensors, data, method)
            quantize_onnx(fp32, Path(folder) / "model.int8.onnx", ranges, method=method, keep_float=keep_float)
    seconds = time.perf_counter() - start
    return {"contender": contender, "seconds": seconds,
            "peak_rss_gb": peak_rss_gb(),
            "rss_before_gb": baseline, "crops": count, "size": size}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--crops", type=int, default=20)
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child mode: measure one contender
    parser.add_argument("--onnx", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.onnx, args.crops, args.size)))
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-calib-") as folder:
        fp32 = Path(folder) / "unet.fp32.onnx"
        build_onnx(fp32, args.size)
        for contender in args.contenders:
            # A fresh process per contender, so each peak is its own.
            done = subprocess.run([sys.executable, __file__, "--one", contender, "--onnx", str(fp32),
                                   "--crops", str(args.crops), "--size", str(args.size)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                rows.append({"contender": contender, "error": done.stderr.strip().splitlines()[-1:]})
            else:
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    from SlicerPTQLib.cpu_info import cpu_summary

    result = {"cpu": cpu_summary(), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    with replacing(args.out / "calibration_memory.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
