"""SlicerPTQ against what users already run, on the same patches and volumes, in one run.

For each model (``backends_subjects``) this quantizes the variants
(``backends_variants``), serves each from its own worker process
(``backends_worker``), measures them all interleaved (``backends_measure``)
and writes the results (``backends_report``). Each model is one section of
the JSON and the markdown.

Run (about 10 minutes on 2 cores; --quick about 4)::

    python benchmarks/bench_backends.py [--quick] [--models shipped UNet SegResNet] [--out DIR]

Writes ``DIR/benchmark.json``, ``DIR/benchmark.md``, per-volume slice files
(``slices/*.npz``) and ``DIR/report/index.html`` (SlicerPTQLib.report).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, Optional, Sequence

BENCHMARKS = Path(__file__).resolve().parent
RESULTS = BENCHMARKS / "results"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

from backends_measure import measure  # noqa: E402  (sibling modules)
from backends_report import markdown, summarise  # noqa: E402
from backends_subjects import SHIPPED, Subject, registry_subject, shipped_subject  # noqa: E402
from backends_variants import DEFAULT_METHOD, METHODS, build_variants, default_crops, log  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from SlicerPTQLib import architectures
    from SlicerPTQLib.errors import PTQError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<UTC time>)")
    parser.add_argument("--models", nargs="+", default=[SHIPPED], metavar="NAME",
                        help="models, one section each: 'shipped' (deepbet, the default) and/or registry "
                             "architectures (e.g. UNet SegResNet) whose small 6-class version "
                             "train_small_models.py trained; a name without cached weights is skipped")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and crops (about 4 minutes)")
    parser.add_argument("--threads", type=int, default=2, help="threads per backend (default 2)")
    parser.add_argument("--repeats", type=int, help="interleaved timed patch rounds (default 15, quick 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forwards per backend first")
    parser.add_argument("--volume-repeats", type=int, help="whole-volume rounds per volume (default 3, quick 1)")
    parser.add_argument("--num-crops", type=int,
                        help="calibration crops (default: one per calibration volume when the model takes the "
                             "whole volume resized to its patch, as deepbet does, since more crops would only "
                             "repeat them; else 20)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="SlicerPTQ calibration methods (default all)")
    parser.add_argument("--max-volumes", type=int, help="use only the first N evaluation volumes")
    parser.add_argument("--no-lowbit", action="store_true", help="skip the low-bit (4-bit weight) variant")
    parser.add_argument("--no-profile", action="store_true", help="skip the many-window sliding-window profile")
    parser.add_argument("--no-report", action="store_true", help="do not render the HTML report")
    parser.add_argument("--no-ablation", action="store_true",
                        help="skip the Q/DQ-on-norm-inputs placement ablation")
    parser.add_argument("--only", nargs="+", metavar="KEY",
                        help="measure only these variants (keys: torch_fp32 onnxruntime_fp32 openvino_fp32 "
                             "openvino_bf16 nncf_int8_defaults nncf_int8 nncf_int8_same_float slicerptq_int8_<method> "
                             "slicerptq_int8_norm_inputs slicerptq_w4a8)")
    args = parser.parse_args(argv)
    for name in args.models:
        if name != SHIPPED:
            try:
                architectures.get(name)
            except PTQError as exc:
                parser.error(f"--models: {exc}")
    args.repeats = args.repeats or (5 if args.quick else 15)
    args.volume_repeats = args.volume_repeats or (1 if args.quick else 3)
    args.methods = args.methods or list(METHODS)
    if DEFAULT_METHOD not in args.methods:
        args.methods = [DEFAULT_METHOD] + args.methods
    return args


def bench_model(subject: Subject, args: argparse.Namespace, out: Path) -> Dict:
    """Quantize and measure one model; returns its section of the benchmark JSON."""
    from SlicerPTQLib.spec import ModelSpec, sidecar_path

    log(f"model {subject.path.name}; calibration {[p.name for p in subject.calibration]}; "
        f"evaluation {[c[0] for c in subject.cases]}")
    num_crops = args.num_crops or default_crops(ModelSpec.load(sidecar_path(subject.path)), subject.calibration)
    wanted = set(args.only or [])
    lowbit = not args.no_lowbit and (not wanted or "slicerptq_w4a8" in wanted)
    ablation = not args.no_ablation and (not wanted or "slicerptq_int8_norm_inputs" in wanted)
    variants, spec_path, skipped = build_variants(
        subject.path, subject.calibration, out / "models" / subject.folder, args.methods, num_crops, lowbit,
        nncf=not wanted or bool(wanted & {"nncf_int8", "nncf_int8_defaults"}),
        nncf_same_float=not wanted or "nncf_int8_same_float" in wanted,
        norm_inputs=ablation and subject.arch is None, arch=subject.arch, arch_args=subject.arch_args)
    if ablation and subject.arch is not None:
        skipped.append({"label": "SlicerPTQ INT8 (max, + Q/DQ on norm inputs)",
                        "reason": "placement ablation, run for the shipped model only"})
    if wanted:
        variants = [variant for variant in variants if variant.key in wanted]
    measured = measure(variants, spec_path, subject.cases, out, args.threads, args.repeats, args.warmup,
                       args.volume_repeats, not args.no_profile, reference=subject.reference,
                       slices=Path("slices") / subject.folder)
    section = summarise(subject.name, variants, measured, skipped, subject.calibration, args.threads)
    section["num_crops"] = num_crops
    section.update(subject.info)
    return section


def run(args: argparse.Namespace, command: str) -> Path:
    """Run the whole benchmark; returns the JSON path."""
    # Pinned before anything starts a thread pool; spawned workers inherit it.
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[variable] = str(args.threads)
    import torch

    from SlicerPTQLib.atomic import replacing
    from SlicerPTQLib.cpu_info import cpu_summary
    from SlicerPTQLib.errors import PTQError

    torch.set_num_threads(args.threads)
    out = args.out or RESULTS / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sections, skipped_models = [], []
    for name in args.models:
        if name == SHIPPED:
            sections.append(bench_model(shipped_subject(args.max_volumes), args, out))
            continue
        try:
            sections.append(bench_model(registry_subject(name, out, args.max_volumes), args, out))
        except Exception as exc:  # an untrained or failing registry model must not sink the others
            reason = str(exc) if isinstance(exc, PTQError) else f"{type(exc).__name__}: {exc}"
            log(f"{name} not run: {reason}")
            if not isinstance(exc, PTQError):
                log(traceback.format_exc(limit=4))
            skipped_models.append({"name": name, "reason": reason})
    benchmark = {
        "kind": "slicer-ptq-benchmark", "version": 1,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command, "cpu": cpu_summary(), "threads": args.threads,
        # Other processes share this machine: the load tells how noisy the timings are.
        "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "settings": {"quick": args.quick, "repeats": args.repeats, "warmup": args.warmup,
                     "volume_repeats": args.volume_repeats, "num_crops": args.num_crops,
                     "methods": args.methods, "versions": _versions()},
        "models": sections, "skipped_models": skipped_models,
    }
    benchmark["wall_s"] = time.perf_counter() - started
    json_path = out / "benchmark.json"
    for path, text in ((json_path, json.dumps(benchmark, indent=2, default=str)),
                       (out / "benchmark.md", markdown(benchmark))):
        with replacing(path) as tmp:
            tmp.write_text(text)
    if not args.no_report:
        from SlicerPTQLib.report import build_report

        index = build_report(json_path, out / "report")
        log(f"report: {index}")
    print(markdown(benchmark))
    log(f"done in {time.perf_counter() - started:.0f} s: {json_path}")
    return json_path


def _versions() -> Dict[str, str]:
    versions = {}
    for name in ("torch", "onnxruntime", "openvino", "nncf", "monai"):
        try:
            versions[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            versions[name] = "missing"
    return versions


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/bench_backends.py " + " ".join(argv if argv is not None else sys.argv[1:])
    run(args, command.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
