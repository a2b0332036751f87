"""The face every runtime shows the sliding-window inference."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Dict, List

import numpy as np


class Runtime(ABC):
    """Runs one network on batches of patches.

    ``predict`` takes float32 ``(B, C_in, D, H, W)`` and returns float32
    ``(B, C_out, D, H, W)`` (the network's raw output: logits or
    probabilities, as the model's spec says).
    """

    #: short backend name: "torch", "onnxruntime", "openvino", "tensorrt"
    name: str = ""
    #: "fp32", "bf16", "fp16", "int8" (what the kernels really compute in)
    precision: str = "fp32"

    @abstractmethod
    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Forward ``batch`` and return the output as a numpy array."""

    def layer_precisions(self) -> List[Dict[str, str]]:
        """Per compute layer: ``{"name", "type", "precision"}`` as executed.

        Backends that can tell (OpenVINO's runtime model, TensorRT's engine
        inspector) override this; the default says nothing.
        """
        return []

    def close(self) -> None:
        """Release threads, sessions or device memory."""
