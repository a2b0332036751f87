"""An HTML report (with PNG charts) of a benchmark or demo JSON file.

``build_report(benchmark_json, out_dir)`` reads what
``benchmarks/bench_backends.py`` (or ``slicer-ptq demo``) wrote and draws,
per model: per-patch latency and file size per backend, whole-volume time
split by stage, Dice per volume, INT8 against FP32 (agreement and time),
slices of each volume with the FP32 and INT8 segmentations overlaid, and
the per-layer executed precision of the OpenVINO models. Matplotlib runs on its Agg backend (no display needed).
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from .atomic import replacing
from .errors import PTQError

BENCHMARK_KIND = "slicer-ptq-benchmark"
DPI = 100
#: Colour per variant family, so a chart reads at a glance.
FAMILY_COLORS = {"baseline": "#8c8c8c", "bf16": "#6a9fd4", "nncf": "#e09b3d", "slicerptq": "#3a9a5b",
                 "lowbit": "#2a6f97"}
PRECISION_COLORS = {"int8": "#3a9a5b", "uint8": "#7bc47f", "fp32": "#d62728", "bf16": "#6a9fd4",
                    "fp16": "#9467bd", "int32": "#bbbbbb", "int64": "#bbbbbb", "bool": "#bbbbbb"}
#: Whole-volume stages as ``inference.segment_volume`` times them, and the benchmark's finer split.
STAGES = ("preprocess_s", "network_s", "restore_s")
STAGES_SPLIT = ("preprocess_s", "forward_s", "blend_s", "restore_s")
STAGE_NAMES = {"preprocess_s": "preprocess", "network_s": "sliding window", "forward_s": "network forward",
               "blend_s": "windows + blending", "restore_s": "labels + resample back"}
IMAGE_SIZES = {"latency": (8.0, 4.5), "size": (8.0, 4.5), "volume_time": (8.0, 4.5), "dice": (8.0, 4.5),
               "agreement": (8.0, 4.5), "overlay": (9.0, 9.0), "layers": (10.0, 4.0)}
#: Legends and value labels stay legible when the PNG is shown at page width.
LEGEND_FONTSIZE = 9


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise PTQError(f"The report needs matplotlib ({exc}). Install it with: pip install matplotlib") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def family(key: str) -> str:
    """The colour family of a variant key (``torch_fp32``, ``slicerptq_int8_max``, ...)."""
    if key.startswith("nncf"):
        return "nncf"
    if key.startswith("slicerptq_w"):
        return "lowbit"
    if key.startswith("slicerptq"):
        return "slicerptq"
    if "bf16" in key:
        return "bf16"
    return "baseline"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "model"


def _save(fig, path: Path) -> Path:
    """Write a figure atomically (temp file, then rename) and close it."""
    try:
        with replacing(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=DPI)
    finally:
        _pyplot().close(fig)
    return path


def load_benchmark(path: Path) -> Dict:
    """The benchmark dictionary from ``path``; a demo.json is translated into the same shape."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PTQError(f"Cannot read the benchmark file {path}: {exc}. Give the JSON written by "
                       "benchmarks/bench_backends.py or slicer-ptq demo.") from exc
    if isinstance(data, dict) and data.get("kind") == BENCHMARK_KIND:
        return data
    if isinstance(data, dict) and "patch_latency" in data and "volumes" in data:
        return _from_demo(data)
    if _is_evaluation(data):
        return _from_evaluation(data, path)
    raise PTQError(f"{path} is not a results file the report reads: give the JSON of "
                   "benchmarks/bench_backends.py, slicer-ptq demo (demo.json) or slicer-ptq evaluate --json.")


def _is_evaluation(data) -> bool:
    """Whether ``data`` is ``slicer-ptq evaluate --json``'s list of per-volume rows."""
    return (isinstance(data, list) and bool(data) and all(isinstance(row, dict) for row in data)
            and all("dice_quantized_vs_fp32" in row and "volume" in row for row in data))


def _volume_results(rows, fp32_key: str, quantized_key: str):
    """Per-volume rows of ``evaluation.evaluate_models`` as the benchmark's ``volumes``."""
    volumes = []
    for row in rows:
        fp32 = {"total_s": row.get("time_fp32_s"), "timings": row.get("timings_fp32"),
                "dice_vs_reference": row.get("dice_fp32_vs_reference"), "dice_vs_fp32": 1.0}
        quantized = {"total_s": row.get("time_quantized_s"), "timings": row.get("timings_quantized"),
                     "dice_vs_reference": row.get("dice_quantized_vs_reference"),
                     "dice_vs_fp32": row.get("dice_quantized_vs_fp32")}
        volumes.append({"volume": row["volume"], "results": {fp32_key: fp32, quantized_key: quantized}})
    return volumes


def _mean(values) -> Optional[float]:
    numbers = [float(v) for v in values if isinstance(v, (int, float))]
    return float(np.mean(numbers)) if numbers else None


def _with_volume_means(variants, volumes) -> list:
    """``variants`` with the table's whole-volume columns (mean time, mean Dice) from ``volumes``."""
    for variant in variants:
        results = [vol["results"][variant["key"]] for vol in volumes if variant["key"] in vol["results"]]
        variant.update({"volume_mean_s": _mean(r["total_s"] for r in results),
                        "dice_vs_reference_mean": _mean(r["dice_vs_reference"] for r in results),
                        "dice_vs_fp32_mean": _mean(r["dice_vs_fp32"] for r in results)})
    return variants


def _from_evaluation(rows, path: Path) -> Dict:
    """``slicer-ptq evaluate --json`` (one row per volume) in the benchmark's shape."""
    volumes = _volume_results(rows, "fp32", "slicerptq_int8")
    variants = _with_volume_means([{"key": "fp32", "label": str(rows[0].get("fp32", "FP32"))},
                                   {"key": "slicerptq_int8", "label": str(rows[0].get("quantized", "INT8"))}],
                                  volumes)
    return {"kind": BENCHMARK_KIND, "source": "evaluate", "cpu": {},
            "models": [{"name": path.stem, "variants": variants, "volumes": volumes}]}


def _from_demo(demo: Dict) -> Dict:
    """The demo's summary (``demo.run_demo``) in the benchmark's shape."""
    keys = {"PyTorch eager FP32": "torch_fp32", "OpenVINO FP32": "openvino_fp32",
            "OpenVINO INT8": "slicerptq_int8"}
    sizes = demo.get("size_mb", {})
    size_of = {"torch_fp32": sizes.get("torchscript"), "openvino_fp32": sizes.get("fp32_onnx"),
               "slicerptq_int8": sizes.get("quantized_onnx")}
    variants = []
    for row in demo["patch_latency"]:
        key = keys.get(row["backend"], _slug(row["backend"]))
        variants.append({"key": key, "label": row["backend"], "patch_median_s": row.get("median_s"),
                         "patch_p90_s": row.get("p90_s"), "size_mb": size_of.get(key),
                         "int8_layers": row.get("int8_layers")})
    volumes = _volume_results(demo["volumes"], "torch_fp32", "slicerptq_int8")
    _with_volume_means(variants, volumes)
    return {"kind": BENCHMARK_KIND, "source": "demo", "cpu": demo.get("cpu", {}),
            "settings": demo.get("settings", {}),
            "models": [{"name": Path(str(demo.get("model", "model"))).name, "variants": variants,
                        "volumes": volumes}]}


def _labels_and_values(variants: Sequence[Dict], field: str):
    rows = [v for v in variants if isinstance(v.get(field), (int, float))]
    return rows, [v["label"] for v in rows], [float(v[field]) for v in rows]


def _bar_chart(variants: Sequence[Dict], field: str, error_field: Optional[str], xlabel: str, title: str,
               path: Path, fmt: str) -> Optional[Path]:
    rows, labels, values = _labels_and_values(variants, field)
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=IMAGE_SIZES["latency"])
    positions = np.arange(len(rows))
    colors = [FAMILY_COLORS[family(v["key"])] for v in rows]
    ax.barh(positions, values, color=colors)
    ends = list(values)
    if error_field:
        ends = [max(float(v.get(error_field) or value), value) for v, value in zip(rows, values)]
        ax.errorbar(values, positions, xerr=[np.zeros(len(rows)), np.array(ends) - np.array(values)],
                    fmt="none", ecolor="black", capsize=3, linewidth=1)
    for position, value, end in zip(positions, values, ends):
        ax.text(end, position, " " + fmt.format(value), va="center", fontsize=8)
    ax.set_yticks(positions, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.set_xlim(0, max(ends) * 1.2)
    fig.tight_layout()
    return _save(fig, path)


def _volume_time_chart(model: Dict, path: Path) -> Optional[Path]:
    """Stacked bars: mean whole-volume time per variant split by stage (none without stage timings)."""
    volumes = model.get("volumes", [])
    variants = [v for v in model.get("variants", [])
                if any(v["key"] in vol.get("results", {}) for vol in volumes)]
    found = {stage for vol in volumes for result in vol["results"].values() for stage in (result.get("timings") or {})}
    # network_s = forward_s + blend_s when the benchmark split it: stack the finer stages.
    stages = [stage for stage in (STAGES_SPLIT if set(STAGES_SPLIT) <= found else STAGES) if stage in found]
    if not variants or not stages:
        return None  # the whole-volume totals are in the table; a "by stage" chart needs stages
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=IMAGE_SIZES["volume_time"])
    positions = np.arange(len(variants))

    def mean_of(key: str, getter) -> float:
        values = [getter(vol["results"][key]) for vol in volumes if key in vol["results"]]
        values = [float(v) for v in values if v is not None]
        return float(np.mean(values)) if values else 0.0

    totals = [mean_of(v["key"], lambda r: r.get("total_s")) for v in variants]
    left = np.zeros(len(variants))
    cmap = plt.get_cmap("tab10")
    for index, stage in enumerate(stages):
        widths = np.array([mean_of(v["key"], lambda r, s=stage: (r.get("timings") or {}).get(s))
                           for v in variants])
        ax.barh(positions, widths, left=left, color=cmap(index % 10), label=STAGE_NAMES[stage])
        left += widths
    other = np.clip(np.array(totals) - left, 0, None)
    if other.max() > 0.01 * max(totals):
        ax.barh(positions, other, left=left, color="#dddddd", label="other")
    ax.legend(fontsize=LEGEND_FONTSIZE, loc="best")
    for position, total in zip(positions, totals):
        ax.text(total, position, f" {total:.2f} s", va="center", fontsize=8)
    ax.set_yticks(positions, [v["label"] for v in variants], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("whole-volume wall time, mean over volumes (s)")
    ax.set_title("Whole volume (loaded image to label map): time by stage", fontsize=10)
    ax.set_xlim(0, max(totals) * 1.25 if max(totals) > 0 else 1)
    fig.tight_layout()
    return _save(fig, path)


def _dice_chart(model: Dict, path: Path) -> Optional[Path]:
    """Grouped bars: Dice vs the reference mask per volume, one bar per variant."""
    volumes = [vol for vol in model.get("volumes", [])
               if any(r.get("dice_vs_reference") is not None for r in vol.get("results", {}).values())]
    if not volumes:
        return None
    variants = [v for v in model.get("variants", [])
                if any(vol["results"].get(v["key"], {}).get("dice_vs_reference") is not None for vol in volumes)]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=IMAGE_SIZES["dice"])
    width = 0.8 / len(variants)
    lowest = 1.0
    cmap = plt.get_cmap("tab20")
    for index, variant in enumerate(variants):
        values = [vol["results"].get(variant["key"], {}).get("dice_vs_reference") for vol in volumes]
        values = [np.nan if v is None else float(v) for v in values]
        lowest = min([lowest] + [v for v in values if not np.isnan(v)])
        ax.bar(np.arange(len(volumes)) + (index - (len(variants) - 1) / 2) * width, values, width,
               label=variant["label"], color=cmap(index % 20))
    ax.set_xticks(np.arange(len(volumes)), [vol["volume"] for vol in volumes])
    ax.set_ylim(max(0.0, lowest - 0.05), 1.0)
    ax.set_ylabel("Dice vs reference mask")
    ax.set_title("Dice per volume, FP32 backends vs INT8", fontsize=10)
    # Beside the bars, not over them: with many variants an inside legend hid the bars it names.
    ax.legend(fontsize=LEGEND_FONTSIZE, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return _save(fig, path)


def _agreement_chart(model: Dict, path: Path) -> Optional[Path]:
    """INT8 against FP32 per volume: Dice of each quantized variant's labels with FP32's, and its
    whole-volume time as a fraction of FP32's (the baseline variant, the first one)."""
    volumes = model.get("volumes", [])
    variants = [v for v in model.get("variants", []) if family(v["key"]) not in ("baseline", "bf16")
                and any(vol["results"].get(v["key"], {}).get("dice_vs_fp32") is not None for vol in volumes)]
    if not variants:
        return None
    baseline = next((v["key"] for v in model.get("variants", []) if family(v["key"]) == "baseline"), None)
    plt = _pyplot()
    fig, (dice_ax, time_ax) = plt.subplots(1, 2, figsize=IMAGE_SIZES["agreement"])
    width = 0.8 / len(variants)
    cmap = plt.get_cmap("tab10")
    positions = np.arange(len(volumes))
    lowest = 1.0
    for index, variant in enumerate(variants):
        offset = (index - (len(variants) - 1) / 2) * width
        agreement = [vol["results"].get(variant["key"], {}).get("dice_vs_fp32") for vol in volumes]
        agreement = [np.nan if value is None else float(value) for value in agreement]
        lowest = min([lowest] + [value for value in agreement if not np.isnan(value)])
        dice_ax.bar(positions + offset, agreement, width, label=variant["label"], color=cmap(index % 10))
        ratios = []
        for vol in volumes:
            mine = vol["results"].get(variant["key"], {}).get("total_s")
            fp32 = vol["results"].get(baseline, {}).get("total_s") if baseline else None
            ratios.append(float(mine) / float(fp32) if mine and fp32 else np.nan)
        time_ax.bar(positions + offset, ratios, width, label=variant["label"], color=cmap(index % 10))
    names = [vol["volume"] for vol in volumes]
    dice_ax.set_xticks(positions, names, fontsize=8, rotation=20, ha="right")
    dice_ax.set_ylim(max(0.0, lowest - 0.02), 1.0)
    dice_ax.set_ylabel("Dice, INT8 labels vs FP32 labels")
    dice_ax.set_title("Agreement with FP32", fontsize=10)
    time_ax.set_xticks(positions, names, fontsize=8, rotation=20, ha="right")
    time_ax.axhline(1.0, color="black", linewidth=1)
    time_ax.set_ylabel("whole-volume time / FP32's")
    time_ax.set_title("Time against FP32 (below 1: faster)", fontsize=10)
    dice_ax.legend(fontsize=LEGEND_FONTSIZE, loc="lower left")
    fig.suptitle("INT8 vs FP32", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def _overlay_chart(slices_file: Path, title: str, path: Path) -> Optional[Path]:
    """3 orthogonal middle slices: image with the FP32 mask, with the INT8 mask, and where they differ."""
    if not slices_file.is_file():
        return None
    with np.load(slices_file) as data:
        arrays = {key: data[key] for key in data.files}
    fp32_name = str(arrays.get("fp32_label", "FP32"))
    int8_name = str(arrays.get("int8_label", "INT8"))
    plt = _pyplot()
    fig, axes = plt.subplots(3, 3, figsize=IMAGE_SIZES["overlay"])
    for axis in range(3):
        image = arrays[f"image_{axis}"].astype(np.float32)
        fp32 = arrays[f"fp32_{axis}"] > 0
        int8 = arrays[f"int8_{axis}"] > 0
        low, high = np.percentile(image, [1, 99]) if image.size else (0, 1)
        rows = [(fp32, fp32_name, (1.0, 0.55, 0.0)), (int8, int8_name, (0.1, 0.75, 0.3)),
                (fp32 ^ int8, "differ", (1.0, 0.0, 0.0))]
        for row, (mask, name, color) in enumerate(rows):
            ax = axes[row, axis]
            # Transposed and flipped so the slice shows in radiological-like upright view.
            ax.imshow(np.flipud(image.T), cmap="gray", vmin=low, vmax=high if high > low else low + 1)
            overlay = np.zeros(mask.T.shape + (4,), dtype=np.float32)
            overlay[..., :3] = color
            overlay[..., 3] = np.flipud(mask.T) * (0.45 if row < 2 else 0.9)
            ax.imshow(overlay)
            ax.set_xticks([])
            ax.set_yticks([])
            if axis == 0:
                ax.set_ylabel(f"{name}" if row < 2 else f"differ ({int((fp32 ^ int8).sum())} px)", fontsize=8)
            if row == 0:
                ax.set_title(("sagittal", "coronal", "axial")[axis], fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _layers_chart(layers: Sequence[Dict], title: str, path: Path) -> Optional[Path]:
    """Top: every executed layer in order, coloured by precision. Bottom: counts per layer type."""
    if not layers:
        return None
    plt = _pyplot()
    fig, (strip, counts) = plt.subplots(2, 1, figsize=IMAGE_SIZES["layers"],
                                        gridspec_kw={"height_ratios": [1, 3]})
    precisions = [layer.get("precision", "?") for layer in layers]
    colors = [PRECISION_COLORS.get(p, "#000000") for p in precisions]
    strip.bar(np.arange(len(layers)), np.ones(len(layers)), width=1.0, color=colors)
    strip.set_xlim(-0.5, len(layers) - 0.5)
    strip.set_yticks([])
    strip.set_xlabel("executed layers in order", fontsize=8)
    strip.set_title(title, fontsize=10)
    types = sorted({layer.get("type", "?") for layer in layers},
                   key=lambda t: -sum(1 for layer in layers if layer.get("type") == t))
    order = [p for p in PRECISION_COLORS if p in precisions] + sorted(set(precisions) - set(PRECISION_COLORS))
    bottom = np.zeros(len(types))
    for precision in order:
        heights = np.array([sum(1 for layer in layers if layer.get("type") == t and layer.get("precision") == precision)
                            for t in types], dtype=float)
        counts.bar(np.arange(len(types)), heights, bottom=bottom, label=precision,
                   color=PRECISION_COLORS.get(precision, "#000000"))
        bottom += heights
    counts.set_xticks(np.arange(len(types)), types, rotation=45, ha="right", fontsize=7)
    counts.set_ylabel("layers", fontsize=8)
    counts.legend(fontsize=7, title="executed precision", title_fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, dict) and "conv_int8" in value:
        return f"{value['conv_int8']}/{value['conv_total']}"
    return str(value)


VARIANT_COLUMNS = (
    ("label", "backend", None), ("patch_median_s", "patch median (s)", 4), ("patch_p90_s", "patch p90 (s)", 4),
    ("patch_min_s", "patch fastest (s)", 4), ("patch_cpu_median_s", "patch CPU time (s)", 4),
    ("speedup_vs_torch", "patch speed-up vs PyTorch", 2), ("volume_mean_s", "whole volume (s)", 3),
    ("volume_fastest_mean_s", "whole volume, fastest round (s)", 3),
    ("size_mb", "file (MiB)", 2), ("peak_rss_mb", "peak RSS (MiB)", 0), ("quantize_s", "quantize (s)", 1),
    ("dice_vs_reference_mean", "Dice vs reference", 4), ("dice_vs_fp32_mean", "Dice vs FP32", 4),
    ("int8_layers", "INT8 conv", None),
)


def _variant_table(variants: Sequence[Dict]) -> str:
    present = [(key, title, digits) for key, title, digits in VARIANT_COLUMNS
               if any(v.get(key) is not None for v in variants)]
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title, _ in present)
    body = []
    for variant in variants:
        cells = "".join(f"<td>{html.escape(_fmt(variant.get(key), digits if digits is not None else 3))}</td>"
                        for key, _, digits in present)
        body.append(f"<tr>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _img(path: Optional[Path], out_dir: Path, alt: str) -> str:
    if path is None:
        return ""
    return f'<p><img src="{html.escape(path.relative_to(out_dir).as_posix())}" alt="{html.escape(alt)}"></p>'


def _model_section(model: Dict, base_dir: Path, out_dir: Path) -> str:
    slug = _slug(model.get("name", "model"))
    variants = model.get("variants", [])
    parts = [f"<h2>{html.escape(str(model.get('name', 'model')))}</h2>"]
    if model.get("patch_shape"):
        parts.append(f"<p>Patch {html.escape(str(model['patch_shape']))}; calibration: "
                     f"{html.escape(', '.join(model.get('calibration', [])))}</p>")
    parts.append(_variant_table(variants))
    for skipped in model.get("skipped", []):
        parts.append(f"<p><i>Not run: {html.escape(skipped['label'])}: {html.escape(skipped['reason'])}</i></p>")
    for line in model.get("findings", []):
        parts.append(f"<p>{html.escape(line)}</p>")
    parts.append(_img(_bar_chart(variants, "patch_median_s", "patch_p90_s", "seconds per patch (bar: median, "
                                 "whisker: p90)", "Per-patch latency", out_dir / f"{slug}_latency.png",
                                 "{:.3f} s"), out_dir, "latency"))
    parts.append(_img(_bar_chart(variants, "size_mb", None, "file size (MiB)", "Model file size",
                                 out_dir / f"{slug}_size.png", "{:.2f} MiB"), out_dir, "size"))
    parts.append(_img(_volume_time_chart(model, out_dir / f"{slug}_volume_time.png"), out_dir, "volume time"))
    parts.append(_img(_dice_chart(model, out_dir / f"{slug}_dice.png"), out_dir, "dice"))
    parts.append(_img(_agreement_chart(model, out_dir / f"{slug}_agreement.png"), out_dir, "INT8 vs FP32"))
    profile = model.get("profile")
    if profile:
        parts.append("<h3>Sliding-window profile</h3>")
        parts.append(f"<pre>{html.escape(json.dumps(profile, indent=2))}</pre>")
    for volume in model.get("volumes", []):
        if volume.get("slices"):
            slices = base_dir / volume["slices"]
            parts.append(_img(_overlay_chart(slices, f"{model.get('name', '')}: {volume['volume']}",
                                             out_dir / f"{slug}_{_slug(volume['volume'])}_overlay.png"),
                              out_dir, f"overlay {volume['volume']}"))
    for key, layers in (model.get("layer_precisions") or {}).items():
        label = next((v["label"] for v in variants if v["key"] == key), key)
        parts.append(_img(_layers_chart(layers, f"{label}: executed precision per layer",
                                        out_dir / f"{slug}_{_slug(key)}_layers.png"), out_dir, f"layers {key}"))
    return "\n".join(part for part in parts if part)


def build_report(benchmark_json: Path, out_dir: Path) -> Path:
    """Write ``out_dir/index.html`` and its PNGs from a benchmark (or demo) JSON; returns the HTML path.

    Slice files named in the JSON (``volumes[].slices``, ``.npz`` with
    ``image_{0,1,2}``, ``fp32_{0,1,2}``, ``int8_{0,1,2}``) are read relative
    to the JSON's folder.
    """
    benchmark_json = Path(benchmark_json)
    data = load_benchmark(benchmark_json)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise PTQError(f"Report folder {out_dir} is a file. Give a folder path (it is created if missing).")
    out_dir.mkdir(parents=True, exist_ok=True)
    cpu = data.get("cpu", {})
    header = [
        "<h1>SlicerPTQ benchmark</h1>",
        f"<p>CPU: {html.escape(str(cpu.get('model', '?')))}; INT8 path: "
        f"{html.escape(str(cpu.get('int8_path', 'unknown')))}; instruction sets: "
        f"{html.escape(', '.join(cpu.get('isa', [])) or 'none found')}; threads: "
        f"{html.escape(str(data.get('threads', 'default')))}</p>",
    ]
    if data.get("load_average_at_end"):
        header.append(f"<p>Machine load average (1, 5, 15 min) at the end: "
                      f"{html.escape(', '.join(f'{v:.1f}' for v in data['load_average_at_end']))} "
                      "(other processes share the CPU: compare ratios within this run)</p>")
    if data.get("command"):
        header.append(f"<p>Command: <code>{html.escape(data['command'])}</code> "
                      f"({html.escape(str(data.get('created_utc', '')))})</p>")
    if data.get("settings"):
        header.append(f"<p>Settings: <code>{html.escape(json.dumps(data['settings']))}</code></p>")
    sections = [_model_section(model, benchmark_json.parent, out_dir) for model in data.get("models", [])]
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>SlicerPTQ benchmark</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;font-size:12px}"
            "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td:first-child{text-align:left}"
            "img{max-width:100%}</style></head><body>" + "\n".join(header + sections) + "</body></html>")
    index = out_dir / "index.html"
    with replacing(index) as tmp:
        tmp.write_text(page)
    return index
