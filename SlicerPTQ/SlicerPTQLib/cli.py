"""``slicer-ptq``: the command line over the core (also the Slicer worker).

Run with ``--progress-json`` (the Slicer module does) and every step is a
JSON line ``{"progress": {...}}`` on stdout, the outcome one ``{"result":
{...}}`` line, a failure one ``{"error": "..."}`` line and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from .errors import PTQError

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def expand_volumes(items: List[str]) -> List[Path]:
    """Files as given; folders expand to the volumes directly inside them."""
    paths: List[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.name.lower().endswith(VOLUME_SUFFIXES))
            if not found:
                raise PTQError(f"Folder {path} holds no volumes ({', '.join(VOLUME_SUFFIXES)}).")
            paths.extend(found)
        else:
            paths.append(path)
    return paths


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slicer-ptq", description=__doc__.splitlines()[0])
    parser.add_argument("--progress-json", action="store_true",
                        help="report progress and the result as JSON lines on stdout (for the Slicer module)")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="calibrate on unlabeled volumes and write a QDQ INT8 (or low-bit) ONNX model")
    q.add_argument("model", help="TorchScript/ONNX file, MONAI bundle folder, or state dict (with --arch)")
    q.add_argument("--calib", nargs="+", required=True, help="unlabeled volumes (files or folders)")
    q.add_argument("--out", required=True, type=Path, help="output folder")
    q.add_argument("--method", default="max", choices=["max", "percentile", "entropy", "mse", "auto"],
                   help="activation range observer; 'auto' tries each on calibration crops held back from its ranges, keeps "
                        "the one whose outputs are closest to FP32 (recorded in quantization.json)")
    q.add_argument("--roi", nargs="+", type=int, help="patch size (1 or 3 ints); default from the model metadata")
    q.add_argument("--num-crops", type=int, default=20)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--placement", default="cpu", choices=["cpu", "tensorrt"],
                   help="Q/DQ layout: 'cpu' is fastest on OpenVINO, 'tensorrt' follows TensorRT's fusion rules")
    q.add_argument("--weight-bits", type=int, default=8, choices=[8, 4, 3, 2],
                   help="below 8: low-bit weights by layer-wise ADMM (EfficientQ), run on INT8 kernels")
    q.add_argument("--lowbit-solver", default="admm", choices=["admm", "rtn"])
    q.add_argument("--accuracy-budget", type=float, metavar="DICE",
                   help="keep the layers INT8 hurts most in float until labels agree with FP32 at this Dice "
                        "on the calibration volumes, e.g. 0.99 (INT8 weights only)")
    q.add_argument("--arch", help="MONAI network name when MODEL is a state dict, e.g. UNet")
    q.add_argument("--arch-args", type=json.loads, default=None, help="JSON constructor arguments for --arch")
    q.add_argument("--spec", type=Path, help="model metadata JSON (default: found beside the model, see "
                                              "docs/model-metadata.md)")
    q.add_argument("--modality", help="input modality whose preprocessing to use (the metadata's "
                                      "'intensity_by_modality'), e.g. CT")
    q.add_argument("--trust-bundle-code", action="store_true",
                   help="let MONAI evaluate the Python expressions ('$...') and objects ('_target_') in a bundle's "
                        "configs; only for bundles whose author you trust (default: configs are read as data)")

    s = sub.add_parser("segment", help="segment a volume with a (quantized) model")
    s.add_argument("model", type=Path, help="model file with its metadata JSON beside it (with --server: the "
                                             "model's name in the server's repository)")
    s.add_argument("image", type=Path, nargs="+", help="a volume; several, or folders, with --out-dir")
    s.add_argument("--out", type=Path, help="label map: .nii.gz, .nrrd, or .seg.nrrd (segments)")
    s.add_argument("--out-dir", type=Path, help="cohort: one label map per volume here, a summary (CSV, JSON); "
                                                "volumes finished by an earlier run are skipped")
    s.add_argument("--format", default=".nii.gz", choices=[".nii.gz", ".nii", ".nrrd", ".seg.nrrd"],
                   help="label map format in --out-dir")
    s.add_argument("--server", help="Triton server's HTTP endpoint, e.g. http://127.0.0.1:8000: the network runs "
                                    "there, preprocessing and blending here")
    s.add_argument("--server-timeout", type=float, default=120.0, help="seconds to wait for one server request")
    s.add_argument("--retries", type=int, default=3, help="tries again of a failed server request")
    s.add_argument("--jobs", type=int, help="volumes in flight at once (default: 4 with --server, else 1)")
    s.add_argument("--runtime", choices=["openvino", "onnxruntime", "torch", "tensorrt"],
                   help="default: openvino for ONNX, torch for TorchScript")
    s.add_argument("--precision", help="runtime precision, e.g. fp32 or bf16 for float models on OpenVINO")
    s.add_argument("--batch-size", type=int, default=1, help="sliding-window patches per forward")
    s.add_argument("--spec", type=Path, help="model metadata JSON (default: found beside the model)")
    s.add_argument("--modality", help="input modality whose preprocessing to use, e.g. CT")
    s.add_argument("--no-self-check", action="store_true",
                   help="run a quantized model without first checking, once per machine and runtime, that its "
                        "INT8 labels agree with FP32's here")

    e = sub.add_parser("evaluate", help="FP32 vs quantized table: Dice, size, latency")
    e.add_argument("fp32_model", type=Path)
    e.add_argument("quantized_model", type=Path)
    e.add_argument("--images", nargs="+", required=True)
    e.add_argument("--labels", nargs="+", help="reference masks, in the order of --images")
    e.add_argument("--json", type=Path, help="also write the table as JSON here")
    e.add_argument("--spec", type=Path, help="model metadata JSON (default: found beside the quantized model)")

    d = sub.add_parser("demo", help="the whole pipeline on the shipped real model and volumes")
    d.add_argument("--out", type=Path, default=Path("ptq-demo"))
    d.add_argument("--method", default="max", choices=["max", "percentile", "entropy", "mse"])
    d.add_argument("--num-crops", type=int, default=20)
    d.add_argument("--repeats", type=int, default=5, help="timed forwards per latency figure")

    r = sub.add_parser("report", help="HTML report with plots from a benchmark or demo JSON")
    r.add_argument("results", type=Path, help="benchmarks/bench_backends.py JSON, or the demo's demo.json")
    r.add_argument("--out", type=Path, required=True, help="folder for index.html and its PNGs")

    t = sub.add_parser("export-triton", help="a Triton Inference Server model repository from a build")
    t.add_argument("build_dir", type=Path, help="the --out folder of slicer-ptq quantize")
    t.add_argument("--repo", type=Path, required=True, help="repository folder (new, empty, or an earlier export)")
    t.add_argument("--backends", nargs="+", default=["openvino", "python"], choices=["openvino", "tensorrt", "python"],
                   help="models to write: OpenVINO backend (CPU), TensorRT plan (GPU), Python backend running "
                        "this project's OpenVINO runtime")
    t.add_argument("--engine", type=Path, help="TensorRT engine to serve as the tensorrt model")
    t.add_argument("--max-batch", type=int, default=8, help="max_batch_size of each model")
    t.add_argument("--instances", type=int, default=1, help="instances of each model (instance_group count)")
    t.add_argument("--no-dynamic-batching", action="store_true", help="leave dynamic batching off")

    sub.add_parser("info", help="runtimes available here and the CPU's INT8 instruction sets")
    return parser


def _emit_result(args, payload: dict) -> None:
    if args.progress_json:
        print(json.dumps({"result": payload}, default=str), flush=True)


def _progress(args):
    if args.progress_json:
        from .progress import json_lines_callback

        return json_lines_callback()
    return None


def run(args) -> int:
    """Execute parsed arguments; raises PTQError on bad input."""
    from . import pipeline

    if args.command == "quantize":
        result = pipeline.quantize(args.model, expand_volumes(args.calib), args.out, method=args.method,
                                   num_crops=args.num_crops, roi=_roi(args.roi), seed=args.seed,
                                   placement=args.placement, weight_bits=args.weight_bits,
                                   lowbit_solver=args.lowbit_solver, arch=args.arch, arch_args=args.arch_args,
                                   accuracy_budget=args.accuracy_budget, progress=_progress(args),
                                   trust_bundle_code=args.trust_bundle_code, spec_file=args.spec,
                                   require_spec=True, modality=args.modality)
        sizes = result.report["size_mb"]
        _warn(result.report.get("warnings", []))
        if not args.progress_json:
            print(f"metadata   {result.report.get('spec_source', 'given')}")
            chosen = result.report.get("calibration_method", {})
            print(f"method     {chosen.get('chosen')} ({chosen.get('reason')}); "
                  f"{result.report['crops']['distinct']} distinct crops of {result.report['crops']['requested']}")
            print(f"FP32 ONNX  {result.fp32_onnx}  {sizes['fp32_onnx']:.2f} MB")
            print(f"quantized  {result.quantized_onnx}  {sizes['quantized_onnx']:.2f} MB "
                  f"({sizes['quantized_onnx'] / sizes['fp32_onnx']:.2f}x)")
            sensitivity = result.report.get("sensitivity")
            if sensitivity:
                print(pipeline.describe_sensitivity(sensitivity))
            print(pipeline.describe_self_check(result.report["self_check"]))
        _emit_result(args, {"fp32_onnx": result.fp32_onnx, "quantized_onnx": result.quantized_onnx,
                            "report": result.report})
    elif args.command == "segment" and (args.out_dir or args.server or len(args.image) > 1 or args.image[0].is_dir()):
        from .cohort import run_cli

        result = run_cli(args, expand_volumes([str(path) for path in args.image]), _progress(args))
        _emit_result(args, result)
        if result.get("counts", {}).get("error"):
            return 1  # the others are written; the summary names the failed volumes
    elif args.command == "segment":
        if args.out is None:
            raise PTQError("Give --out FILE for the label map (or --out-dir DIR for a cohort).")
        args.image = args.image[0]
        labels, timings = pipeline.segment(args.model, args.image, runtime=args.runtime, precision=args.precision,
                                           batch_size=args.batch_size, progress=_progress(args),
                                           self_check=not args.no_self_check, spec_file=args.spec,
                                           modality=args.modality)
        _warn(timings.get("warnings", []))
        pipeline.write_outputs(labels, pipeline.model_spec_for(args.model, args.spec, args.modality), args.out)
        if not args.progress_json:
            print(f"metadata: {args.spec or pipeline.find_sidecar(args.model)}")
            print(timings["self_check"])
            print(f"labels written to {args.out} in {timings['total_s']:.2f} s")
        _emit_result(args, {"labels": args.out, "timings": timings})
    elif args.command == "evaluate":
        from .evaluation import evaluate_models, format_table

        rows = evaluate_models(args.fp32_model, args.quantized_model, expand_volumes(args.images),
                               expand_volumes(args.labels) if args.labels else None, progress=_progress(args),
                               spec_file=args.spec)
        if not args.progress_json:
            print(format_table(rows))
        if args.json:
            from .evaluation import write_json

            write_json(rows, args.json)
        _emit_result(args, {"rows": rows})
    elif args.command == "demo":
        from .demo import run_demo

        summary = run_demo(args.out, method=args.method, num_crops=args.num_crops, repeats=args.repeats,
                           progress=_progress(args))
        _emit_result(args, summary)
    elif args.command == "report":
        from .report import build_report

        index = build_report(args.results, args.out)
        if not args.progress_json:
            print(f"report written to {index}")
        _emit_result(args, {"report": index})
    elif args.command == "export-triton":
        from .triton_export import describe, export_repository

        written = export_repository(args.build_dir, args.repo, backends=args.backends, engine=args.engine,
                                    max_batch=args.max_batch, dynamic_batching=not args.no_dynamic_batching,
                                    instances=args.instances)
        if not args.progress_json:
            print("\n".join(describe(written)))
        _emit_result(args, {"repository": args.repo, "models": sorted(written)})
    elif args.command == "info":
        from .cpu_info import cpu_summary
        from .runtimes import available_backends

        print(json.dumps({"cpu": cpu_summary(), "runtimes": available_backends()}, indent=2))
    return 0


def _warn(lines: List[str]) -> None:
    """Plausibility warnings: one line each on stderr, the run goes on."""
    for line in lines:
        print(f"slicer-ptq: warning: {line}", file=sys.stderr)


def _roi(values: Optional[List[int]]):
    if values is None:
        return None
    from .spec import spec_list

    return spec_list(values)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``slicer-ptq``; returns the exit code."""
    from .worker_process import exit_with_parent

    exit_with_parent()  # a worker of a Slicer session or a PTQLogic ends with it
    args = _parser().parse_args(argv)
    try:
        return run(args)
    except PTQError as exc:
        if args.progress_json:
            print(json.dumps({"error": str(exc)}), flush=True)
        print(f"slicer-ptq: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("slicer-ptq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
