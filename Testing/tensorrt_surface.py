"""Write ``tensorrt_surface.json``: the Python API of real TensorRT releases, read from NVIDIA's wheels.

The TensorRT Python bindings (``tensorrt-cu12-bindings`` / ``tensorrt-cu13-bindings``
on PyPI, about 1.3 MB each) are a pybind11 module linked against
libnvinfer, libnvinfer_plugin and libnvonnxparser, which come only from
NVIDIA's own index. The bindings call just ten C entry points of those
libraries (``createInferBuilder_INTERNAL``, ``getPluginRegistry``, ...),
and none at import, so this script compiles a stub of each library with
``gcc`` (every entry point returns NULL/0), imports the real bindings
against it in a subprocess, and records for every module name its kind,
for every class its members (methods with their pybind11 signatures,
properties with whether they are writable) and for every enum its
members. No GPU, CUDA or TensorRT library is needed; Linux x86-64 with
gcc and ``pip download`` access to PyPI is.

Run it when TensorRT releases change what the project supports::

    python Testing/tensorrt_surface.py                       # the default releases
    python Testing/tensorrt_surface.py --release cu12:10.1.0 --release cu13:11.4.0.106

``Testing/test_tensorrt_api.py`` checks the project's TensorRT calls
against the JSON, and drives the builder and runtime through a strict
stand-in built from it (``Testing/tensorrt_standin.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent
OUT = HERE / "tensorrt_surface.json"
#: The oldest 10.x the project supports, the last 10.x, and the newest 11.x (CUDA 12 and 13 builds).
DEFAULT_RELEASES = ("cu12:10.1.0", "cu12:10.16.1.11", "cu12:11.4.0.106", "cu13:11.4.0.106")
#: The C entry points the bindings import from libnvinfer, libnvinfer_plugin and libnvonnxparser.
STUB_SOURCE = """
void *createInferBuilder_INTERNAL(void *logger, int version) { return 0; }
void *createInferRuntime_INTERNAL(void *logger, int version) { return 0; }
void *createInferRefitter_INTERNAL(void *engine, void *logger, int version) { return 0; }
void *createNvOnnxParser_INTERNAL(void *network, void *logger, int version) { return 0; }
void *createNvOnnxParserRefitter_INTERNAL(void *refitter, void *logger, int version) { return 0; }
int getNvOnnxParserVersion(void) { return 0; }
int getInferLibVersion(void) { return 0; }
void *getPluginRegistry(void) { return 0; }
void *getBuilderPluginRegistry(int capability) { return 0; }
int initLibNvInferPlugins(void *logger, const char *name_space) { return 0; }
"""
LIBRARIES = ("nvinfer", "nvinfer_plugin", "nvonnxparser")

# Runs inside the subprocess that imports the bindings: prints the surface as JSON.
DUMP = r'''
import inspect, json, sys
import tensorrt_bindings as trt

def signatures(doc):
    lines = [line.strip() for line in (doc or "").splitlines()]
    if lines and "Overloaded function." in lines[1:2]:
        found = [line.split(". ", 1)[1] for line in lines if line[:1].isdigit() and ". " in line]
    else:
        found = lines[:1]
    return [line.replace("tensorrt.tensorrt.", "").replace("tensorrt_bindings.tensorrt.", "") for line in found]

def members(cls):
    result = {}
    for name in dir(cls):
        if name.startswith("__") and name not in ("__init__", "__call__"):
            continue
        raw = inspect.getattr_static(cls, name)
        if isinstance(raw, type) and hasattr(raw, "__members__"):
            result[name] = {"kind": "enum", "members": {k: int(v) for k, v in raw.__members__.items()}}
        elif hasattr(type(raw), "__members__"):
            result[name] = {"kind": "value", "type": type(raw).__name__, "name": raw.name}
        elif isinstance(raw, property):
            result[name] = {"kind": "property", "writable": raw.fset is not None}
        elif isinstance(raw, staticmethod):
            result[name] = {"kind": "staticmethod", "signatures": signatures(raw.__func__.__doc__)}
        elif callable(raw):
            result[name] = {"kind": "method", "signatures": signatures(getattr(raw, "__doc__", ""))}
        else:
            result[name] = {"kind": "value", "type": type(raw).__name__}
    return result

surface = {"version": trt.__version__, "module": {}, "classes": {}, "enums": {}}
for name in dir(trt):
    if name.startswith("_"):
        continue
    value = getattr(trt, name)
    if isinstance(value, type) and hasattr(value, "__members__"):
        surface["module"][name] = "enum"
        surface["enums"][name] = {key: int(member) for key, member in value.__members__.items()}
    elif isinstance(value, type):
        surface["module"][name] = "class"
        surface["classes"][name] = members(value)
    elif callable(value):
        surface["module"][name] = "function"
        surface["classes"]["<function " + name + ">"] = {"__call__": {"kind": "method",
                                                                       "signatures": signatures(value.__doc__)}}
    elif hasattr(type(value), "__members__"):
        surface["module"][name] = "enum value " + type(value).__name__ + "." + value.name
    else:
        surface["module"][name] = "value " + type(value).__name__
json.dump(surface, sys.stdout, sort_keys=True)
'''


def build_stubs(folder: Path, major: str) -> None:
    """Compile ``lib<name>.so.<major>`` stubs of the three TensorRT libraries into ``folder``."""
    source = folder / "nvinfer_stub.c"
    source.write_text(STUB_SOURCE)
    for library in LIBRARIES:
        soname = f"lib{library}.so.{major}"
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(folder / soname), f"-Wl,-soname,{soname}",
                        str(source)], check=True)


def release_surface(release: str, work: Path) -> Dict:
    """Download one bindings wheel (``cu12:10.1.0``), import it against the stubs, return its surface."""
    cuda, version = release.split(":")
    target = work / release.replace(":", "-")
    target.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
                    "-d", str(target), f"tensorrt-{cuda}-bindings=={version}"], check=True)
    wheel = next(target.glob("*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target / "site")
    build_stubs(target, version.split(".")[0])
    environment = dict(os.environ, PYTHONPATH=str(target / "site"), LD_LIBRARY_PATH=str(target))
    dumped = subprocess.run([sys.executable, "-c", DUMP], env=environment, capture_output=True, text=True,
                            check=True)
    surface = json.loads(dumped.stdout)
    surface["wheel"] = wheel.name
    return surface


def _api(surface: Dict) -> Dict:
    return {key: value for key, value in surface.items() if key != "wheel"}


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--release", action="append", help="cuXX:version (repeatable; default: %(default)s)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    releases = args.release or list(DEFAULT_RELEASES)
    surfaces: Dict[str, Dict] = {}
    with tempfile.TemporaryDirectory(prefix="trt-surface-") as folder:
        for release in releases:
            surface = release_surface(release, Path(folder))
            # The CUDA 12 and 13 builds of one release bind the same API: store it once.
            twin = next((name for name, seen in surfaces.items() if _api(seen) == _api(surface)), None)
            surfaces[release] = {"same_as": twin, "wheel": surface["wheel"]} if twin else surface
    document = {"generator": "Testing/tensorrt_surface.py", "python": sys.version.split()[0],
                "releases": surfaces}
    args.out.write_text(json.dumps(document, sort_keys=True, indent=0) + "\n")
    for release, surface in surfaces.items():
        size = f"same API as {surface['same_as']}" if "same_as" in surface else (
            f"{len(surface['module'])} names, {len(surface['classes'])} classes")
        print(f"{release}: {surface['wheel']}: {size}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
