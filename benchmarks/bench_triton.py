"""Load on a real Triton server: cohorts through 1, 2, 4 and 8 concurrent clients.

Quantizes the shipped model (deepbet's brain extraction, INT8, max, one
calibration volume), exports the Triton repository twice (dynamic batching
on and off), starts NVIDIA's ``tritonserver`` from the ``nvidia-pytriton``
wheel on 127.0.0.1 (Python backend running this project's OpenVINO
runtime, one instance), and segments a cohort of the shipped evaluation
volumes (repeated up to ``--volumes``) with ``SlicerPTQLib.cohort`` at each
client count, over gRPC and HTTP (``tritonclient``): each client is a
worker thread with its own connection, at most that many volumes in flight. The same cohort also runs in one local
process (OpenVINO, no server) for reference.

Reports volumes per minute and the p50/p99 of one volume's wall time
(read, preprocess, network on the server, blending, write). Loopback only:
the numbers show the server's overhead and queueing on this machine, not a
network.

Run (about 5-8 minutes on 2 shared cores)::

    python benchmarks/bench_triton.py [--volumes 8] [--clients 1 2 4 8] [--protocols grpc http]
        [--out benchmarks/results/triton.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "SlicerPTQ"))

from SlicerPTQLib import pipeline, shipped, triton_server  # noqa: E402
from SlicerPTQLib.cohort import local_source, remote_source, segment_cohort  # noqa: E402
from SlicerPTQLib.triton_export import export_repository, model_name  # noqa: E402


PROTOCOL_NAMES = {"grpc": "gRPC", "http": "HTTP"}


def cohort_inputs(folder: Path, count: int) -> List[Path]:
    """``count`` volume files: the evaluation volumes, copied round-robin under distinct names."""
    cases = shipped.evaluation_volumes()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        _, image, _ = cases[index % len(cases)]
        path = folder / f"v{index:03d}_{image.name}"
        shutil.copyfile(image, path)
        paths.append(path)
    return paths


def measure(images: List[Path], out: Path, source, jobs: int) -> Dict:
    make_runtime, spec, model_id = source
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    results = segment_cohort(images, out, make_runtime, spec, model_id, jobs=jobs)
    wall = time.perf_counter() - start
    failed = [result.error for result in results if result.status != "done"]
    if failed:
        raise SystemExit(f"cohort failed: {failed[0]}")
    seconds = np.array([result.seconds for result in results])
    return {"clients": jobs, "volumes": len(images), "wall_s": round(wall, 2),
            "volumes_per_min": round(60.0 * len(images) / wall, 2),
            "p50_s": round(float(np.percentile(seconds, 50)), 3),
            "p99_s": round(float(np.percentile(seconds, 99)), 3)}


def markdown(rows: List[Dict]) -> str:
    lines = ["| setup | clients | volumes/min | p50 volume (s) | p99 volume (s) | wall (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['setup']} | {row['clients']} | {row['volumes_per_min']} | {row['p50_s']} | "
                     f"{row['p99_s']} | {row['wall_s']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=8)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--protocols", nargs="+", choices=["grpc", "http"], default=["grpc", "http"],
                        help="the client's protocols to the server (tritonclient)")
    parser.add_argument("--out", type=Path, default=RESULTS / "triton.json")
    args = parser.parse_args()
    triton_server.install()
    reason = triton_server.unavailable_reason() or triton_server.python_backend_reason()
    if reason:
        raise SystemExit(f"Triton server cannot run here: {reason}")
    work = Path(tempfile.mkdtemp(prefix="bench-triton-"))
    try:
        build = pipeline.quantize(shipped.shipped_model(), shipped.calibration_volumes()[:1], work / "build",
                                  num_crops=1)
        images = cohort_inputs(work / "in", args.volumes)
        name = model_name(build.spec, "python")
        rows = []
        local = local_source(build.quantized_onnx, "openvino", None, 1, True, images[0])
        measure(images[:1], work / "warm", local, 1)
        rows.append({"setup": "local process (OpenVINO, no server)", **measure(images, work / "out", local, 1)})
        for batching in (True, False):
            repo = work / f"repo-{batching}"
            export_repository(build.out_dir, repo, backends=["python"], dynamic_batching=batching)
            with triton_server.TritonServer(repo, models=[name]) as server:
                for protocol in args.protocols:
                    url = server.grpc_url if protocol == "grpc" else server.url
                    source = remote_source(url, name, timeout=600, retries=1)
                    measure(images[:1], work / "warm", source, 1)
                    label = f"Triton {PROTOCOL_NAMES[protocol]}, dynamic batching {'on' if batching else 'off'}"
                    for clients in args.clients:
                        rows.append({"setup": label, **measure(images, work / "out", source, clients)})
                        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    from SlicerPTQLib.cpu_info import cpu_summary

    report = {"machine": {"cpu": cpu_summary(), "cores": os.cpu_count(),
                         "python": platform.python_version(), "server": triton_server.PACKAGE},
              "model": "deepbet bbox (INT8, 128^3, one window per volume)", "rows": rows,
              "markdown": markdown(rows)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    args.out.with_suffix(".md").write_text(report["markdown"] + "\n")
    print(report["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
