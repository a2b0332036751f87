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

from . import limits
from .errors import PTQError

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
METHODS = ["max", "percentile", "entropy", "mse", "auto"]
METHOD_HELP = ("how activation ranges are chosen from the calibration crops: 'max' (min/max), 'percentile', "
               "'entropy' (KL), 'mse', or 'auto' (each tried on crops held back from its ranges, the best few "
               "on the whole calibration volumes, the one whose labels agree best with FP32's kept and recorded "
               "in quantization.json); default max")
NUM_CROPS_HELP = f"calibration patches sampled from the volumes, 1 to {limits.MAX_NUM_CROPS} (default 20)"


def expand_volumes(items: List[str]) -> List[Path]:
    """Files as given; folders expand to the volumes directly inside them.

    Hidden files in a folder (macOS ``._name.nii.gz`` resource forks,
    ``.DS_Store``, editors' temporaries) are skipped: they are never volumes.
    """
    paths: List[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir()
                           if not p.name.startswith(".") and p.name.lower().endswith(VOLUME_SUFFIXES))
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
    q.add_argument("--method", default="max", choices=METHODS, help=METHOD_HELP)
    q.add_argument("--roi", nargs="+", type=int,
                   help=f"patch size in voxels (1 or 3 ints, each up to {limits.MAX_ROI} and a multiple of the "
                        "model's spatial_multiple); default from the model metadata")
    q.add_argument("--num-crops", type=int, default=20, help=NUM_CROPS_HELP)
    q.add_argument("--seed", type=int, default=0,
                   help=f"random seed of the crop sampling, 0 to {limits.MAX_SEED} (default 0)")
    q.add_argument("--placement", default="cpu", choices=["cpu", "tensorrt"],
                   help="Q/DQ layout: 'cpu' is fastest on OpenVINO, 'tensorrt' follows TensorRT's fusion rules")
    q.add_argument("--weight-bits", type=int, default=8, choices=[8, 4, 3, 2],
                   help="below 8: low-bit weights by layer-wise ADMM (EfficientQ), run on INT8 kernels")
    q.add_argument("--lowbit-solver", default="admm", choices=["admm", "rtn"],
                   help="with --weight-bits below 8: 'admm' fits each layer's weights to its outputs, "
                        "'rtn' rounds to nearest (faster, less accurate)")
    q.add_argument("--accuracy-budget", type=float, metavar="DICE",
                   help="keep the layers INT8 hurts most in float until labels agree with FP32 at this Dice "
                        "on the calibration volumes, e.g. 0.99 (INT8 weights only)")
    q.add_argument("--arch", help="MONAI network name when MODEL is a state dict, e.g. UNet")
    q.add_argument("--arch-args", type=_json_object, default=None,
                   help='JSON constructor arguments for --arch, e.g. \'{"spatial_dims": 3, "in_channels": 1}\'')
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
    s.add_argument("image", type=Path, nargs="+", help="volume to segment (.nii, .nii.gz, .nrrd, .nhdr); several, or folders, with --out-dir")
    s.add_argument("--out", type=Path, help="label map: .nii.gz, .nrrd, or .seg.nrrd (segments)")
    s.add_argument("--out-dir", type=Path, help="cohort: one label map per volume here, a summary (CSV, JSON); "
                                                "volumes finished by an earlier run are skipped")
    s.add_argument("--format", default=".nii.gz", choices=[".nii.gz", ".nii", ".nrrd", ".seg.nrrd"],
                   help="label map format in --out-dir")
    s.add_argument("--server", help="Triton server's HTTP or gRPC endpoint, e.g. http://127.0.0.1:8000 or "
                                    "grpc://127.0.0.1:8001: the network runs there, preprocessing and blending "
                                    "here (needs tritonclient)")
    s.add_argument("--server-timeout", type=float, default=120.0, help="seconds to wait for one server request")
    s.add_argument("--retries", type=int, default=3, help="tries again of a failed server request")
    s.add_argument("--jobs", type=int, help="volumes in flight at once (default: 4 with --server, else 1)")
    s.add_argument("--runtime", choices=["openvino", "onnxruntime", "torch", "tensorrt"],
                   help="default: openvino for ONNX, torch for TorchScript")
    s.add_argument("--precision", help="runtime precision, e.g. fp32 or bf16 for float models on OpenVINO")
    s.add_argument("--batch-size", type=int, default=1,
                   help=f"sliding-window patches per forward, 1 to {limits.MAX_BATCH_SIZE} (default 1)")
    s.add_argument("--spec", type=Path, help="model metadata JSON (default: found beside the model)")
    s.add_argument("--modality", help="input modality whose preprocessing to use, e.g. CT")
    s.add_argument("--no-self-check", action="store_true",
                   help="run a quantized model without first checking, once per machine and runtime, that its "
                        "INT8 labels agree with FP32's here")

    e = sub.add_parser("evaluate", help="FP32 vs quantized table: Dice, size, latency")
    e.add_argument("fp32_model", type=Path, help="the float model (TorchScript, ONNX) with its metadata JSON")
    e.add_argument("quantized_model", type=Path, help="the quantized ONNX model written by quantize")
    e.add_argument("--images", nargs="+", required=True, help="volumes to segment with both models (files or "
                                                              "folders)")
    e.add_argument("--labels", nargs="+",
                   help="reference label maps or binary masks (any type; > 0 is the label for one-label "
                        "models), in the order of --images")
    e.add_argument("--json", type=Path, help="also write the table as JSON here")
    e.add_argument("--spec", type=Path, help="model metadata JSON (default: found beside the quantized model)")

    d = sub.add_parser("demo", help="the whole pipeline on the shipped real model and volumes")
    d.add_argument("--out", type=Path, default=Path("ptq-demo"),
                   help="folder for the models and demo.json (default ./ptq-demo)")
    d.add_argument("--method", choices=METHODS,
                   help=METHOD_HELP.replace("default max", "default auto for the shipped model"))
    d.add_argument("--num-crops", type=int, default=20, help=NUM_CROPS_HELP)
    d.add_argument("--repeats", type=int, default=5,
                   help=f"timed forwards per latency figure, 1 to {limits.MAX_REPEATS} (default 5)")

    r = sub.add_parser("report", help="HTML report with plots from a benchmark or demo JSON")
    r.add_argument("results", type=Path,
                   help="benchmarks/bench_backends.py JSON, the demo's demo.json, or evaluate's --json")
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


def _json_object(text: str) -> dict:
    """``--arch-args``: a JSON object, with a sentence (not a traceback) when it is not one."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"is not valid JSON ({exc}); quote the whole object, e.g. "
                                         "'{\"spatial_dims\": 3, \"in_channels\": 1}'") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object of constructor arguments, got {text}")
    return value


def _check_input_file(path: Path, what: str, example: str) -> None:
    if not path.exists():
        raise PTQError(f"{what} {path} does not exist. Check the path.")
    if path.is_dir():
        raise PTQError(f"{what} {path} is a folder; give the file itself (e.g. {path / example}).")


def _is_cohort(args) -> bool:
    """``segment`` over many volumes, a folder, or through a server (:mod:`cohort`)."""
    return bool(args.out_dir or args.server or _many_volumes(args))


def _many_volumes(args) -> bool:
    return bool(args.out_dir or len(args.image) > 1 or args.image[0].is_dir())


def check_args(args) -> None:
    """Every option and path a command takes, checked before any work and before any output is created."""
    from .output_paths import check_output_file, check_output_folder
    from .volumes import WRITE_SUFFIXES, check_volume_path, volume_suffix

    if args.command == "quantize":
        limits.check_num_crops(args.num_crops)
        limits.check_seed(args.seed)
        _roi(args.roi)
        check_output_folder(args.out)
    elif args.command == "segment":
        from .cohort import check_options

        limits.check_batch_size(args.batch_size)
        check_options(args)
        if not args.server:  # with --server the model is a name on the server
            _check_input_file(args.model, "Model", "model.int8.onnx")
        if _many_volumes(args):  # each volume is checked by the cohort: one bad volume must not stop the rest
            check_output_folder(args.out_dir, "--out-dir")
            return
        check_volume_path(args.image[0], "Image")
        if not (args.out.name.lower().endswith(".seg.nrrd") or volume_suffix(args.out) in WRITE_SUFFIXES):
            raise PTQError(f"--out {args.out}: write a label map as {', '.join(WRITE_SUFFIXES)}, or a Slicer "
                           "segmentation as .seg.nrrd.")
        check_output_file(args.out)
    elif args.command == "evaluate":
        _check_input_file(args.fp32_model, "FP32 model", "model.fp32.onnx")
        _check_input_file(args.quantized_model, "Quantized model", "model.int8.onnx")
        if args.json is not None:
            check_output_file(args.json, "--json", create_parents=True)
    elif args.command == "demo":
        limits.check_num_crops(args.num_crops)
        limits.check_repeats(args.repeats)
        check_output_folder(args.out)
    elif args.command == "report":
        _check_input_file(args.results, "Results file", "demo.json")
        check_output_folder(args.out)


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

    check_args(args)

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
    elif args.command == "segment" and _is_cohort(args):
        from .cohort import SUMMARY_NAME, run_cli

        result = run_cli(args, expand_volumes([str(path) for path in args.image]), _progress(args))
        _emit_result(args, result)
        failed = [row["volume"] for row in result.get("volumes", []) if row["status"] == "error"]
        if failed:  # the others are written; the summary has each volume's reason
            shown = ", ".join(Path(name).name for name in failed[:3]) + (", ..." if len(failed) > 3 else "")
            return _fail(args, f"{len(failed)} of {len(result['volumes'])} volumes failed ({shown}); each one's "
                               f"reason is in {Path(args.out_dir) / SUMMARY_NAME}.csv; fix those inputs and run "
                               "again: finished volumes are skipped.")
    elif args.command == "segment":
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
        from .demo import DEMO_METHOD, run_demo

        summary = run_demo(args.out, method=args.method or DEMO_METHOD, num_crops=args.num_crops,
                           repeats=args.repeats, progress=_progress(args))
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

        if args.progress_json:  # the Slicer module asks a worker this once per session: "" = usable
            _emit_result(args, {"cpu": cpu_summary(), "runtimes": available_backends()})
        else:
            print(json.dumps({"cpu": cpu_summary(), "runtimes": _runtime_versions(available_backends())}, indent=2))
    return 0


def _runtime_versions(reasons: dict) -> dict:
    """``info``'s runtimes: the installed version of each usable one, else why it cannot run."""
    from importlib import metadata

    shown = {}
    for name, reason in reasons.items():
        if reason:
            shown[name] = f"not available: {reason}"
            continue
        try:
            shown[name] = metadata.version(name)
        except metadata.PackageNotFoundError:  # e.g. onnxruntime-gpu, tensorrt-cu12: ask the module itself
            module = __import__(name)
            shown[name] = str(getattr(module, "__version__", "installed"))
    return shown


def _warn(lines: List[str]) -> None:
    """Plausibility warnings: one line each on stderr, the run goes on."""
    for line in lines:
        print(f"slicer-ptq: warning: {line}", file=sys.stderr)


def _roi(values: Optional[List[int]]):
    if values is None:
        return None
    if len(values) not in (1, 3):
        raise PTQError(f"--roi takes 1 or 3 sizes (one per axis), got {len(values)}: {values}.")
    return list(limits.check_roi(values * 3 if len(values) == 1 else values))


def _show_warnings() -> None:
    """The core's warnings (assumptions made, suspicious results) on stderr, one line each."""
    import logging

    logger = logging.getLogger(__package__)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("slicer-ptq: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)


def _fail(args, message: str) -> int:
    if args.progress_json:
        print(json.dumps({"error": message}), flush=True)
    print(f"slicer-ptq: error: {message}", file=sys.stderr)
    return 1


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``slicer-ptq``; returns the exit code."""
    from .worker_process import exit_with_parent

    exit_with_parent()  # a worker of a Slicer session or a PTQLogic ends with it
    _show_warnings()
    args = _parser().parse_args(argv)
    try:
        return run(args)
    except PTQError as exc:
        return _fail(args, str(exc))
    except KeyboardInterrupt:
        print("slicer-ptq: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        # Last resort: a fault no check foresaw (disk full mid-write, a file removed under us).
        return _fail(args, f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}. Check that "
                           "the path exists, is writable and its disk has free space.")


if __name__ == "__main__":
    sys.exit(main())
