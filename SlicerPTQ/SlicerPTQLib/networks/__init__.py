"""Networks the project builds itself where MONAI has none.

- :class:`TransUNet` (Chen et al. 2021), 3D hybrid CNN-ViT encoder with a
  cascaded upsampler;
- :class:`UNesT` (Yu et al. 2023), hierarchical nested transformer encoder
  with a convolutional decoder;
- :class:`VISTA3DAuto`, the automatic-segmentation branch of MONAI's
  VISTA3D with its class prompts fixed, so it exports as a plain
  image -> logits network.
"""

from .transunet import TransUNet
from .unest import UNesT
from .vista3d_auto import VISTA3DAuto

__all__ = ["TransUNet", "UNesT", "VISTA3DAuto"]
