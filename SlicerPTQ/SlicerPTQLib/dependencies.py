"""Which Python packages the core still needs in this interpreter, and installing them.

Nothing is installed at import: the Slicer module calls :func:`install_plan`
on first use, asks the user with :meth:`InstallPlan.question`, then runs
:func:`install` with Slicer's installers (PyTorch through the PyTorch
extension, which picks the CUDA build; the rest with pip). TensorRT is
planned only when a CUDA GPU is present, in the build for the machine's
CUDA major version (``tensorrt-cu12`` or ``tensorrt-cu13``: an unpinned
``tensorrt`` pulls the newest, CUDA-13, build, which needs an R580+
driver), with cuda-python for the device memory when torch is a CPU-only
build. The ``tensorrt-cu*`` packages on PyPI are installers: TensorRT's
libraries come from NVIDIA's index (``https://pypi.nvidia.com``), which an
air-gapped site must mirror.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

from .errors import PTQError
from .worker_process import no_console_window

FindSpec = Callable[[str], object]
VersionOf = Callable[[str], Optional[str]]


@dataclass(frozen=True)
class Requirement:
    """An importable module and the pip requirement that provides it."""

    module: str
    pip: str
    purpose: str

    @property
    def distribution(self) -> str:
        """The pip distribution name (``pynrrd`` for module ``nrrd``)."""
        return re.split(r"[<>=!~ \[]", self.pip, maxsplit=1)[0]

    @property
    def minimum(self) -> Tuple[int, ...]:
        """The ``>=`` version bound as integers, ``()`` when unbounded."""
        match = re.search(r">=\s*([0-9][0-9.]*)", self.pip)
        return _version_tuple(match.group(1)) if match else ()


#: What the core imports (besides torch); kept equal to pyproject's dependencies.
CORE_REQUIREMENTS: Tuple[Requirement, ...] = (
    Requirement("numpy", "numpy", "arrays"),
    Requirement("monai", "monai>=1.4", "sliding-window inference, MONAI networks and bundles"),
    Requirement("onnx", "onnx>=1.16", "model export and Q/DQ insertion"),
    Requirement("onnxscript", "onnxscript", "ONNX export of newer PyTorch models"),
    Requirement("onnxruntime", "onnxruntime>=1.18", "reference executor of quantized models"),
    Requirement("openvino", "openvino>=2024.4", "INT8 kernels on the CPU"),
    Requirement("nibabel", "nibabel", "NIfTI files"),
    Requirement("nrrd", "pynrrd", "NRRD files"),
    Requirement("scipy", "scipy", "resampling"),
    Requirement("tqdm", "tqdm", "progress reporting"),
    Requirement("einops", "einops", "MONAI SwinUNETR / UNETR blocks"),
    Requirement("yaml", "pyyaml", "MONAI bundle configs in YAML, read as data"),
)
#: Where pip finds TensorRT's libraries (the PyPI packages only fetch them from there).
NVIDIA_INDEX = "https://pypi.nvidia.com"


@dataclass
class InstallPlan:
    """What is missing: PyTorch (installed through the PyTorch extension) and pip packages."""

    torch: bool
    packages: List[Requirement] = field(default_factory=list)
    cuda_gpu: bool = False

    @property
    def empty(self) -> bool:
        return not self.torch and not self.packages

    def pip_arguments(self) -> List[str]:
        """Arguments of one ``pip install`` call (NVIDIA's index added when TensorRT is planned)."""
        arguments = [requirement.pip for requirement in self.packages]
        if any(requirement.module == "tensorrt" for requirement in self.packages):
            arguments += ["--extra-index-url", NVIDIA_INDEX]
        return arguments

    def question(self) -> str:
        """The confirmation text shown before installing anything."""
        lines = ["SlicerPTQ needs these Python packages, which are not installed (or too old):", ""]
        if self.torch:
            lines.append("  - PyTorch (installed by the PyTorch extension, "
                         + ("CUDA build" if self.cuda_gpu else "CPU build") + ")")
        lines += [f"  - {requirement.pip}: {requirement.purpose}" for requirement in self.packages]
        if any(requirement.module == "tensorrt" for requirement in self.packages):
            lines += ["", f"TensorRT's libraries are downloaded from NVIDIA's index ({NVIDIA_INDEX})."]
        lines += ["", "Install them now? This downloads several hundred MB and can take a few minutes."]
        return "\n".join(lines)


def installed_version(distribution: str) -> Optional[str]:
    """The installed version of a pip distribution, or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def is_satisfied(requirement: Requirement, find_spec: FindSpec = importlib.util.find_spec,
                 version_of: VersionOf = installed_version) -> bool:
    """True when the module imports here and meets the minimum version."""
    if find_spec(requirement.module) is None:
        return False
    if not requirement.minimum:
        return True
    version = version_of(requirement.distribution)
    return version is not None and _version_tuple(version) >= requirement.minimum


def cuda_gpu_present() -> bool:
    """True when an NVIDIA GPU with a working driver is visible (torch's, cuda-python's or nvidia-smi's view)."""
    from .runtimes.cuda_memory import device_status, nvidia_gpu_listed

    return device_status()[0] or nvidia_gpu_listed()


def cuda_major() -> int:
    """The CUDA major version TensorRT must be built for here: torch's CUDA, else the driver's.

    A CUDA build of torch fixes the CUDA runtime in the process, so TensorRT
    follows it; without one, the newest CUDA the driver supports decides
    (``nvidia-smi`` prints it as "CUDA Version: 13.0"), and 12 when unknown.
    """
    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.version.cuda:
            return int(str(torch.version.cuda).split(".")[0])
    driver = _driver_cuda_version()
    return driver[0] if driver and driver[0] >= 13 else 12


def _driver_cuda_version() -> Tuple[int, ...]:
    """The newest CUDA version the NVIDIA driver supports, from ``nvidia-smi`` (``()`` if unknown)."""
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        return ()
    try:
        header = subprocess.run([nvidia_smi], capture_output=True, text=True, timeout=20, check=False,
                                **no_console_window()).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ()
    match = re.search(r"CUDA Version:\s*([0-9.]+)", header)
    return _version_tuple(match.group(1)) if match else ()


def tensorrt_requirement(major: Optional[int] = None) -> Requirement:
    """TensorRT for CUDA ``major`` (default: :func:`cuda_major`)."""
    major = cuda_major() if major is None else major
    return Requirement("tensorrt", f"tensorrt-cu{major}", f"INT8 engines on NVIDIA GPUs (CUDA {major} build, "
                                                          "libraries from NVIDIA's index)")


def cuda_python_requirement(major: Optional[int] = None) -> Requirement:
    """cuda-python's bindings for CUDA ``major``: device memory when torch has no CUDA."""
    major = cuda_major() if major is None else major
    return Requirement("cuda.bindings", f"cuda-bindings>={major},<{major + 1}",
                       "GPU memory for TensorRT (this torch is a CPU-only build)")


def gpu_requirements(major: Optional[int] = None) -> List[Requirement]:
    """What TensorRT needs on a GPU machine: TensorRT, and cuda-python unless torch has CUDA."""
    from .runtimes.cuda_memory import torch_has_cuda

    major = cuda_major() if major is None else major
    wanted = [tensorrt_requirement(major)]
    if importlib.util.find_spec("torch") is None or not torch_has_cuda():
        wanted.append(cuda_python_requirement(major))
    return wanted


def install_plan(find_spec: FindSpec = importlib.util.find_spec, version_of: VersionOf = installed_version,
                 cuda_gpu: Optional[bool] = None) -> InstallPlan:
    """What must be installed before the core can run here (nothing is installed)."""
    cuda_gpu = cuda_gpu_present() if cuda_gpu is None else cuda_gpu
    wanted = list(CORE_REQUIREMENTS) + (gpu_requirements() if cuda_gpu else [])
    return InstallPlan(torch=find_spec("torch") is None,
                       packages=[r for r in wanted if not is_satisfied(r, find_spec, version_of)],
                       cuda_gpu=cuda_gpu)


def install(plan: InstallPlan, pip_install: Callable[[List[str]], None],
            install_torch: Callable[[], object]) -> None:
    """Carry out ``plan`` with the host's installers, PyTorch first.

    ``install_torch`` returns a falsy value when the user declined or it
    failed; ``pip_install`` receives the requirement strings. Raises
    PTQError naming what is still missing and how to install it by hand.
    """
    if plan.torch and not install_torch():
        raise PTQError("PyTorch was not installed. Install it from the PyTorch extension "
                       "(PyTorch Utils module) and try again.")
    if plan.packages:
        try:
            pip_install(plan.pip_arguments())
        except Exception as exc:  # pip failures surface as many types (CalledProcessError, OSError, ...)
            raise PTQError(f"Installing {', '.join(plan.pip_arguments())} failed: {exc}. Check the network "
                           "or proxy settings, or run in the Python console: "
                           f"slicer.util.pip_install({plan.pip_arguments()!r})") from exc
    importlib.invalidate_caches()
    still_missing = install_plan(cuda_gpu=plan.cuda_gpu)
    if not still_missing.empty:
        raise PTQError("Still missing after installation: "
                       + ", ".join((["torch"] if still_missing.torch else []) + still_missing.pip_arguments())
                       + ". Restart 3D Slicer and try again; if it persists, install them from the Python console.")


def _version_tuple(version: str) -> Tuple[int, ...]:
    parts = []
    for piece in version.split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts)
