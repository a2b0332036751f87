"""A pre-norm ViT encoder layer written out op by op.

Attention is spelled as ``Linear -> MatMul(q, k^T) -> Softmax -> MatMul(.,
v) -> Linear`` (no fused ``scaled_dot_product_attention``) so that the
exported ONNX graph shows the two kinds of MatMul a quantizer must tell
apart: projections with constant weights (quantized) and the score path
between two activations (kept in float).
"""

from __future__ import annotations

import torch
from torch import nn


class SelfAttention(nn.Module):
    """Multi-head self-attention over ``(B, N, C)`` tokens (any leading batch dims)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        *batch, count, dim = tokens.shape
        heads = self.num_heads
        qkv = self.qkv(tokens).reshape(*batch, count, 3, heads, dim // heads)
        # each (*batch, heads, N, head_dim)
        query, key, value = (part.transpose(-3, -2) for part in qkv.unbind(dim=-3))
        scores = torch.matmul(query * self.scale, key.transpose(-2, -1))
        mixed = torch.matmul(scores.softmax(dim=-1), value)  # (*batch, heads, N, head_dim)
        return self.proj(mixed.transpose(-3, -2).reshape(*batch, count, dim))


class TransformerLayer(nn.Module):
    """``x + Attn(LN(x))`` then ``x + MLP(LN(x))`` on ``(..., N, C)`` tokens."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens + self.attention(self.norm1(tokens))
        return tokens + self.mlp(self.norm2(tokens))
