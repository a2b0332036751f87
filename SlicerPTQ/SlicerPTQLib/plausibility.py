"""Does a volume look like what the model was made for? Warnings, never refusals.

A T1 MR brain model run on a chest CT still "segments" something, with
exit code 0. These checks compare the raw volume with the spec: its
modality (CT holds air near -1000 HU, MR intensities are non-negative),
the metadata's ``expected.intensity_range`` and
``expected.field_of_view_mm``; each disagreement is one warning line.
"""

from __future__ import annotations

from typing import List

import numpy as np

from .spec import ModelSpec
from .volume import Volume

# A CT volume has air (about -1000 HU) around or inside the body; an MR
# volume has essentially no values this far below zero.
_CT_AIR_HU = -500.0
_AIR_FRACTION = 0.01
# At most this many voxels are looked at (a strided sample): the checks need only rough statistics.
_SAMPLE_VOXELS = 1 << 20
# A field of view this many times larger or smaller than expected along an axis is implausible.
_FOV_FACTOR = 1.5


def check(volume: Volume, spec: ModelSpec) -> List[str]:
    """Warning lines for ``volume`` under ``spec`` (empty when all looks plausible)."""
    array = np.asarray(volume.array)
    stride = max(1, int(np.ceil((array.size / _SAMPLE_VOXELS) ** (1 / 3))))
    sample = np.asarray(array[::stride, ::stride, ::stride], dtype=np.float32)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return []
    name = volume.name or "The volume"
    warnings = []
    looks_ct = float(np.mean(sample < _CT_AIR_HU)) > _AIR_FRACTION
    if spec.modality == "MR" and looks_ct:
        warnings.append(f"{name} looks like CT (values below {_CT_AIR_HU:g}, as air in HU) but model "
                        f"{spec.name} is for MR; its labels may be meaningless.")
    if spec.modality == "CT" and sample.min() >= 0 and not looks_ct:
        warnings.append(f"{name} has no negative values, unlike CT in HU, but model {spec.name} is for CT; "
                        "check the modality and the intensity units.")
    expected_range = spec.expected.get("intensity_range")
    if expected_range is not None:
        low, high = np.percentile(sample, [1, 99])
        if low < expected_range[0] - (expected_range[1] - expected_range[0]) or \
                high > expected_range[1] + (expected_range[1] - expected_range[0]) or high < expected_range[0]:
            warnings.append(f"{name} spans intensities {low:g} to {high:g} (1st-99th percentile), far from the "
                            f"{expected_range[0]:g} to {expected_range[1]:g} model {spec.name} expects.")
    expected_fov = spec.expected.get("field_of_view_mm")
    if expected_fov is not None:
        spacing = np.sqrt((np.asarray(volume.affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
        fov = sorted(float(v) for v in np.array(array.shape[:3]) * spacing)
        wanted = sorted(float(v) for v in expected_fov)
        # Sorted extents compare the volume's shape of box, whatever its axis order.
        if any(have > want * _FOV_FACTOR or have * _FOV_FACTOR < want for have, want in zip(fov, wanted)):
            warnings.append(f"{name} covers {' x '.join(f'{v:.0f}' for v in fov)} mm, unlike the about "
                            f"{' x '.join(f'{v:.0f}' for v in wanted)} mm model {spec.name} was made for.")
    return warnings
