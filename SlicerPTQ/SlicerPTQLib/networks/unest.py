"""UNesT: a hierarchical nested-transformer encoder with a convolutional decoder.

After X. Yu et al., "UNesT: Local Spatial Representation Learning with
Hierarchical Transformer for Efficient Medical Segmentation", Medical
Image Analysis 90 (2023), arXiv:2209.14378, the whole-brain network MedPTQ
quantizes. Built here from the paper's description (no code taken from it):

- patch embedding: a 4x4x4 conv with stride 4;
- three hierarchy levels; at each the token grid is cut into
  ``blocks_per_axis`` ^ 3 non-overlapping blocks (4^3 = 64, 2^3 = 8, 1),
  each block gets a learned position embedding, and the transformer layers
  attend only inside a block (local self-attention);
- block aggregation between levels: 3x3x3 conv, LayerNorm over channels,
  3x3x3 max pooling with stride 2 (so 8 neighbouring blocks merge into one);
- decoder: residual conv blocks on the input image (full and half
  resolution) and on every level's output, joined coarse-to-fine by
  transposed-conv up blocks with skip concatenation (MONAI's UNETR blocks);
  a 1x1x1 conv gives the class logits.

Position embeddings fix the token count: the network takes one input size
(``img_size``, multiples of 16), export it with a static shape.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import nn

from .transformer import TransformerLayer

BLOCKS_PER_AXIS = (4, 2, 1)


def blockify(volume: torch.Tensor, blocks: int) -> torch.Tensor:
    """``(B, C, D, H, W) -> (B, blocks^3, (D/blocks)(H/blocks)(W/blocks), C)`` tokens."""
    batch, channels, depth, height, width = volume.shape
    d, h, w = depth // blocks, height // blocks, width // blocks
    x = volume.reshape(batch, channels, blocks, d, blocks, h, blocks, w)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(batch, blocks ** 3, d * h * w, channels)


def deblockify(tokens: torch.Tensor, blocks: int, grid: Tuple[int, int, int]) -> torch.Tensor:
    """Inverse of :func:`blockify` for a token grid of size ``grid``."""
    batch, _, _, channels = tokens.shape
    d, h, w = (size // blocks for size in grid)
    x = tokens.reshape(batch, blocks, blocks, blocks, d, h, w, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(batch, channels, *grid)


class _ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of ``(B, C, D, H, W)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        return self.norm(volume.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)


class _NestedLevel(nn.Module):
    """Local transformer layers inside each block of one hierarchy level."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float, blocks: int,
                 grid: Tuple[int, int, int]):
        super().__init__()
        self.blocks = blocks
        self.grid = grid
        tokens = (grid[0] // blocks) * (grid[1] // blocks) * (grid[2] // blocks)
        self.position_embedding = nn.Parameter(torch.zeros(1, blocks ** 3, tokens, dim))
        nn.init.trunc_normal_(self.position_embedding, std=0.02)
        self.layers = nn.Sequential(*(TransformerLayer(dim, num_heads, int(dim * mlp_ratio))
                                      for _ in range(depth)))

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        tokens = blockify(volume, self.blocks) + self.position_embedding
        return deblockify(self.layers(tokens), self.blocks, self.grid)


class UNesT(nn.Module):
    """3D UNesT: ``(B, in_channels, *img_size) -> (B, out_channels, *img_size)`` logits.

    ``embed_dims``, ``depths`` and ``num_heads`` describe the three levels;
    ``feature_size`` is the decoder's base width. The paper's UNesT-B uses
    embed dims (128, 256, 512), depths (2, 2, 8), heads (4, 8, 16).

    Example::

        net = UNesT(1, 4, img_size=(64, 64, 64), embed_dims=(32, 64, 128), depths=(1, 1, 2))
        net(torch.zeros(1, 1, 64, 64, 64)).shape  # (1, 4, 64, 64, 64)
    """

    def __init__(self, in_channels: int, out_channels: int, img_size: Sequence[int] = (96, 96, 96),
                 embed_dims: Sequence[int] = (128, 256, 512), depths: Sequence[int] = (2, 2, 8),
                 num_heads: Sequence[int] = (4, 8, 16), mlp_ratio: float = 4.0, feature_size: int = 32):
        super().__init__()
        from monai.networks.blocks import UnetrBasicBlock, UnetrUpBlock

        self.img_size: Tuple[int, int, int] = tuple(int(v) for v in img_size)  # type: ignore[assignment]
        if len(self.img_size) != 3 or any(v % 16 for v in self.img_size):
            raise ValueError(f"UNesT img_size must be 3 multiples of 16, got {img_size}")
        if not len(embed_dims) == len(depths) == len(num_heads) == 3:
            raise ValueError("UNesT takes 3 levels: embed_dims, depths and num_heads of length 3")
        self.patch_embedding = nn.Conv3d(in_channels, embed_dims[0], kernel_size=4, stride=4)
        levels, aggregations = [], []
        for level in range(3):
            grid = tuple(v // (4 * 2 ** level) for v in self.img_size)
            levels.append(_NestedLevel(embed_dims[level], depths[level], num_heads[level], mlp_ratio,
                                       BLOCKS_PER_AXIS[level], grid))
            if level < 2:
                aggregations.append(nn.Sequential(
                    nn.Conv3d(embed_dims[level], embed_dims[level + 1], 3, padding=1),
                    _ChannelLayerNorm(embed_dims[level + 1]),
                    nn.MaxPool3d(3, stride=2, padding=1)))
        self.levels = nn.ModuleList(levels)
        self.aggregations = nn.ModuleList(aggregations)

        def res_block(cin: int, cout: int, stride: int = 1) -> nn.Module:
            return UnetrBasicBlock(3, cin, cout, kernel_size=3, stride=stride, norm_name="instance",
                                   res_block=True)

        def up_block(cin: int, cout: int) -> nn.Module:
            return UnetrUpBlock(3, cin, cout, kernel_size=3, upsample_kernel_size=2, norm_name="instance",
                                res_block=True)

        f = feature_size
        self.encode_full = res_block(in_channels, f)
        self.encode_half = res_block(in_channels, f, stride=2)
        self.encode_levels = nn.ModuleList(res_block(embed_dims[i], f * 2 ** (i + 1)) for i in range(3))
        self.up_blocks = nn.ModuleList([up_block(f * 8, f * 4), up_block(f * 4, f * 2), up_block(f * 2, f),
                                        up_block(f, f)])
        self.head = nn.Conv3d(f, out_channels, kernel_size=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(image)
        level_outputs = []
        for index, level in enumerate(self.levels):
            x = level(x)
            level_outputs.append(x)  # at 1/4, 1/8, 1/16 of the input
            if index < 2:
                x = self.aggregations[index](x)
        level_skips = [encode(out) for encode, out in zip(self.encode_levels, level_outputs)]
        skips = [level_skips[1], level_skips[0], self.encode_half(image), self.encode_full(image)]
        x = level_skips[2]
        for up_block_, skip in zip(self.up_blocks, skips):
            x = up_block_(x, skip)
        return self.head(x)
