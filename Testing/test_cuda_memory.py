"""Device memory for TensorRT: which provider is chosen, and what is said when none works."""

from __future__ import annotations

import importlib.util

import pytest

from SlicerPTQLib.errors import PTQError
from SlicerPTQLib.runtimes import cuda_memory


def test_cpu_only_torch_with_a_gpu_names_cuda_python(monkeypatch):
    """A CPU-only torch used to hide a present GPU behind "no CUDA GPU found"."""
    monkeypatch.setattr(cuda_memory, "torch_has_cuda", lambda: False)
    monkeypatch.setattr(cuda_memory.importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("cuda") else importlib.util.find_spec(name, *a))
    monkeypatch.setattr(cuda_memory, "nvidia_gpu_listed", lambda: True)
    usable, reason = cuda_memory.device_status()
    assert not usable
    assert "an NVIDIA GPU is present but this torch is a CPU-only build" in reason and "cuda-python" in reason


def test_real_cuda_python_without_a_driver():
    pytest.importorskip("cuda.bindings", reason="cuda-bindings is a test dependency (pyproject [test])")
    from cuda.bindings import runtime as cudart

    if cudart.cudaDriverGetVersion()[1]:
        pytest.skip("an NVIDIA driver is loaded here")
    assert cuda_memory.device_status() == (False, "no CUDA GPU found (no NVIDIA driver is loaded; torch has "
                                                  "no CUDA)")
    with pytest.raises(PTQError, match="CUDA call cudaGetDeviceCount failed: .*cudaErrorInsufficientDriver"):
        cuda_memory._check(cudart, cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
    with pytest.raises(PTQError, match="No usable CUDA device: no CUDA GPU found"):
        cuda_memory.open_device(0)
