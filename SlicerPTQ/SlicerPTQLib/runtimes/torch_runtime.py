"""PyTorch eager FP32 on the CPU: the baseline every speed-up is measured against."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import PTQError
from .base import Runtime

TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts")
PRECISIONS = ("fp32",)


class TorchRuntime(Runtime):
    """A TorchScript file (or, with :meth:`from_module`, any ``nn.Module``) run eagerly.

    ``threads`` sets ``torch.set_num_threads``, which is process-wide.
    """

    name = "torch"

    def __init__(self, model_path: Path, precision: Optional[str] = None,
                 threads: Optional[int] = None):
        import torch

        from . import resolve_precision

        model_path = Path(model_path)
        self.precision = resolve_precision(precision, False, PRECISIONS, self.name, model_path)
        if model_path.suffix.lower() not in TORCHSCRIPT_SUFFIXES:
            raise PTQError(f"Backend 'torch' runs TorchScript files ({', '.join(TORCHSCRIPT_SUFFIXES)}), "
                           f"not {model_path.name}. Use backend 'onnxruntime' or 'openvino' for ONNX files.")
        try:
            module = torch.jit.load(str(model_path), map_location="cpu")
        except (RuntimeError, ValueError) as exc:
            raise PTQError(f"{model_path} is not a TorchScript file ({str(exc).splitlines()[0]}). "
                           "Save the network with torch.jit.script/trace(...).save(path), or load a "
                           "state dict with --arch.") from exc
        self.model_path: Optional[Path] = model_path
        self._setup(module, threads)

    @classmethod
    def from_module(cls, module, threads: Optional[int] = None) -> "TorchRuntime":
        """Wrap an in-memory ``torch.nn.Module`` (switched to eval mode)."""
        runtime = cls.__new__(cls)
        runtime.precision = "fp32"
        runtime.model_path = None
        runtime._setup(module, threads)
        return runtime

    def _setup(self, module, threads: Optional[int]) -> None:
        import torch

        if threads is not None:
            torch.set_num_threads(threads)
        self.threads = threads
        self.module = module.eval()

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """``(B, C_in, D, H, W)`` float32 -> ``(B, C_out, D, H, W)`` float32."""
        import torch

        inputs = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        with torch.inference_mode():
            output = self.module(inputs)
        if isinstance(output, (tuple, list)):
            # Deep-supervision networks return the full-resolution head first.
            output = output[0]
        return output.float().numpy()

    def close(self) -> None:
        self.module = None
