"""The in-memory volume every stage passes along."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Volume:
    """A 3D scalar image and where it sits in patient space.

    ``array`` is indexed (i, j, k) like nibabel's data (NOT Slicer's
    (k, j, i) ``arrayFromVolume`` order); ``affine`` maps (i, j, k, 1) to
    RAS millimetres, so a label map with the same affine overlays the image
    exactly in Slicer.
    """

    array: np.ndarray
    affine: np.ndarray
    name: str = ""

    @property
    def spacing(self) -> np.ndarray:
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    def with_array(self, array: np.ndarray, name: str = "") -> "Volume":
        """A volume on the same grid holding other voxels (e.g. labels)."""
        return Volume(array=array, affine=self.affine.copy(), name=name or self.name)
