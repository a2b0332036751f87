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

Planning never imports torch (nor CUDA libraries): on Windows an imported
torch keeps its DLLs locked, and the PyTorch extension could not replace it.
Versions come from package metadata, the GPU from ``nvidia-smi``. pip runs
with torch pinned to the installed version, so it never replaces torch.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
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
    #: what pip downloads for it, roughly (MB), for the question asked before installing
    size_mb: int = 5

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
    Requirement("numpy", "numpy", "arrays", 20),
    Requirement("monai", "monai>=1.4", "sliding-window inference, MONAI networks and bundles", 3),
    Requirement("onnx", "onnx>=1.16", "model export and Q/DQ insertion", 17),
    Requirement("onnxscript", "onnxscript", "ONNX export of newer PyTorch models", 1),
    Requirement("onnxruntime", "onnxruntime>=1.18", "reference executor of quantized models", 17),
    Requirement("openvino", "openvino>=2024.4", "INT8 kernels on the CPU", 45),
    Requirement("nibabel", "nibabel", "NIfTI files", 4),
    Requirement("nrrd", "pynrrd", "NRRD files", 1),
    Requirement("scipy", "scipy", "resampling", 40),
    Requirement("tqdm", "tqdm", "progress reporting", 1),
    Requirement("einops", "einops", "MONAI SwinUNETR / UNETR blocks", 1),
    Requirement("yaml", "pyyaml", "MONAI bundle configs in YAML, read as data", 1),
)
#: The client of the "Remote Triton server" runtime (pyproject's ``triton`` extra), planned when that runtime runs.
TRITON_CLIENT = Requirement("tritonclient", "tritonclient[grpc,http]", "client of a remote Triton server", 12)
#: The oldest torch that monai and the ONNX exporter work with; the PyTorch extension installs at least this.
TORCH_REQUIREMENT = ">=2.4"
#: Download of torch by the PyTorch extension, roughly (MB): the CPU build, and the CUDA build with its libraries.
TORCH_SIZE_MB = {False: 200, True: 3000}
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

    @property
    def download_mb(self) -> int:
        """Roughly what installing the plan downloads (MB)."""
        return (TORCH_SIZE_MB[self.cuda_gpu] if self.torch else 0) + sum(r.size_mb for r in self.packages)

    def pip_arguments(self, constraints: Optional[Path] = None) -> List[str]:
        """Arguments of one ``pip install`` call (NVIDIA's index added when TensorRT is planned;
        ``constraints``: a pip constraints file, see :func:`install`)."""
        arguments = [requirement.pip for requirement in self.packages]
        if any(requirement.module == "tensorrt" for requirement in self.packages):
            arguments += ["--extra-index-url", NVIDIA_INDEX]
        if constraints is not None:
            arguments += ["--constraint", str(constraints)]
        return arguments

    def question(self) -> str:
        """The confirmation text shown before installing anything (the list is in :meth:`details`)."""
        names = (["PyTorch"] if self.torch else []) + [requirement.distribution for requirement in self.packages]
        size = self.download_mb
        amount = f"about {size / 1000:.1f} GB" if size >= 1000 else f"about {size} MB"
        lines = [f"SlicerPTQ needs Python packages that are not installed here (or too old): {', '.join(names)}.",
                 "", f"Install them now? This downloads {amount} and can take "
                 + ("tens of minutes." if size >= 1000 else "a few minutes.")]
        if self.torch:
            lines += ["", "PyTorch comes through the PyTorch extension (" + ("CUDA" if self.cuda_gpu else "CPU")
                      + " build); restart 3D Slicer afterwards if it asks you to."]
        if any(requirement.module == "tensorrt" for requirement in self.packages):
            lines += ["", f"TensorRT's libraries are downloaded from NVIDIA's index ({NVIDIA_INDEX})."]
        return "\n".join(lines)

    def details(self) -> str:
        """One line per package: requirement, rough download, what it is for, the version installed now."""
        lines = []
        if self.torch:
            installed = installed_version("torch")
            lines.append(f"torch{TORCH_REQUIREMENT} (about {TORCH_SIZE_MB[self.cuda_gpu]} MB, "
                         f"{'CUDA' if self.cuda_gpu else 'CPU'} build, by the PyTorch extension): "
                         f"networks and ONNX export; installed: {installed or 'none'}")
        for requirement in self.packages:
            installed = installed_version(requirement.distribution)
            lines.append(f"{requirement.pip} (about {requirement.size_mb} MB): {requirement.purpose}; "
                         f"installed: {installed or 'none'}")
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
    """True when ``nvidia-smi -L`` lists an NVIDIA GPU (a driver is installed and sees one)."""
    return "GPU" in _nvidia_smi("-L")


def torch_cuda_major(version_of: VersionOf = installed_version) -> Optional[int]:
    """The CUDA major version the installed torch was built for (None: no torch, or a CPU build).

    Read from the wheel's local version label (``2.5.1+cu124`` -> 12), or for PyPI's default Linux
    wheel (no label) from the CUDA runtime package it depends on, so torch is not imported.
    """
    version = version_of("torch")
    if version is None:
        return None
    match = re.search(r"\+cu(\d+)", version)
    if match and len(match.group(1)) > 1:
        return int(match.group(1)[:-1])
    if "+" not in version:
        for major in (13, 12, 11):
            if version_of(f"nvidia-cuda-runtime-cu{major}"):
                return major
    return None


def cuda_major() -> int:
    """The CUDA major version TensorRT must be built for here: torch's CUDA, else the driver's.

    A CUDA build of torch fixes the CUDA runtime in the process, so TensorRT
    follows it; without one, the newest CUDA the driver supports decides
    (``nvidia-smi`` prints it as "CUDA Version: 13.0"), and 12 when unknown.
    """
    torch_major = torch_cuda_major()
    if torch_major is not None:
        return torch_major
    driver = _driver_cuda_version()
    return driver[0] if driver and driver[0] >= 13 else 12


def _driver_cuda_version() -> Tuple[int, ...]:
    """The newest CUDA version the NVIDIA driver supports, from ``nvidia-smi`` (``()`` if unknown)."""
    match = re.search(r"CUDA Version:\s*([0-9.]+)", _nvidia_smi())
    return _version_tuple(match.group(1)) if match else ()


def _nvidia_smi(*arguments: str) -> str:
    """What ``nvidia-smi`` prints ("" without an NVIDIA driver), run without a console window."""
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        return ""
    try:
        completed = subprocess.run([nvidia_smi, *arguments], capture_output=True, text=True, timeout=20,
                                   check=False, **no_console_window())
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return completed.stdout if completed.returncode == 0 else ""


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
    major = cuda_major() if major is None else major
    wanted = [tensorrt_requirement(major)]
    if torch_cuda_major() is None:
        wanted.append(cuda_python_requirement(major))
    return wanted


def install_plan(find_spec: FindSpec = importlib.util.find_spec, version_of: VersionOf = installed_version,
                 cuda_gpu: Optional[bool] = None, remote: bool = False) -> InstallPlan:
    """What must be installed before the core can run here (nothing is installed); ``remote``: also the
    Triton client, for segmenting through a server."""
    cuda_gpu = cuda_gpu_present() if cuda_gpu is None else cuda_gpu
    wanted = list(CORE_REQUIREMENTS) + (gpu_requirements() if cuda_gpu else []) + ([TRITON_CLIENT] if remote else [])
    torch = Requirement("torch", f"torch{TORCH_REQUIREMENT}", "networks and ONNX export")
    return InstallPlan(torch=not is_satisfied(torch, find_spec, version_of),
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
        raise PTQError(f"PyTorch was not installed (SlicerPTQ needs torch{TORCH_REQUIREMENT}). Install it from the "
                       "PyTorch extension (PyTorch Utils module) and try again.")
    if plan.packages:
        with tempfile.TemporaryDirectory(prefix="slicer-ptq-pip-") as folder:
            constraints = _torch_pin(Path(folder))
            try:
                pip_install(plan.pip_arguments(constraints))
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


def _torch_pin(folder: Path) -> Optional[Path]:
    """A pip constraints file holding torch at its installed version (None: no torch), so that pip
    (resolving monai's ``torch`` requirement) never replaces the PyTorch extension's build."""
    version = installed_version("torch")
    if version is None:
        return None
    path = folder / "constraints.txt"
    path.write_text(f"torch=={version}\n")
    return path


def _version_tuple(version: str) -> Tuple[int, ...]:
    parts = []
    for piece in version.split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts)
