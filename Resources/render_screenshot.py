"""Render Resources/Screenshot1.png: a real INT8 result of the Slicer module's logic.

Runs the module's own path without the Slicer GUI (slicer-core MRML scene):
volume node -> PTQLogic.quantize (deepbet, INT8, max calibration) ->
PTQLogic.segment(compareWithFP32=True) -> segmentation node, then draws the
input with the segment exported from the node (INT8, filled) and the FP32
contour, plus the comparison table the module shows. Usage:

    python Resources/render_screenshot.py [out.png]
"""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import slicer  # noqa: E402

from SlicerPTQLib import shipped, slicer_nodes  # noqa: E402
from SlicerPTQLib.logic import PTQLogic  # noqa: E402
from SlicerPTQLib.volumes import read_volume  # noqa: E402


def canonical(array, affine):
    """The array in RAS axis order, for display."""
    return np.asarray(nib.as_closest_canonical(nib.Nifti1Image(array, affine)).dataobj)


def main(out: Path) -> None:
    scene = slicer.vtkMRMLScene()
    segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations_logic.SetMRMLScene(scene)
    slicer.mrmlScene = scene
    name, image_path, _ = shipped.evaluation_volumes(include_debian=False)[0]
    calibration = [slicer_nodes.add_volume_node(scene, read_volume(p)) for p in shipped.calibration_volumes()[:2]]
    volume_node = slicer_nodes.add_volume_node(scene, read_volume(image_path), name)
    logic = PTQLogic(inProcess=True)
    built = logic.quantize(str(shipped.shipped_model()), calibration, numCrops=8)
    segmentation_node, table = logic.segment(built, volume_node, compareWithFP32=True)
    int8 = slicer_nodes.labels_from_segmentation(segmentation_node, volume_node, built.spec)
    fp32_node, _ = logic.segment(built, volume_node, precision="fp32")
    fp32 = slicer_nodes.labels_from_segmentation(fp32_node, volume_node, built.spec)
    image = slicer_nodes.volume_from_node(volume_node)

    img, q, f = (canonical(a, image.affine) for a in (image.array.astype(np.float32), int8.array, fp32.array))
    centre = [int(v) for v in np.argwhere(q > 0).mean(axis=0)]
    views = [("Axial", lambda a: a[:, :, centre[2]].T), ("Coronal", lambda a: a[:, centre[1], :].T),
             ("Sagittal", lambda a: a[centre[0], :, :].T)]
    colour = built.spec.color(1)
    fig = plt.figure(figsize=(13, 5), facecolor="#1e1e1e")
    for index, (title, cut) in enumerate(views):
        ax = fig.add_axes([0.005 + index * 0.215, 0.14, 0.21, 0.76])
        ax.imshow(cut(img), cmap="gray", origin="lower", vmin=np.percentile(img, 1), vmax=np.percentile(img, 99.5))
        overlay = np.zeros(cut(q).shape + (4,))
        overlay[cut(q) > 0] = [*colour, 0.45]
        ax.imshow(overlay, origin="lower")
        ax.contour(cut(f) > 0, levels=[0.5], colors=["#2f9bff"], linewidths=1.0, linestyles="--")
        ax.set_title(title, color="white", fontsize=11)
        ax.axis("off")
    rows = table["rows"]
    lines = [f"{'model':<6}{'size MB':>9}{'time s':>9}{'Dice vs FP32':>14}"]
    lines += [f"{r['model']:<6}{r['size (MB)']:>9.2f}{r['time (s)']:>9.2f}{r['Dice vs FP32']:>14.4f}" for r in rows]
    text = fig.add_axes([0.665, 0.14, 0.33, 0.76])
    text.axis("off")
    text.text(0, 0.95, "SlicerPTQ: deepbet brain extraction", color="white", fontsize=11, weight="bold", va="top")
    text.text(0, 0.82, "\n".join(lines), color="white", family="monospace", fontsize=9, va="top")
    text.text(0, 0.45, f"filled: INT8 segment ({rows[0]['runtime']}, real INT8 kernels)\n"
                       "dashed: FP32 model contour\n"
                       f"input: {name} T1, calibrated on {len(calibration)} unlabeled volumes",
              color="#cccccc", fontsize=8.5, va="top")
    fig.text(0.01, 0.04, "Rendered from the module's logic (PTQLogic + segmentation node) on real data. Time: whole "
                         "volume, one fresh run per model as the module does it (model compilation included), "
                         "measured on a shared 2-core machine.", color="#999999", fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, facecolor=fig.get_facecolor())
    print(f"wrote {out}; rows: {rows}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("Screenshot1.png"))
