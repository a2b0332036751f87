"""A tiny TorchScript UNet and random volumes, built in the tests: a quantization takes seconds."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from SlicerPTQLib.models import build_monai_network
from SlicerPTQLib.spec import ModelSpec, sidecar_path
from SlicerPTQLib.volume import Volume
from SlicerPTQLib.volumes import write_volume

UNET_ARGS = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2],
             "num_res_units": 1}


def random_volume(path: Path, seed: int = 0, shape=(20, 20, 20)) -> Path:
    """A 2 mm volume of N(100, 20) noise written to ``path``."""
    rng = np.random.default_rng(seed)
    array = rng.normal(100, 20, shape).astype(np.float32)
    return write_volume(Volume(array=array, affine=np.diag([2.0, 2.0, 2.0, 1.0]), name="v"), path)


def save_tiny_unet(folder: Path, spatial_multiple: Optional[int] = None) -> Path:
    """``folder/tiny.pt``: a seeded UNet with one stride-2 level, traced, with its spec beside it."""
    torch.manual_seed(0)
    network = build_monai_network("UNet", UNET_ARGS).eval()
    path = Path(folder) / "tiny.pt"
    with warnings.catch_warnings():  # tracing's deprecation and shape warnings say nothing about this case
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(network, torch.zeros(1, 1, 16, 16, 16)), str(path))
    extra = {} if spatial_multiple is None else {"spatial_multiple": spatial_multiple}
    ModelSpec(name="tiny", roi_size=(16, 16, 16), labels={1: "tissue"}, **extra).save(sidecar_path(path))
    return path
