"""Train small multi-class versions of every registry architecture on a real T1 MRI.

No multi-class pretrained 3D network ships offline, so the architecture
benchmark measures INT8 against FP32 on networks trained here: the small
configuration of each entry of ``SlicerPTQLib.architectures`` learns the 6
tissue classes of the ITK example T1 head (``KmeansTest_T1UCharRaw`` and its
``KmeansTest_T1KmeansPrelimSegmentation``, Debian insighttoolkit5-examples,
Apache-2.0; the labels are a k-means tool output, not expert labels).

The volume is reoriented to RAS and resampled to 2 mm, intensities are
quantile-normalised; training draws random 64^3 crops (batch 2, Dice+CE
loss, AdamW, one-cycle schedule) for ``--steps`` steps on 2 CPU threads. Weights are cached in
``<cache>/trained/`` under a key of the architecture, its arguments, the
data checksums and the training settings (never committed); a second run
reuses them. Each record says what was trained, on what, for how long and
the final Dice on the training volume (sliding window, mean over classes
1-5).

    python benchmarks/train_small_models.py --steps 200 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from SlicerPTQLib import architectures
from SlicerPTQLib.atomic import replacing
from SlicerPTQLib.fetch import Source, cache_dir, fetch_all
from SlicerPTQLib.spec import Intensity, ModelSpec

TRAINING_VERSION = 2  # bump when the recipe changes so cached weights are retrained
BATCH = 2
NUM_CLASSES = 6
ROI = (64, 64, 64)
SPACING = (2.0, 2.0, 2.0)

_ITK = dict(registry="debian", package="insighttoolkit5-examples", version="5.2.1-5+deb12u1",
            archive_sha256="6ca1f323eac0b3cba50e786bbf0f2c76ed44b52ecb9e7aeea808ccc42bf09f69")
_ITK_DIR = "usr/share/doc/insighttoolkit5-examples/examples/Data/"
IMAGE = Source(member=_ITK_DIR + "KmeansTest_T1UCharRaw.nii.gz",
               member_sha256="e0e5975587f3f7916804bdd317c493cdb99cdb3703bf2671d458528f62510327", **_ITK)
LABELS = Source(member=_ITK_DIR + "KmeansTest_T1KmeansPrelimSegmentation.nii.gz",
                member_sha256="8f48a7ced6d27644489b8a2fc8084bf6594560d05f8997ad4327b6353d11f342", **_ITK)
CLASS_NAMES = {1: "tissue class 2", 2: "tissue class 3", 3: "tissue class 4", 4: "tissue class 5",
               5: "tissue class 6"}


def training_spec(name: str) -> ModelSpec:
    """How the trained networks read a volume (the benchmark segments with it)."""
    entry = architectures.get(name)
    return ModelSpec(name=f"{entry.name}-small-itk-tissue", in_channels=1, out_channels=NUM_CLASSES, roi_size=ROI,
                     labels=dict(CLASS_NAMES), modality="MR", orientation="RAS", spacing=SPACING,
                     intensity=Intensity(kind="quantile", low=0.005, high=0.995, mean=0.0, std=1.0),
                     output="softmax", overlap=0.25, dynamic_spatial=entry.dynamic_spatial,
                     spatial_multiple=entry.spatial_multiple,
                     description=f"{entry.name} (small config) trained by SlicerPTQ's benchmarks on the ITK "
                                 "example T1 head, 6 k-means tissue classes; for measuring PTQ only.")


def training_data() -> Tuple[np.ndarray, np.ndarray, Dict[str, str]]:
    """Image ``(1, D, H, W)`` float32 and labels ``(D, H, W)`` int64 in 0..5 on the 2 mm RAS grid."""
    from SlicerPTQLib.preprocess import prepare, to_network_grid
    from SlicerPTQLib.volumes import read_volume

    image_path, labels_path = fetch_all([IMAGE, LABELS])
    spec = training_spec("UNet")
    volume = read_volume(image_path)
    image, grid = prepare(volume, spec)
    labels = tissue_classes(to_network_grid(np.asarray(read_volume(labels_path).array), grid, "nearest-exact"))
    sources = {"image": f"{IMAGE.label}:{IMAGE.member} sha256 {IMAGE.member_sha256}",
               "labels": f"{LABELS.label}:{LABELS.member} sha256 {LABELS.member_sha256}"}
    return image, labels, sources


def tissue_classes(kmeans: np.ndarray) -> np.ndarray:
    """k-means classes 1..6 -> labels 0..5 (int64); the few unlabelled (0) voxels join the background."""
    return np.clip(np.asarray(kmeans).astype(np.int64) - 1, 0, NUM_CLASSES - 1)


def _pad_to_roi(image: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    short = [max(0, r - s) for r, s in zip(ROI, labels.shape)]
    pads = [(p // 2, p - p // 2) for p in short]
    return (np.pad(image, [(0, 0)] + pads, constant_values=float(image.min())),
            np.pad(labels, pads, constant_values=0))


def weights_key(name: str, args: Dict, steps: int, seed: int) -> str:
    """Cache key of one trained model: architecture, arguments, data and recipe."""
    payload = json.dumps({"arch": name, "args": args, "steps": steps, "seed": seed, "roi": ROI, "batch": BATCH,
                          "spacing": SPACING, "version": TRAINING_VERSION,
                          "data": [IMAGE.member_sha256, LABELS.member_sha256]}, sort_keys=True, default=list)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def predict_volume(module, image: np.ndarray) -> np.ndarray:
    """Labels ``(D, H, W)`` of a torch module over a whole ``(1, D, H, W)`` image (sliding window)."""
    import torch
    from monai.inferers import sliding_window_inference

    module.eval()
    with torch.no_grad():
        logits = sliding_window_inference(torch.from_numpy(image[None]), ROI, 1, module, overlap=0.25,
                                          mode="gaussian")
    return logits[0].argmax(0).numpy()


def train_one(name: str, steps: int, seed: int = 0, learning_rate: Optional[float] = None,
              log=print) -> Dict:
    """Train (or load from the cache) the small ``name``; returns its record.

    The record holds ``weights`` (state-dict path), ``arch_args``, ``spec``,
    ``seconds``, ``final_loss``, ``train_dice`` (per class and mean).
    """
    import torch
    from monai.losses import DiceCELoss

    from SlicerPTQLib.metrics import dice

    entry = architectures.get(name)
    args = architectures.config_args(entry.name, "small", in_channels=1, out_channels=NUM_CLASSES, roi=ROI)
    folder = cache_dir() / "trained"
    key = weights_key(entry.name, args, steps, seed)
    weights = folder / f"{entry.name}-{key}.pt"
    record_file = weights.with_suffix(".json")
    if weights.is_file() and record_file.is_file():
        record = json.loads(record_file.read_text())
        record["cached"] = True
        return record

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    image, labels, sources = training_data()
    padded_image, padded_labels = _pad_to_roi(image, labels)
    module = architectures.build(entry.name, args)
    # Measured on UNet (300 steps, batch 2): 3e-3 reached train Dice 0.68 where 1e-3
    # (100 steps, batch 1) stayed at 0.31; transformers take a gentler peak.
    lr = learning_rate or (1e-3 if entry.family == "transformer" else 3e-3)
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=1e-5)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    room = np.array(padded_labels.shape) - np.array(ROI)
    start_time = time.perf_counter()
    module.train()
    loss_value = float("nan")
    for step in range(steps):
        starts = [rng.integers(0, room + 1) for _ in range(BATCH)]
        crops = [tuple(slice(int(s), int(s) + r) for s, r in zip(start, ROI)) for start in starts]
        x = torch.from_numpy(np.stack([padded_image[(slice(None),) + c] for c in crops]))
        y = torch.from_numpy(np.stack([padded_labels[c] for c in crops])[:, None])
        if rng.random() < 0.5:  # left-right flip: the head is near-symmetric
            x, y = x.flip(2), y.flip(2)
        optimizer.zero_grad(set_to_none=True)
        output = module(x)
        if isinstance(output, (list, tuple)):
            output = output[0]
        loss = loss_fn(output, y)
        loss.backward()
        optimizer.step()
        schedule.step()
        loss_value = loss.item()
        if step % 25 == 0 or step == steps - 1:
            log(f"  {entry.name} step {step + 1}/{steps} loss {loss_value:.4f} "
                f"({time.perf_counter() - start_time:.0f} s)")
    seconds = time.perf_counter() - start_time
    predicted = predict_volume(module, padded_image)
    scores = dice(padded_labels, predicted, labels=range(1, NUM_CLASSES))
    folder.mkdir(parents=True, exist_ok=True)
    with replacing(weights) as tmp:
        torch.save(module.state_dict(), tmp)
    record = {
        "arch": entry.name, "config": "small", "arch_args": args, "weights": str(weights),
        "parameters": int(sum(p.numel() for p in module.parameters())),
        "data": sources, "grid": list(labels.shape), "classes": NUM_CLASSES, "roi": list(ROI),
        "steps": steps, "batch": BATCH, "learning_rate": lr, "seed": seed, "threads": torch.get_num_threads(),
        "seconds": seconds, "final_loss": loss_value,
        "train_dice": {str(k): v for k, v in scores.items()},
        "train_mean_dice": float(np.mean(list(scores.values()))),
        "spec": training_spec(entry.name).to_dict(), "version": TRAINING_VERSION, "cached": False,
    }
    with replacing(record_file) as tmp:
        tmp.write_text(json.dumps(record, indent=2, default=list))
    return record


def load_trained(record: Dict):
    """The trained module of a record (eval mode)."""
    import torch

    module = architectures.build(record["arch"], record["arch_args"])
    module.load_state_dict(torch.load(record["weights"], map_location="cpu", weights_only=True))
    return module.eval()


def markdown(records: Sequence[Dict]) -> str:
    lines = ["| architecture | params | steps | train time (s) | final loss | train mean Dice (classes 1-5) |",
             "|---|---|---|---|---|---|"]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['arch']} | failed: {r['error']} | | | | |")
            continue
        lines.append(f"| {r['arch']} | {r['parameters']:,} | {r['steps']} | {r['seconds']:.0f} | "
                     f"{r['final_loss']:.3f} | {r['train_mean_dice']:.3f} |")
    return "\n".join(lines)


def write_summary(records: Sequence[Dict], out: Path, threads: int) -> None:
    """``trained_models.json`` and ``.md`` in ``out``, written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    texts = {"trained_models.json": json.dumps(list(records), indent=2, default=list),
             "trained_models.md": "# Small models trained for the architecture benchmark\n\n"
                                  f"Data: {IMAGE.label} {IMAGE.member} (+ k-means 6-class labels), RAS, 2 mm, "
                                  f"crops {ROI}, batch {BATCH}, {threads} CPU threads.\n\n" + markdown(records) + "\n"}
    for name, text in texts.items():
        with replacing(out / name) as tmp:
            tmp.write_text(text)


def main(argv: Optional[List[str]] = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="*", default=list(architectures.REGISTRY), help="registry names")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    options = parser.parse_args(argv)
    torch.set_num_threads(options.threads)
    records = []
    for name in options.arch:
        print(f"training {name} ...", flush=True)
        try:
            record = train_one(name, options.steps, options.seed, log=lambda m: print(m, flush=True))
        except Exception as exc:  # one failing architecture must not stop the others
            record = {"arch": name, "error": f"{type(exc).__name__}: {exc}"[:500]}
        records.append(record)
        print(markdown([record]).splitlines()[-1], flush=True)
        write_summary(records, options.out, options.threads)  # after each model: a stopped run keeps its rows
    print(markdown(records))
    return 0 if all("error" not in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
