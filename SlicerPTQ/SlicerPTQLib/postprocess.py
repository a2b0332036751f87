"""Named post-processing steps on a label map, as a model's metadata lists them.

Each step is ``{"step": NAME, ...}`` in the spec's ``postprocess`` list,
applied in order to the labels on the network grid, to every label or to
those in ``"labels"``:

- ``largest_component``: keep the largest 26-connected part of the label;
- ``fill_holes``: fill cavities the label encloses (3D);
- ``smooth``: Gaussian-smooth the label's mask (``sigma_mm``, default 1)
  and keep voxels above 0.5.

The schema checks the step names and fields when the metadata is loaded;
:func:`apply_steps` checks again for specs built in code.
"""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

from .errors import PTQError

STEPS = ("largest_component", "fill_holes", "smooth")


def apply_steps(labels: np.ndarray, steps: Sequence[Dict], spacing: Sequence[float] = (1.0, 1.0, 1.0)
                ) -> np.ndarray:
    """``labels`` (D, H, W) after every step in order; ``spacing`` in mm per axis (for ``smooth``)."""
    if not steps:
        return labels
    out = np.array(labels, copy=True)
    for index, step in enumerate(steps):
        name = step.get("step") if isinstance(step, dict) else None
        if name not in STEPS:
            raise PTQError(f"Post-processing step {index} ({step!r}) is not one of {', '.join(STEPS)}; fix "
                           "'postprocess' in the model metadata.")
        wanted = step.get("labels")
        for label in (int(v) for v in np.unique(out) if v != 0):
            if wanted is not None and label not in wanted:
                continue
            mask = out == label
            changed = _STEP_FUNCTIONS[name](mask, step, spacing)
            out[mask & ~changed] = 0
            out[changed & (out == 0)] = label  # steps only grow into background, never over another label
    return out


def _largest_component(mask: np.ndarray, step: Dict, spacing) -> np.ndarray:
    from scipy import ndimage

    parts, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count <= 1:
        return mask
    sizes = np.bincount(parts.ravel())
    sizes[0] = 0
    return parts == int(np.argmax(sizes))


def _fill_holes(mask: np.ndarray, step: Dict, spacing) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_fill_holes(mask)


def _smooth(mask: np.ndarray, step: Dict, spacing) -> np.ndarray:
    from scipy import ndimage

    sigma_mm = float(step.get("sigma_mm", 1.0))
    sigma = [sigma_mm / max(float(size), 1e-6) for size in spacing]
    return ndimage.gaussian_filter(mask.astype(np.float32), sigma=sigma) > 0.5


_STEP_FUNCTIONS = {"largest_component": _largest_component, "fill_holes": _fill_holes, "smooth": _smooth}
