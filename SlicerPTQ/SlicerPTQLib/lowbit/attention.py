"""Self-adaptive voxel weights against class imbalance (EfficientQ's attention).

The FP network's own prediction on the calibration sample labels every
voxel; a class predicted on ``n_c`` voxels gets weight
``w_c = (max_k n_k / n_c) ** 0.5``, so a small foreground counts as much
as the large background in each layer's output error. Each layer sees the
map average-pooled to its own output resolution (the pyramid).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def predicted_labels(prediction: np.ndarray) -> np.ndarray:
    """Labels (N, *S) from a network output (N, K, *S).

    Argmax over channels; a single channel is foreground where it exceeds
    0.5 (probabilities in [0, 1]) or 0 (logits).
    """
    prediction = np.asarray(prediction)
    if prediction.shape[1] > 1:
        return prediction.argmax(axis=1)
    channel = prediction[:, 0]
    threshold = 0.5 if channel.min() >= 0.0 and channel.max() <= 1.0 else 0.0
    return (channel > threshold).astype(np.int64)


def class_weights(labels: np.ndarray) -> dict:
    """``{class: (max_k n_k / n_c) ** 0.5}`` for every class present in ``labels``."""
    classes, counts = np.unique(np.asarray(labels), return_counts=True)
    largest = counts.max()
    return {int(c): float(np.sqrt(largest / n)) for c, n in zip(classes, counts)}


def voxel_weights(prediction: np.ndarray) -> np.ndarray:
    """Per-voxel weights (N, *S) float32: each voxel gets its predicted class's weight."""
    labels = predicted_labels(prediction)
    weights = class_weights(labels)
    lookup = np.zeros(int(labels.max()) + 1, dtype=np.float32)
    for label, weight in weights.items():
        lookup[label] = weight
    return lookup[labels]


def pool_to(weights: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Weights (N, *S) average-pooled to (N, *shape) (nearest where a layer is finer)."""
    shape = tuple(int(s) for s in shape)
    if tuple(weights.shape[1:]) == shape:
        return weights
    pooling = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[len(shape)]
    coarse = tuple(min(target, source) for target, source in zip(shape, weights.shape[1:]))
    pooled = pooling(weights[:, None], coarse)
    if coarse != shape:
        pooled = F.interpolate(pooled, size=shape, mode="nearest")
    return pooled[:, 0]
