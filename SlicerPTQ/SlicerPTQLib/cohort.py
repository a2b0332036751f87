"""Segment a cohort: many volumes, a folder of outputs, a summary, resumable.

Each output ``<out_dir>/<stem><suffix>`` gets a sidecar ``<output>.json``
with the SHA-256 of the input, the model's identity and the output; a
volume whose sidecar still matches is skipped on the next run, so an
interrupted cohort (a killed server, a closed laptop) resumes where it
stopped. Up to ``jobs`` volumes are in flight at once (each worker thread
has its own runtime, e.g. its own connection to a Triton server); a
volume that fails is recorded with its error and the others go on.
``cohort_summary.csv`` and ``cohort_summary.json`` list every volume:
status, seconds, voxels per label, error.
"""

from __future__ import annotations

import csv
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from . import limits
from .atomic import replacing
from .errors import PTQError
from .fetch import sha256_of
from .progress import ProgressCallback
from .runtimes.base import Runtime
from .spec import ModelSpec

STAGE = "cohort"
SUMMARY_NAME = "cohort_summary"
OUTPUT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd")


@dataclass
class VolumeResult:
    """One row of the summary: ``status`` is "done", "skipped" (finished before) or "error"."""

    volume: str
    output: str
    status: str
    seconds: float = 0.0
    voxels: Dict[str, int] = field(default_factory=dict)
    error: str = ""
    #: plausibility warnings (:mod:`plausibility`): the volume may not be what the model segments
    warnings: List[str] = field(default_factory=list)


def output_path(image: Path, out_dir: Path, suffix: str) -> Path:
    from .volumes import volume_stem

    return Path(out_dir) / f"{volume_stem(image)}{suffix}"


def sidecar(output: Path) -> Path:
    return output.with_name(output.name + ".json")


def finished(image: Path, output: Path, model_id: str) -> Optional[Dict]:
    """The sidecar record when ``output`` is a verified result of ``image`` by this model, else None."""
    try:
        record = json.loads(sidecar(output).read_text())
        if (record.get("model") == model_id and record.get("input_sha256") == sha256_of(image)
                and output.is_file() and record.get("output_sha256") == sha256_of(output)):
            return record
    except (OSError, ValueError, AttributeError):
        pass
    return None


def voxels_per_label(labels: np.ndarray, spec: ModelSpec) -> Dict[str, int]:
    """``{label name: voxel count}`` for every label of the spec (0 when absent)."""
    counts = np.bincount(np.asarray(labels).ravel().astype(np.int64, copy=False))
    return {name: int(counts[value]) if value < len(counts) else 0 for value, name in sorted(spec.labels.items())}


def check_cohort(images: Sequence[Path], out_dir: Path, suffix: str) -> None:
    """Refuse, before any work, what would make outputs collide or land nowhere."""
    if not images:
        raise PTQError("No volumes to segment. Give volume files or folders of volumes.")
    if suffix not in OUTPUT_SUFFIXES:
        raise PTQError(f"Output format {suffix!r} is not one of {', '.join(OUTPUT_SUFFIXES)}.")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise PTQError(f"--out-dir {out_dir} is a file. Give a folder (it is created if missing).")
    seen: Dict[Path, Path] = {}
    for image in images:
        output = output_path(image, out_dir, suffix)
        if output.resolve() == Path(image).resolve():
            raise PTQError(f"{image} would be overwritten by its own labels. Give an --out-dir other than the "
                           "folder of the volumes, or another --format.")
        if output in seen:
            raise PTQError(f"{image} and {seen[output]} would both be written to {output}. Rename one, or "
                           "segment them into different --out-dir folders.")
        seen[output] = image


def segment_cohort(images: Sequence[Path], out_dir: Path, make_runtime: Callable[[], Runtime], spec: ModelSpec,
                   model_id: str, jobs: int = 1, batch_size: int = 1, suffix: str = ".nii.gz",
                   progress: Optional[ProgressCallback] = None,
                   report: Optional[Callable[[VolumeResult], None]] = None) -> List[VolumeResult]:
    """Segment ``images`` into ``out_dir``; returns one :class:`VolumeResult` per image, in order.

    ``make_runtime()`` gives a runtime for one worker thread (called at
    most ``jobs`` times). ``progress(stage, done, total)`` follows the
    volumes; ``report(result)`` is called as each volume ends.
    """
    images = [Path(image) for image in images]
    out_dir = Path(out_dir)
    check_cohort(images, out_dir, suffix)
    if jobs < 1 or batch_size < 1:
        raise PTQError(f"--jobs and --batch-size must be at least 1 (got {jobs} and {batch_size}).")
    out_dir.mkdir(parents=True, exist_ok=True)
    local = threading.local()
    runtimes: List[Runtime] = []
    lock = threading.Lock()
    done = [0]

    def runtime() -> Runtime:
        if getattr(local, "runtime", None) is None:
            local.runtime = make_runtime()
            with lock:
                runtimes.append(local.runtime)
        return local.runtime

    def one(image: Path) -> VolumeResult:
        output = output_path(image, out_dir, suffix)
        record = finished(image, output, model_id)
        if record is not None:
            result = VolumeResult(str(image), str(output), "skipped", record.get("seconds", 0.0),
                                  record.get("voxels", {}))
        else:
            start = time.perf_counter()
            try:
                result = _segment_one(image, output, runtime(), spec, model_id, batch_size, start)
            except PTQError as exc:
                result = VolumeResult(str(image), str(output), "error", time.perf_counter() - start, error=str(exc))
            except Exception as exc:  # one broken volume must not stop the cohort: record it, go on
                result = VolumeResult(str(image), str(output), "error", time.perf_counter() - start,
                                      error=f"{type(exc).__name__}: {exc}")
        with lock:
            done[0] += 1
            if progress is not None:
                progress(STAGE, done[0], len(images))
            if report is not None:
                report(result)
        return result

    results: Dict[int, VolumeResult] = {}
    try:
        with ThreadPoolExecutor(max_workers=min(jobs, len(images)), thread_name_prefix="cohort") as pool:
            futures = {pool.submit(one, image): index for index, image in enumerate(images)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
    finally:
        for engine in runtimes:
            engine.close()
    ordered = [results[index] for index in range(len(images))]
    write_summary(ordered, out_dir)
    return ordered


def _segment_one(image: Path, output: Path, runtime: Runtime, spec: ModelSpec, model_id: str,
                 batch_size: int, start: float) -> VolumeResult:
    from . import plausibility
    from .inference import segment_volume
    from .pipeline import write_outputs
    from .volumes import read_volume

    input_sha = sha256_of(image)
    volume = read_volume(image)
    warnings = plausibility.check(volume, spec)
    labels, _ = segment_volume(runtime, volume, spec, batch_size=batch_size)
    write_outputs(labels, spec, output)
    seconds = time.perf_counter() - start
    voxels = voxels_per_label(labels.array, spec)
    record = {"volume": str(image), "input_sha256": input_sha, "model": model_id, "output": output.name,
              "output_sha256": sha256_of(output), "seconds": seconds, "voxels": voxels}
    with replacing(sidecar(output)) as tmp:
        tmp.write_text(json.dumps(record, indent=2))
    return VolumeResult(str(image), str(output), "done", seconds, voxels, warnings=warnings)


def remote_source(server: str, model: str, timeout: float, retries: int):
    """``(make_runtime, spec, model_id)`` for model ``model`` on the Triton server at ``server``.

    Connects once first, so a missing server or model stops the cohort
    before any volume is read.
    """
    import hashlib

    from .runtimes.triton_runtime import TritonRuntime

    probe = TritonRuntime(server, model, timeout=timeout, retries=retries)
    try:
        spec = probe.spec()
    finally:
        probe.close()
    digest = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
    # The identity leaves the URL out: a restarted server (another port) serving the same model resumes.
    return (lambda: TritonRuntime(server, model, timeout=timeout, retries=retries), spec,
            f"triton:{model}:{digest}")


def local_source(model_path: Path, runtime: Optional[str], precision: Optional[str], batch_size: int,
                 self_check: bool, first_image: Path, spec_file: Optional[Path] = None,
                 modality: Optional[str] = None, jobs: int = 1):
    """``(make_runtime, spec, model_id)`` for a model file run here (self-checked once, as ``segment`` does);
    ``spec_file`` and ``modality`` as in :func:`pipeline.segment`. With ``jobs`` volumes in flight, each
    runtime takes its share of the cores instead of all of them."""
    import hashlib
    import os

    from . import pipeline
    from .runtimes import create_runtime
    from .volumes import read_volume

    model_path = Path(model_path)
    spec = pipeline.model_spec_for(model_path, spec_file, modality)
    backend = runtime or pipeline.default_backend(model_path)
    probe = create_runtime(model_path, backend, precision=precision, batch_size=batch_size)
    try:
        if self_check and probe.precision == "int8":
            pipeline.ensure_checked(model_path, backend, spec, read_volume(first_image))
    finally:
        probe.close()
    # The spec is part of the identity: other preprocessing (another --spec or --modality) redoes the outputs.
    spec_digest = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    return (lambda: create_runtime(model_path, backend, precision=precision, threads=threads,
                                   batch_size=batch_size), spec,
            f"{backend}:{probe.precision}:{sha256_of(model_path)}:{spec_digest}")


def segment_remote(server: str, model: str, volume, batch_size: int = 1, timeout: float = 120.0,
                   retries: int = 3, progress: Optional[ProgressCallback] = None):
    """One volume through model ``model`` on a Triton server: ``(labels, timings, spec)``; ``timings`` has
    the plausibility ``"warnings"`` as a local ``pipeline.segment`` gives them."""
    from . import plausibility
    from .inference import segment_volume
    from .pipeline import read_any
    from .runtimes.triton_runtime import TritonRuntime

    engine = TritonRuntime(server, model, timeout=timeout, retries=retries)
    try:
        spec = engine.spec()
        image = read_any(volume)
        warnings = plausibility.check(image, spec)
        labels, timings = segment_volume(engine, image, spec, batch_size=batch_size, progress_callback=progress)
    finally:
        engine.close()
    timings["self_check"] = f"not self-checked: runs on the Triton server at {engine.url}"
    timings["warnings"] = warnings
    return labels, timings, spec


def write_summary(results: Sequence[VolumeResult], out_dir: Path) -> Dict[str, Path]:
    """``cohort_summary.json`` and ``.csv`` (one column per label), written atomically."""
    labels = sorted({name for result in results for name in result.voxels})
    paths = {"json": Path(out_dir) / f"{SUMMARY_NAME}.json", "csv": Path(out_dir) / f"{SUMMARY_NAME}.csv"}
    with replacing(paths["json"]) as tmp:
        tmp.write_text(json.dumps({"volumes": [asdict(result) for result in results],
                                   "counts": counts(results)}, indent=2))
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["volume", "output", "status", "seconds", *[f"voxels {name}" for name in labels], "error",
                     "warnings"])
    for result in results:
        writer.writerow([result.volume, result.output, result.status, f"{result.seconds:.3f}",
                         *[result.voxels.get(name, "") for name in labels], result.error,
                         " | ".join(result.warnings)])
    with replacing(paths["csv"]) as tmp:
        tmp.write_text(text.getvalue())
    return paths


def counts(results: Sequence[VolumeResult]) -> Dict[str, int]:
    """``{"done": n, "skipped": n, "error": n}``."""
    tally = {"done": 0, "skipped": 0, "error": 0}
    for result in results:
        tally[result.status] += 1
    return tally


def describe(result: VolumeResult) -> str:
    """One line per volume for the CLI."""
    if result.status == "error":
        return f"{result.volume}: error: {result.error}"
    warned = "".join(f"\n  warning: {line}" for line in result.warnings)
    return f"{result.volume}: {result.status} ({result.seconds:.2f} s) -> {result.output}{warned}"


def check_options(args) -> None:
    """``segment``'s option combinations, refused before any file is read (they need none)."""
    if args.server:
        from .runtimes.triton_runtime import check_server_url

        check_server_url(args.server)
    if args.server and (args.runtime or args.precision):
        raise PTQError("--runtime/--precision and --server do not combine: with --server the model runs on the "
                       "server as exported. Drop one of them.")
    if args.server and (args.spec or args.modality):
        raise PTQError("--spec/--modality and --server do not combine: the server's model carries its metadata "
                       "(export it again with the metadata you want). Drop one of them.")
    if args.out_dir is None:
        folders = [Path(path) for path in args.image if Path(path).is_dir()]
        if folders:
            raise PTQError(f"Image {folders[0]} is a folder, not a file: give --out-dir DIR to segment every "
                           "volume in it, or one volume file with --out FILE.")
        if len(args.image) != 1:
            raise PTQError("Several volumes go to a folder: give --out-dir DIR (or one volume with --out FILE).")
        if args.out is None:
            raise PTQError("Give --out FILE for the label map (or --out-dir DIR for a cohort).")
    elif args.out is not None:
        raise PTQError("--out and --out-dir do not combine. Give --out FILE for one volume or --out-dir DIR.")
    if args.out_dir is None and args.jobs is not None:
        raise PTQError("--jobs sets the volumes in flight of a cohort: give --out-dir DIR, or drop --jobs.")
    if args.jobs is not None:
        limits.check_jobs(args.jobs)
    limits.check_server_settings(args.server_timeout, args.retries)
    if args.out is not None and any(Path(args.out).resolve() == Path(path).resolve() for path in args.image):
        raise PTQError(f"--out {args.out} is the image itself: its labels would overwrite it. Give another file.")


def run_cli(args, images: List[Path], progress: Optional[ProgressCallback]) -> Dict:
    """``slicer-ptq segment`` with ``--out-dir``, ``--server`` or several volumes (options checked by
    :func:`check_options`); returns the CLI result."""
    if args.out_dir is not None:
        check_cohort(images, args.out_dir, args.format)  # before any model is loaded or server asked
    if args.out_dir is None:
        if args.server:
            labels, timings, spec = segment_remote(args.server, str(args.model), images[0], args.batch_size,
                                                   args.server_timeout, args.retries, progress)
            from .pipeline import write_outputs

            write_outputs(labels, spec, args.out)
            if not args.progress_json:
                print(f"labels written to {args.out} in {timings['total_s']:.2f} s")
            return {"labels": args.out, "timings": timings, "spec": spec.to_dict()}  # the caller's segment names
    if args.server:
        make_runtime, spec, model_id = remote_source(args.server, str(args.model), args.server_timeout,
                                                     args.retries)
    else:
        make_runtime, spec, model_id = local_source(args.model, args.runtime, args.precision, args.batch_size,
                                                    not args.no_self_check, images[0], args.spec, args.modality,
                                                    jobs=args.jobs or 1)
    jobs = args.jobs or (4 if args.server else 1)
    ended = [0]

    def report(result: VolumeResult) -> None:
        ended[0] += 1
        print(f"[{ended[0]}/{len(images)}] {describe(result)}", flush=True)

    results = segment_cohort(images, args.out_dir, make_runtime, spec, model_id, jobs=jobs,
                             batch_size=args.batch_size, suffix=args.format, progress=progress,
                             report=None if args.progress_json else report)
    tally = counts(results)
    if not args.progress_json:
        print(f"{tally['done']} segmented, {tally['skipped']} already done, {tally['error']} failed; summary in "
              f"{Path(args.out_dir) / SUMMARY_NAME}.csv")
    return {"out_dir": args.out_dir, "counts": tally, "volumes": [asdict(result) for result in results]}
