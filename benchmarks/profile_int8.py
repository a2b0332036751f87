"""Where INT8 time goes on this CPU: OpenVINO's per-layer profile of a build, FP32 vs INT8.

Runs the build's ``model.fp32.onnx`` and ``model.int8.onnx`` (adapted to this
CPU's int8 path first, as the runtime does: ``SlicerPTQLib.int8_compat``) and,
when given, another INT8 model (e.g. NNCF's), each compiled with
``PERF_COUNT``, on the build's patch shape, and sums OpenVINO's per-layer CPU
time by layer type over interleaved runs. It prints a table and writes JSON;
the convolutions' kernel names (``jit_avx2_I8``, ``brgconv_avx512_amx_i8``...)
say which instructions ran.

    python benchmarks/profile_int8.py BUILD_DIR [--other NAME=MODEL.xml|onnx] [--runs 10]

On a CPU without VNNI, oneDNN multiplies int8 with ``vpmaddubsw`` (u8 x s8,
pairs summed to int16) then ``vpmaddwd`` and ``vpaddd`` to widen to int32:
three instructions per 32 multiply-adds on a 256-bit vector, where FP32 takes
four FMAs (8 each); with two vector pipes for either, the best case is
32/1.5 = 21 int8 MACs per cycle against 16 FP32 ones (1.33x), before the
quantize/reorder work around each convolution. The JSON and the table show
how close each layer type comes.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SlicerPTQ"))


def compile_profiled(path: Path, threads: int):
    import openvino as ov

    core = ov.Core()
    config = {"PERF_COUNT": True, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_NUM_THREADS": threads}
    return core.compile_model(core.read_model(str(path)), "CPU", config)


def profile_once(request, patch: np.ndarray) -> Dict[str, Dict[str, float]]:
    """CPU seconds by layer type for one inference, and the kernel names seen per type."""
    request.infer({0: patch})
    by_type: Dict[str, float] = defaultdict(float)
    kernels: Dict[str, set] = defaultdict(set)
    for info in request.get_profiling_info():
        if info.status != info.Status.EXECUTED:
            continue
        by_type[info.node_type] += info.cpu_time.total_seconds()
        kernels[info.node_type].add(info.exec_type)
    return {"seconds": dict(by_type), "kernels": {key: sorted(value) for key, value in kernels.items()}}


def main(argv=None) -> int:
    from SlicerPTQLib.cpu_info import cpu_summary
    from SlicerPTQLib.evaluation import format_table, write_json
    from SlicerPTQLib.int8_compat import as_run_here
    from SlicerPTQLib.spec import ModelSpec

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build", type=Path, help="a build folder (model.fp32.onnx, model.int8.onnx, model.json)")
    parser.add_argument("--other", action="append", default=[], metavar="NAME=MODEL",
                        help="another model to profile beside them, e.g. nncf=nncf_int8/model.xml")
    parser.add_argument("--runs", type=int, default=10, help="profiled inferences per model, interleaved")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "profile_int8.json")
    args = parser.parse_args(argv)

    spec = ModelSpec.load(args.build / "model.json")
    with tempfile.TemporaryDirectory(prefix="profile-int8-") as scratch:
        int8_here = as_run_here(args.build / "model.int8.onnx", Path(scratch))
        models = {"fp32": args.build / "model.fp32.onnx", "slicerptq_int8": Path(int8_here)}
        models.update(dict(item.split("=", 1) for item in args.other))
        requests = {name: compile_profiled(Path(path), args.threads).create_infer_request()
                    for name, path in models.items()}
        rng = np.random.default_rng(0)
        patch = rng.standard_normal((1, spec.in_channels, *spec.roi_size)).astype(np.float32)
        for request in requests.values():  # warm-up
            request.infer({0: patch})
        runs: Dict[str, List[dict]] = {name: [] for name in requests}
        order = list(requests)
        for _ in range(args.runs):
            random.shuffle(order)
            for name in order:
                runs[name].append(profile_once(requests[name], patch))
                time.sleep(0)

    results = {}
    for name, profiles in runs.items():
        types = sorted({key for profile in profiles for key in profile["seconds"]})
        median = {key: float(np.median([profile["seconds"].get(key, 0.0) for profile in profiles])) for key in types}
        results[name] = {"cpu_s_by_type": median, "cpu_s_total": sum(median.values()),
                         "kernels": profiles[-1]["kernels"]}
    base = results["fp32"]
    rows = []
    for key in sorted(base["cpu_s_by_type"], key=lambda key: -base["cpu_s_by_type"][key]):
        row = {"layer type": key, "fp32 ms": round(1e3 * base["cpu_s_by_type"][key], 2)}
        for name in results:
            if name == "fp32":
                continue
            seconds = results[name]["cpu_s_by_type"].get(key, 0.0)
            row[f"{name} ms"] = round(1e3 * seconds, 2)
        rows.append(row)
    total = {"layer type": "all (sum of medians)", "fp32 ms": round(1e3 * base["cpu_s_total"], 2)}
    for name in results:
        if name != "fp32":
            total[f"{name} ms"] = round(1e3 * results[name]["cpu_s_total"], 2)
    rows.append(total)
    write_json({"cpu": cpu_summary(), "runs": args.runs, "threads": args.threads, "models": {k: str(v) for k, v in
                models.items()}, "results": results}, args.out)
    print(format_table(rows))
    for name in results:
        for key in ("Convolution", "ConvolutionBackpropData"):
            print(f"{name}: {key} kernels {results[name]['kernels'].get(key, [])}")
    for name in results:
        if name != "fp32":
            print(f"{name}: {base['cpu_s_total'] / max(results[name]['cpu_s_total'], 1e-12):.2f}x FP32 by "
                  f"summed layer CPU time")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
