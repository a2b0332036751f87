"""Which CPU ran a measurement, and which int8 instructions it has.

INT8 speed-ups depend on the instruction set (AMX >> AVX-512 VNNI >
AVX-VNNI > AVX2), so every speed claim is printed beside this.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .int8_compat import int8_path

#: Flags that decide INT8/BF16 speed, best first (Linux /proc/cpuinfo names).
ISA_FLAGS = ("amx_int8", "amx_bf16", "avx512_vnni", "avx512_bf16", "avx_vnni", "avx512f", "avx2")


def parse_cpuinfo(text: str) -> Dict[str, object]:
    """Model name and the :data:`ISA_FLAGS` present, from /proc/cpuinfo text."""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return {"model": model, "isa": [flag for flag in ISA_FLAGS if flag in flags]}


def isa_flags() -> List[str]:
    """The :data:`ISA_FLAGS` this CPU has ([] where /proc/cpuinfo does not exist)."""
    cpuinfo = Path("/proc/cpuinfo")
    return parse_cpuinfo(cpuinfo.read_text())["isa"] if cpuinfo.exists() else []


def cpu_info() -> Dict[str, object]:
    """What this CPU is and can do.

    ``{"model", "cores" (usable by this process), "isa" (present
    :data:`ISA_FLAGS`), "int8_path" (the INT8 instruction set in effect, in words, with the
    ``ONEDNN_MAX_CPU_ISA`` cap when one hides a better one),
    "openvino_capabilities" (OpenVINO's OPTIMIZATION_CAPABILITIES, [] without
    OpenVINO), "onednn_max_cpu_isa" (the ``ONEDNN_MAX_CPU_ISA`` cap, "" when unset)}``. ``isa`` is empty where /proc/cpuinfo does not exist (macOS,
    Windows); OpenVINO's capabilities still tell INT8/BF16 support there.
    """
    cpuinfo = Path("/proc/cpuinfo")
    info = parse_cpuinfo(cpuinfo.read_text()) if cpuinfo.exists() else {"model": "", "isa": []}
    capabilities, device_name = _openvino_cpu()
    info["model"] = info["model"] or device_name or platform.processor() or platform.machine()
    info["cores"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    path = int8_path(info["isa"])
    capped = "ONEDNN_MAX_CPU_ISA" in path.reason
    info["int8_path"] = f"{path.name} ({path.reason})" if capped or not info["isa"] else path.name
    info["openvino_capabilities"] = capabilities
    info["onednn_max_cpu_isa"] = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
    return info


def describe(info: Optional[Dict[str, object]] = None) -> str:
    """One line for reports: ``"Intel(R) Xeon(R) ..., 2 cores, int8: AMX INT8 (amx_int8 ...)"``."""
    info = info or cpu_info()
    isa = " ".join(info["isa"]) or "flags unknown"
    return f"{info['model']}, {info['cores']} cores, int8: {info['int8_path']} ({isa})"


def cpu_summary() -> Dict[str, object]:
    """:func:`cpu_info` plus its one-line ``"description"``, for JSON reports."""
    info = cpu_info()
    info["description"] = describe(info)
    return info


def _openvino_cpu() -> Tuple[List[str], str]:
    try:
        import openvino
    except ImportError:
        return [], ""
    core = openvino.Core()
    return (list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
            str(core.get_property("CPU", "FULL_DEVICE_NAME")))
