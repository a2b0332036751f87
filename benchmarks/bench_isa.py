"""INT8 agreement with FP32 on every architecture, on every int8 path this CPU can reach.

oneDNN honours ``ONEDNN_MAX_CPU_ISA``, so an AMX machine also runs the
AVX-512 VNNI and AVX2 (no VNNI) paths; a lower ISA cannot be raised, so the
JSON records which paths really ran. For each registry architecture (small
configuration, seeded random weights, one real T1 volume cropped to the
patch, 3 classes): export -> calibrate -> QDQ INT8 once, then in one
subprocess per ISA, OpenVINO INT8 vs OpenVINO FP32 on held-out patches of
the same volume: argmax agreement, output correlation, and the adaptation
OpenVINO applied (``SlicerPTQLib.int8_compat``). Random weights make the
agreement say nothing of accuracy; the point is the same file's numbers
across ISAs.

    python benchmarks/bench_isa.py --out benchmarks/results/isa.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict

import numpy as np

ISAS = ("native", "AVX512_CORE_VNNI", "AVX2")


def reachable_isas() -> tuple:
    """The caps below this CPU's own int8 level (a cap above it would only repeat the native run)."""
    from SlicerPTQLib.cpu_info import isa_flags
    from SlicerPTQLib.int8_compat import int8_path

    native = int8_path(isa_flags(), environ={})
    caps = {"AVX512_CORE_VNNI": native.shift_activations is False,  # only AMX sits above VNNI
            "AVX2": native.pair_safe_weights is False}
    return ("native",) + tuple(isa for isa in ISAS[1:] if caps[isa])
ROI = 32        # patch size, or the architecture's minimum where larger (64)
LARGEST = 64
CLASSES = 3

_EVALUATE = """
import json, sys
import numpy as np
from SlicerPTQLib.runtimes import create_runtime
folder, patches = sys.argv[1], np.load(sys.argv[2])
fp32 = create_runtime(folder + "/m.fp32.onnx", "openvino", precision="fp32", threads=2)
int8 = create_runtime(folder + "/m.int8.onnx", "openvino", threads=2)
ref = np.concatenate([fp32.predict(p[None]) for p in patches])
out = np.concatenate([int8.predict(p[None]) for p in patches])
print(json.dumps({"agreement": float((ref.argmax(1) == out.argmax(1)).mean()),
                  "correlation": float(np.corrcoef(ref.ravel(), out.ravel())[0, 1]),
                  "adaptation": int8.int8_adaptation}))
"""


def patches_from_a_real_volume(count: int) -> np.ndarray:
    """``count + 2`` z-scored LARGEST^3 patches of the shipped MNI152 T1 (2 calibrate, the rest evaluate)."""
    from SlicerPTQLib import shipped
    from SlicerPTQLib.volumes import read_volume

    image = read_volume(shipped.evaluation_volumes()[0][1]).array.astype(np.float32)
    image = (image - image.mean()) / (image.std() + 1e-6)
    centre = np.array(image.shape) // 2
    rng = np.random.default_rng(0)
    patches = []
    for _ in range(count + 2):
        corner = centre - LARGEST // 2 + rng.integers(-24, 25, 3)
        box = tuple(slice(int(c), int(c) + LARGEST) for c in corner)
        patches.append(image[box][None])
    return np.stack(patches)


def quantize_architecture(name: str, folder: Path, patches: np.ndarray) -> np.ndarray:
    """Write ``m.fp32.onnx`` and ``m.int8.onnx`` (2 calibration patches); return the evaluation patches."""
    import torch

    from SlicerPTQLib import architectures
    from SlicerPTQLib.export import export_onnx
    from SlicerPTQLib.float_policy import float_policy_nodes
    from SlicerPTQLib.qdq import quantize_onnx

    entry = architectures.get(name)
    size = max(ROI, entry.min_size)
    patches = patches[..., :size, :size, :size]
    roi = (size,) * 3
    torch.manual_seed(0)
    module = architectures.build(name, architectures.config_args(name, "small", out_channels=CLASSES, roi=roi))
    fp32 = export_onnx(module, folder / "m.fp32.onnx", 1, (1, 1, *roi), dynamic_spatial=entry.dynamic_spatial)
    quantize_onnx(fp32, folder / "m.int8.onnx", list(patches[:2]), keep_float=float_policy_nodes(fp32))
    return patches[2:]


def evaluate_on(isa: str, folder: Path, patches_file: Path) -> Dict:
    env = {key: value for key, value in os.environ.items() if key != "ONEDNN_MAX_CPU_ISA"}
    if isa != "native":
        env["ONEDNN_MAX_CPU_ISA"] = isa
    done = subprocess.run([sys.executable, "-c", _EVALUATE, str(folder), str(patches_file)],
                          env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    from SlicerPTQLib import architectures
    from SlicerPTQLib.cpu_info import cpu_summary
    from SlicerPTQLib.evaluation import format_table, write_json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="*", default=list(architectures.REGISTRY))
    parser.add_argument("--patches", type=int, default=4, help="held-out patches per architecture")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "isa.json")
    args = parser.parse_args(argv)

    patches = patches_from_a_real_volume(args.patches)
    isas = reachable_isas()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-isa-") as scratch:
        for name in args.arch:
            folder = Path(scratch) / name
            folder.mkdir()
            patches_file = folder / "patches.npy"
            row = {"architecture": name}
            start = time.perf_counter()
            try:
                np.save(patches_file, np.ascontiguousarray(quantize_architecture(name, folder, patches)))
            except Exception as exc:  # one failing row must not stop the table
                row["error"] = f"{type(exc).__name__}: {exc}"
                rows.append(row)
                continue
            for isa in isas:
                result = evaluate_on(isa, folder, patches_file)
                row[f"{isa} agreement"] = result.get("agreement")
                row[f"{isa} correlation"] = result.get("correlation")
                row[f"{isa} adaptation"] = result.get("adaptation", result.get("error"))
            row["seconds"] = round(time.perf_counter() - start, 1)
            print(json.dumps(row), flush=True)
            rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json({"cpu": cpu_summary(), "isas": isas, "rows": rows}, args.out)
    table = [{key: value for key, value in row.items() if not key.endswith("adaptation")} for row in rows]
    print(format_table(table))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
