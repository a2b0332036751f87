"""VISTA3D's automatic-segmentation branch as a plain image -> logits network.

MONAI's ``VISTA3D`` (He et al., "VISTA3D: A Unified Segmentation Foundation
Model for 3D Medical Imaging", arXiv:2406.05285) takes class prompts and
point prompts. Its automatic branch is a SegResNetDS2 encoder-decoder whose
"label" output is matched against learned class embeddings: logits of class
k = embedding_k . feature at every voxel. With the classes fixed, the class
embeddings are constants, the prompt path folds away at export, and what
remains is the segmentation backbone MedPTQ quantizes: ``VISTA3DAuto``
builds exactly that from MONAI's own blocks.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class VISTA3DAuto(nn.Module):
    """``(B, in_channels, D, H, W) -> (B, len(class_ids), D, H, W)`` per-class logits.

    ``class_ids`` index the class-embedding table (VISTA3D's 132 supported
    classes live in a table of ``n_class_embeddings`` = 512). The paper
    configuration is ``encoder_embed_dim=48``, ``blocks_down=(1, 2, 2, 4, 4)``.
    D, H, W must be multiples of 2 ** (len(blocks_down) - 1).
    """

    def __init__(self, in_channels: int = 1, class_ids: Sequence[int] = (0, 1), encoder_embed_dim: int = 48,
                 blocks_down: Sequence[int] = (1, 2, 2, 4, 4), n_class_embeddings: int = 512):
        super().__init__()
        from monai.networks.nets import SegResNetDS2
        from monai.networks.nets.vista3d import ClassMappingClassify

        if len(class_ids) < 2:
            raise ValueError("VISTA3DAuto needs at least 2 class ids")
        if max(class_ids) >= n_class_embeddings or min(class_ids) < 0:
            raise ValueError(f"class ids must lie in [0, {n_class_embeddings})")
        self.encoder = SegResNetDS2(in_channels=in_channels, blocks_down=tuple(blocks_down), norm="instance",
                                    out_channels=encoder_embed_dim, init_filters=encoder_embed_dim, dsdepth=1)
        self.class_head = ClassMappingClassify(n_classes=n_class_embeddings, feature_size=encoder_embed_dim,
                                               use_mlp=True)
        self.register_buffer("class_ids", torch.tensor(list(class_ids), dtype=torch.long).unsqueeze(1),
                             persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        _, features = self.encoder(image, with_point=False, with_label=True)
        logits, _ = self.class_head(features, self.class_ids)  # (K, B, D, H, W)
        return logits.transpose(0, 1)
