"""Which Python packages the core still needs in this interpreter, and installing them.

Nothing is installed at import: the Slicer module calls :func:`install_plan`
on first use, asks the user with :meth:`InstallPlan.question`, then runs
:func:`install` with Slicer's installers (PyTorch through the PyTorch
extension, which picks the CUDA build; the rest with pip). TensorRT is
planned only when a CUDA GPU is present.
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
)
TENSORRT = Requirement("tensorrt", "tensorrt", "INT8 engines on NVIDIA GPUs")


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
        """Requirement strings for one ``pip install`` call."""
        return [requirement.pip for requirement in self.packages]

    def question(self) -> str:
        """The confirmation text shown before installing anything."""
        lines = ["SlicerPTQ needs these Python packages, which are not installed (or too old):", ""]
        if self.torch:
            lines.append("  - PyTorch (installed by the PyTorch extension, "
                         + ("CUDA build" if self.cuda_gpu else "CPU build") + ")")
        lines += [f"  - {requirement.pip}: {requirement.purpose}" for requirement in self.packages]
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
    """True when an NVIDIA GPU with a working driver is visible (torch's view when torch is installed)."""
    if importlib.util.find_spec("torch") is not None:
        import torch

        return bool(torch.cuda.is_available())
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        return False
    try:
        listing = subprocess.run([nvidia_smi, "-L"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return listing.returncode == 0 and "GPU" in listing.stdout


def install_plan(find_spec: FindSpec = importlib.util.find_spec, version_of: VersionOf = installed_version,
                 cuda_gpu: Optional[bool] = None) -> InstallPlan:
    """What must be installed before the core can run here (nothing is installed)."""
    cuda_gpu = cuda_gpu_present() if cuda_gpu is None else cuda_gpu
    wanted = list(CORE_REQUIREMENTS) + ([TENSORRT] if cuda_gpu else [])
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
