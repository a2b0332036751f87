"""GPU buffers and streams for TensorRT: torch CUDA tensors when torch has CUDA, else cuda-python.

TensorRT's Python API takes raw device addresses and stream handles, so
something must allocate device memory and copy to and from it. A CUDA
build of torch does it best (its caching allocator, its streams); but
Slicer and many pip installs carry a CPU-only torch, which must not hide a
working GPU. Then NVIDIA's ``cuda-python`` (the ``cuda-bindings`` wheel,
which ships binaries for every platform, unlike pycuda, which compiles
against a CUDA toolkit) provides ``cudaMalloc``, ``cudaMemcpyAsync`` and a
stream. Both implement :class:`DeviceMemory`; :func:`open_device` picks one.

Nothing here imports torch or cuda-python at module import.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
import shutil
import subprocess
from contextlib import contextmanager
from typing import Any, Iterator, Sequence, Tuple

import numpy as np

from ..errors import PTQError

CUDA_PYTHON_HINT = "pip install cuda-python"


class DeviceMemory(ABC):
    """Device buffers, copies and one stream on one GPU (what the TensorRT runtime needs)."""

    name = ""

    @abstractmethod
    def identity(self) -> Tuple[str, str]:
        """``(GPU name, compute capability "major.minor")``."""

    @abstractmethod
    def current(self) -> Iterator[None]:
        """Context manager: this GPU is the calling thread's current device (TensorRT builds and loads there)."""

    @property
    @abstractmethod
    def stream_handle(self) -> int:
        """The ``cudaStream_t`` handle engine calls are enqueued on."""

    @abstractmethod
    def upload(self, array: np.ndarray) -> Any:
        """A device buffer holding ``array`` (enqueued on the stream)."""

    @abstractmethod
    def empty(self, shape: Sequence[int], dtype: np.dtype) -> Any:
        """An uninitialized device buffer."""

    @abstractmethod
    def address(self, buffer: Any) -> int:
        """The device address of ``buffer`` for ``set_tensor_address``."""

    @abstractmethod
    def download(self, buffer: Any) -> np.ndarray:
        """``buffer`` as a host array, once the stream has finished with it."""

    @abstractmethod
    def synchronize(self) -> None:
        """Wait until the stream has finished its work."""

    @abstractmethod
    def timed(self, work, repeats: int) -> list:
        """GPU milliseconds of each of ``repeats`` calls of ``work()`` (events on the stream)."""


class TorchCuda(DeviceMemory):
    """Buffers are torch CUDA tensors; one torch CUDA stream."""

    name = "torch"

    def __init__(self, device: int = 0) -> None:
        import torch

        self._torch = torch
        self.device = torch.device("cuda", device)
        self.stream = torch.cuda.Stream(device=self.device)

    def identity(self) -> Tuple[str, str]:
        major, minor = self._torch.cuda.get_device_capability(self.device)
        return self._torch.cuda.get_device_name(self.device), f"{major}.{minor}"

    @contextmanager
    def current(self) -> Iterator[None]:
        with self._torch.cuda.device(self.device):
            yield

    @property
    def stream_handle(self) -> int:
        return int(self.stream.cuda_stream)

    def upload(self, array: np.ndarray):
        with self._torch.cuda.stream(self.stream):
            return self._torch.from_numpy(np.ascontiguousarray(array)).to(self.device, non_blocking=False)

    def empty(self, shape, dtype):
        tensor = self._torch.empty(tuple(shape), dtype=_TORCH_DTYPES[np.dtype(dtype).name](self._torch),
                                   device=self.device)
        tensor.record_stream(self.stream)
        return tensor

    def address(self, buffer) -> int:
        # The buffer may come from another stream: the engine starts only once it is written.
        self.stream.wait_stream(self._torch.cuda.current_stream(self.device))
        buffer.record_stream(self.stream)
        return int(buffer.data_ptr())

    def download(self, buffer) -> np.ndarray:
        self.stream.synchronize()
        return buffer.cpu().numpy()

    def synchronize(self) -> None:
        self.stream.synchronize()

    def timed(self, work, repeats: int) -> list:
        times = []
        for _ in range(repeats):
            start = self._torch.cuda.Event(enable_timing=True)
            end = self._torch.cuda.Event(enable_timing=True)
            start.record(self.stream)
            work()
            end.record(self.stream)
            end.synchronize()
            times.append(float(start.elapsed_time(end)))
        return times


_TORCH_DTYPES = {"float32": lambda t: t.float32, "float16": lambda t: t.float16, "int8": lambda t: t.int8,
                 "int32": lambda t: t.int32, "int64": lambda t: t.int64, "bool": lambda t: t.bool}


class _Buffer:
    """A cudaMalloc'ed block with its shape and dtype; freed when dropped."""

    def __init__(self, cudart, shape: Sequence[int], dtype: np.dtype) -> None:
        self._cudart = cudart
        self.shape, self.dtype = tuple(int(v) for v in shape), np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.pointer = _check(cudart, cudart.cudaMalloc(max(1, self.nbytes)), "cudaMalloc")

    def __del__(self) -> None:
        if getattr(self, "pointer", None):
            self._cudart.cudaFree(self.pointer)
            self.pointer = None


class CudaPython(DeviceMemory):
    """Buffers from ``cudaMalloc`` and copies with ``cudaMemcpyAsync`` (NVIDIA's cuda-python)."""

    name = "cuda-python"

    def __init__(self, device: int = 0) -> None:
        from cuda.bindings import runtime as cudart

        self._cudart = cudart
        self.index = device
        _check(cudart, cudart.cudaSetDevice(device), f"cudaSetDevice({device})")
        self._stream = _check(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._pending = []  # host arrays a copy still reads from

    def identity(self) -> Tuple[str, str]:
        properties = _check(self._cudart, self._cudart.cudaGetDeviceProperties(self.index), "cudaGetDeviceProperties")
        name = properties.name.split(b"\0", 1)[0].decode() if isinstance(properties.name, bytes) else str(properties.name)
        return name, f"{properties.major}.{properties.minor}"

    @contextmanager
    def current(self) -> Iterator[None]:
        _check(self._cudart, self._cudart.cudaSetDevice(self.index), f"cudaSetDevice({self.index})")
        yield

    @property
    def stream_handle(self) -> int:
        return int(self._stream)

    def upload(self, array: np.ndarray) -> _Buffer:
        array = np.ascontiguousarray(array)
        buffer = _Buffer(self._cudart, array.shape, array.dtype)
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        _check(self._cudart, self._cudart.cudaMemcpyAsync(buffer.pointer, array.ctypes.data, buffer.nbytes, kind,
                                                          self._stream), "cudaMemcpyAsync")
        self._pending.append(array)
        return buffer

    def empty(self, shape, dtype) -> _Buffer:
        return _Buffer(self._cudart, shape, dtype)

    def address(self, buffer: _Buffer) -> int:
        return int(buffer.pointer)

    def download(self, buffer: _Buffer) -> np.ndarray:
        host = np.empty(buffer.shape, dtype=buffer.dtype)
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(self._cudart, self._cudart.cudaMemcpyAsync(host.ctypes.data, buffer.pointer, buffer.nbytes, kind,
                                                          self._stream), "cudaMemcpyAsync")
        self.synchronize()
        return host

    def synchronize(self) -> None:
        _check(self._cudart, self._cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        self._pending.clear()

    def timed(self, work, repeats: int) -> list:
        cudart, times = self._cudart, []
        for _ in range(repeats):
            start = _check(cudart, cudart.cudaEventCreate(), "cudaEventCreate")
            end = _check(cudart, cudart.cudaEventCreate(), "cudaEventCreate")
            _check(cudart, cudart.cudaEventRecord(start, self._stream), "cudaEventRecord")
            work()
            _check(cudart, cudart.cudaEventRecord(end, self._stream), "cudaEventRecord")
            _check(cudart, cudart.cudaEventSynchronize(end), "cudaEventSynchronize")
            times.append(float(_check(cudart, cudart.cudaEventElapsedTime(start, end), "cudaEventElapsedTime")))
            cudart.cudaEventDestroy(start)
            cudart.cudaEventDestroy(end)
        return times

    def __del__(self) -> None:
        if getattr(self, "_stream", None) is not None:
            self._cudart.cudaStreamDestroy(self._stream)
            self._stream = None


def _check(cudart, result, call: str):
    """The value of a cuda-python call ``(error, value...)``; PTQError naming the CUDA error otherwise."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if error != cudart.cudaError_t.cudaSuccess:
        _, text = cudart.cudaGetErrorString(error)
        text = text.decode() if isinstance(text, bytes) else str(text)
        raise PTQError(f"CUDA call {call} failed: {text} ({getattr(error, 'name', error)}); check the NVIDIA "
                       "driver (nvidia-smi) and that cuda-python matches its CUDA version.")
    return values[0] if len(values) == 1 else (tuple(values) or None)


def torch_has_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def nvidia_gpu_listed() -> bool:
    """True when ``nvidia-smi -L`` lists a GPU (an NVIDIA driver is installed and sees one)."""
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        return False
    try:
        listing = subprocess.run([nvidia_smi, "-L"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return listing.returncode == 0 and "GPU" in listing.stdout


def device_status() -> Tuple[bool, str]:
    """``(True, "torch"|"cuda-python")`` when device memory can be had, else ``(False, why not)``."""
    if torch_has_cuda():
        return True, "torch"
    if importlib.util.find_spec("cuda") is not None and importlib.util.find_spec("cuda.bindings") is not None:
        from cuda.bindings import runtime as cudart

        error, driver = cudart.cudaDriverGetVersion()
        if error != cudart.cudaError_t.cudaSuccess or not driver:
            return False, "no CUDA GPU found (no NVIDIA driver is loaded; torch has no CUDA)"
        try:
            count = _check(cudart, cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
        except PTQError as exc:
            return False, f"CUDA cannot start ({exc})"
        return (True, "cuda-python") if count else (False, "no CUDA GPU found (cuda-python sees 0 devices)")
    if nvidia_gpu_listed():
        return False, ("an NVIDIA GPU is present but this torch is a CPU-only build and cuda-python is not "
                       f"installed ({CUDA_PYTHON_HINT}, or a CUDA build of torch)")
    return False, "no CUDA GPU found (torch has no CUDA and nvidia-smi lists no GPU)"


def open_device(device: int = 0) -> DeviceMemory:
    """Device memory on GPU ``device``: torch's when torch has CUDA, else cuda-python's."""
    usable, how = device_status()
    if not usable:
        raise PTQError(f"No usable CUDA device: {how}.")
    return TorchCuda(device) if how == "torch" else CudaPython(device)
