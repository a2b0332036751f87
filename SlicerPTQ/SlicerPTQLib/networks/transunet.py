"""TransUNet in 3D: a CNN encoder, a ViT on its coarsest features, a cascaded upsampler.

After J. Chen et al., "TransUNet: Transformers Make Strong Encoders for
Medical Image Segmentation", arXiv:2102.04306 (2021), the architecture
MedPTQ quantizes on BTCV. Built here from the paper's description (no code
taken from it), with 3D convolutions:

- hybrid encoder: convolutional stages at 1/2, 1/4, 1/8 and 1/16 of the
  input (the paper uses ResNet-50 stages; here two residual 3x3x3 conv
  units per stage with instance norm);
- transformer: the 1/16 feature map is cut into 1x1x1 patches, linearly
  embedded to ``hidden_size``, plus a learned position embedding, through
  ``num_layers`` pre-norm ViT layers (MSA + MLP), then a final LayerNorm;
- cascaded upsampler (CUP): the tokens are reshaped back to a volume, a
  3x3x3 conv maps them to ``decoder_channels[0]``, and four steps of x2
  trilinear upsampling + concatenation with the encoder feature of that
  scale (none at full resolution) + two 3x3x3 conv-norm-ReLU units bring
  it back to the input size; a 1x1x1 conv gives the class logits.

The position embedding fixes the token count, so the network takes one
input size (``img_size``, a multiple of 16): export it with a static shape.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import nn

from .transformer import TransformerLayer


def _conv_unit(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.InstanceNorm3d(out_channels, affine=True),
        nn.ReLU(inplace=True),
    )


class _ResidualStage(nn.Module):
    """Strided conv unit then a residual conv unit: ``(B, C_in, S) -> (B, C_out, S/2)``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.down = _conv_unit(in_channels, out_channels, stride=2)
        self.conv = nn.Sequential(
            nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.InstanceNorm3d(out_channels, affine=True),
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = self.down(features)
        return self.act(features + self.conv(features))


class _UpStep(nn.Module):
    """x2 trilinear upsampling, optional skip concatenation, two conv units."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.upsample = nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)
        self.convs = nn.Sequential(_conv_unit(in_channels + skip_channels, out_channels),
                                   _conv_unit(out_channels, out_channels))

    def forward(self, features: torch.Tensor, skip: torch.Tensor = None) -> torch.Tensor:
        features = self.upsample(features)
        if skip is not None:
            features = torch.cat([features, skip], dim=1)
        return self.convs(features)


class TransUNet(nn.Module):
    """3D TransUNet: ``(B, in_channels, *img_size) -> (B, out_channels, *img_size)`` logits.

    ``encoder_channels`` are the CNN feature widths at 1/2, 1/4, 1/8, 1/16;
    ``decoder_channels`` the CUP widths at 1/8, 1/4, 1/2, 1/1. The paper's
    R50-ViT-B/16 has hidden 768, 12 layers, 12 heads, MLP 3072, decoder
    (256, 128, 64, 16).

    Example::

        net = TransUNet(1, 4, img_size=(64, 64, 64), hidden_size=64, num_layers=2, num_heads=4)
        net(torch.zeros(1, 1, 64, 64, 64)).shape  # (1, 4, 64, 64, 64)
    """

    def __init__(self, in_channels: int, out_channels: int, img_size: Sequence[int] = (96, 96, 96),
                 encoder_channels: Sequence[int] = (64, 256, 512, 1024), hidden_size: int = 768,
                 num_layers: int = 12, num_heads: int = 12, mlp_dim: int = 3072,
                 decoder_channels: Sequence[int] = (256, 128, 64, 16)):
        super().__init__()
        self.img_size: Tuple[int, int, int] = tuple(int(v) for v in img_size)  # type: ignore[assignment]
        if len(self.img_size) != 3 or any(v % 16 for v in self.img_size):
            raise ValueError(f"TransUNet img_size must be 3 multiples of 16, got {img_size}")
        if len(encoder_channels) != 4 or len(decoder_channels) != 4:
            raise ValueError("TransUNet takes 4 encoder and 4 decoder channel widths")
        self.grid = tuple(v // 16 for v in self.img_size)
        widths = [in_channels, *encoder_channels]
        self.stages = nn.ModuleList(_ResidualStage(widths[i], widths[i + 1]) for i in range(4))
        self.patch_embedding = nn.Conv3d(encoder_channels[3], hidden_size, kernel_size=1)
        tokens = self.grid[0] * self.grid[1] * self.grid[2]
        self.position_embedding = nn.Parameter(torch.zeros(1, tokens, hidden_size))
        nn.init.trunc_normal_(self.position_embedding, std=0.02)
        self.layers = nn.Sequential(*(TransformerLayer(hidden_size, num_heads, mlp_dim) for _ in range(num_layers)))
        self.norm = nn.LayerNorm(hidden_size)
        self.conv_more = _conv_unit(hidden_size, decoder_channels[0])
        skips = [encoder_channels[2], encoder_channels[1], encoder_channels[0], 0]
        ups = [decoder_channels[0], *decoder_channels]
        self.up_steps = nn.ModuleList(_UpStep(ups[i], skips[i], ups[i + 1]) for i in range(4))
        self.head = nn.Conv3d(decoder_channels[3], out_channels, kernel_size=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        features = []
        x = image
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        x = self.patch_embedding(x)  # (B, hidden, D/16, H/16, W/16)
        batch, hidden = x.shape[:2]
        tokens = x.flatten(2).transpose(1, 2) + self.position_embedding
        tokens = self.norm(self.layers(tokens))
        x = tokens.transpose(1, 2).reshape(batch, hidden, *self.grid)
        x = self.conv_more(x)
        skips = [features[2], features[1], features[0], None]
        for step, skip in zip(self.up_steps, skips):
            x = step(x, skip)
        return self.head(x)
