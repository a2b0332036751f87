"""The Slicer extension as packaged: CMake lists, Extensions Index entry, icons,
UI file vs widget code, model catalog, and first-use dependency plan.

These read the files on disk, so a file added without its CMake entry, a
widget renamed in one place only, or a catalog entry that drifted from the
shipped model fails here with the exact fix.
"""

from __future__ import annotations

import ast
import copy
import json
import re
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from SlicerPTQLib import catalog, dependencies, shipped
from SlicerPTQLib.errors import PTQError

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "SlicerPTQ"
MODULE_CMAKE = MODULE / "CMakeLists.txt"
TOP_CMAKE = ROOT / "CMakeLists.txt"
UI_FILE = MODULE / "Resources" / "UI" / "SlicerPTQ.ui"
MODULE_SCRIPT = MODULE / "SlicerPTQ.py"
RAW_PREFIX = "https://raw.githubusercontent.com/SlicerPTQ/SlicerPTQ/main/"

# Slicer's slicer-extension-catalog-entry-schema-v1.0.1.json, reduced to what it checks.
CATALOG_ENTRY_REQUIRED = {"$schema", "category", "scm_url"}
CATALOG_ENTRY_TYPES = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
                       "build_dependencies": list, "build_subdirectory": str, "enabled": bool, "tier": int}


def _cmake_list(text: str, variable: str):
    match = re.search(rf"set\(\s*{variable}\s+(.*?)\)", text, re.S)
    assert match, f"{MODULE_CMAKE} has no set({variable} ...)"
    return [item.replace("${MODULE_NAME}", "SlicerPTQ") for item in match.group(1).split()]


def _cmake_variable(name: str) -> str:
    match = re.search(rf'set\({name}\s+"([^"]*)"\)', TOP_CMAKE.read_text())
    assert match, f"{TOP_CMAKE} does not set {name}"
    return match.group(1)


def _files(folder: Path, pattern: str):
    return sorted(p.relative_to(MODULE).as_posix() for p in folder.rglob(pattern)
                  if p.is_file() and "__pycache__" not in p.parts)


def _png_size(path: Path):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG file"
    return struct.unpack(">II", header[16:24])


def _mismatch_message(variable: str, listed, on_disk) -> str:
    missing = sorted(set(on_disk) - set(listed))
    stale = sorted(set(listed) - set(on_disk))
    lines = []
    if missing:
        lines.append(f"add to {variable} in SlicerPTQ/CMakeLists.txt: " + " ".join(missing))
    if stale:
        lines.append(f"remove from {variable} in SlicerPTQ/CMakeLists.txt (no such file): " + " ".join(stale))
    duplicates = sorted({item for item in listed if list(listed).count(item) > 1})
    if duplicates:
        lines.append(f"listed twice in {variable}: " + " ".join(duplicates))
    return "; ".join(lines)


# --- CMake ---------------------------------------------------------------------------------------

def test_every_python_file_of_the_module_is_in_scripts():
    listed = _cmake_list(MODULE_CMAKE.read_text(), "MODULE_PYTHON_SCRIPTS")
    on_disk = ["SlicerPTQ.py"] + _files(MODULE / "SlicerPTQLib", "*.py")
    assert sorted(listed) == sorted(on_disk) and len(listed) == len(set(listed)), \
        _mismatch_message("MODULE_PYTHON_SCRIPTS", listed, on_disk)


def test_every_resource_file_is_in_resources():
    listed = _cmake_list(MODULE_CMAKE.read_text(), "MODULE_PYTHON_RESOURCES")
    # The core library's own data (the ModelSpec schema) installs beside its code.
    on_disk = _files(MODULE / "Resources", "*") + _files(MODULE / "SlicerPTQLib" / "resources", "*")
    assert sorted(listed) == sorted(on_disk) and len(listed) == len(set(listed)), \
        _mismatch_message("MODULE_PYTHON_RESOURCES", listed, on_disk)


def test_subpackages_have_init_files_so_slicer_installs_them_as_packages():
    for folder in (MODULE / "SlicerPTQLib").rglob("*"):
        if folder.is_dir() and folder.name != "__pycache__" and any(folder.glob("*.py")):
            assert (folder / "__init__.py").is_file(), f"add {folder.relative_to(ROOT)}/__init__.py"


def test_module_cmake_builds_a_scripted_module_with_tests():
    text = MODULE_CMAKE.read_text()
    assert "set(MODULE_NAME SlicerPTQ)" in text
    build = re.search(r"slicerMacroBuildScriptedModule\((.*?)\)", text, re.S).group(1)
    for keyword in ("NAME ${MODULE_NAME}", "SCRIPTS ${MODULE_PYTHON_SCRIPTS}",
                    "RESOURCES ${MODULE_PYTHON_RESOURCES}", "WITH_GENERIC_TESTS"):
        assert keyword in build
    assert re.search(r"if\(BUILD_TESTING\)(\s*#[^\n]*)*\s*slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)", text)


def test_top_level_cmake_describes_the_extension():
    text = TOP_CMAKE.read_text()
    assert re.search(r"^project\(PTQ\)", text, re.M)
    for name in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION"):
        assert _cmake_variable(name).strip()
    assert _cmake_variable("EXTENSION_CATEGORY") == "Segmentation"
    assert _cmake_variable("EXTENSION_DEPENDS") == "PyTorch"
    order = ["find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(SlicerPTQ)",
             "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"]
    positions = [text.find(line) for line in order]
    assert -1 not in positions and positions == sorted(positions), "CMake lines missing or out of order"


def test_icon_and_screenshot_urls_point_at_images_in_the_repository():
    urls = [_cmake_variable("EXTENSION_ICONURL")] + _cmake_variable("EXTENSION_SCREENSHOTURLS").split()
    for url in urls:
        assert url.startswith(RAW_PREFIX), f"{url} should be a raw URL of this repository's main branch"
        path = ROOT / url[len(RAW_PREFIX):]
        assert path.is_file(), f"{url} points at {path}, which does not exist"
        _png_size(path)
    assert _png_size(ROOT / "SlicerPTQ.png") == (128, 128)
    assert _png_size(MODULE / "Resources" / "Icons" / "SlicerPTQ.png") == (128, 128)


# --- Extensions Index entry ----------------------------------------------------------------------

def test_extensions_index_entry_follows_schema_v1_0_1():
    entry = json.loads((ROOT / "PTQ.json").read_text())
    assert CATALOG_ENTRY_REQUIRED <= set(entry)
    assert set(entry) <= set(CATALOG_ENTRY_TYPES), f"fields not in the schema: {set(entry) - set(CATALOG_ENTRY_TYPES)}"
    for key, value in entry.items():
        assert isinstance(value, CATALOG_ENTRY_TYPES[key]), key
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert entry["category"] == _cmake_variable("EXTENSION_CATEGORY")
    assert entry["build_dependencies"] == _cmake_variable("EXTENSION_DEPENDS").split()
    assert entry["scm_revision"] == "main" and entry["tier"] in (1, 3, 5)
    repository = entry["scm_url"].removesuffix(".git")
    assert _cmake_variable("EXTENSION_HOMEPAGE").startswith(repository)
    assert RAW_PREFIX.startswith(repository.replace("github.com", "raw.githubusercontent.com"))


def test_extension_name_and_license_meet_index_rules():
    name = re.search(r"^project\((\w+)\)", TOP_CMAKE.read_text(), re.M).group(1)
    assert not name.startswith("Slicer"), "the Extensions Index rejects names starting with 'Slicer'"
    assert (ROOT / f"{name}.json").is_file()
    assert (ROOT / "LICENSE").is_file() and "Apache License" in (ROOT / "LICENSE").read_text()[:200]


# --- UI file vs widget code ----------------------------------------------------------------------

def _ui_widgets():
    tree = ET.parse(UI_FILE)
    return {w.get("name"): w for w in tree.iter("widget")}, tree


def _parameter_fields():
    module = ast.parse(MODULE_SCRIPT.read_text())
    for node in module.body:
        if isinstance(node, ast.ClassDef) and node.name == "SlicerPTQParameterNode":
            return {item.target.id for item in node.body if isinstance(item, ast.AnnAssign)}
    raise AssertionError("SlicerPTQ.py has no SlicerPTQParameterNode class")


def test_every_widget_the_code_uses_exists_in_the_ui_file():
    widgets, _ = _ui_widgets()
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_SCRIPT.read_text()))
    missing = sorted(used - set(widgets))
    assert used and not missing, f"SlicerPTQ.py uses self.ui.{missing} but {UI_FILE.name} has no such widget"


def test_parameter_names_in_the_ui_match_the_parameter_node():
    widgets, _ = _ui_widgets()
    names = {}
    for widget_name, widget in widgets.items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                names[widget_name] = prop.find("string").text
    fields = _parameter_fields()
    unknown = {w: n for w, n in names.items() if n not in fields}
    assert names and not unknown, f"SlicerParameterName not in SlicerPTQParameterNode: {unknown}"
    assert {"numCrops", "method", "precision", "runtime", "inputVolume", "outputSegmentation",
            "compareWithFP32"} <= set(names.values())


def test_ui_declares_its_custom_widgets_and_scene_connections():
    widgets, tree = _ui_widgets()
    declared = {c.find("class").text for c in tree.iter("customwidget")}
    used = {w.get("class") for w in widgets.values()}
    custom = {cls for cls in used if cls.startswith(("ctk", "qMRML", "qSlicer"))}
    assert custom <= declared, f"declare in <customwidgets>: {sorted(custom - declared)}"
    connected = {c.find("receiver").text for c in tree.iter("connection")
                 if c.find("signal").text == "mrmlSceneChanged(vtkMRMLScene*)"}
    mrml_widgets = {name for name, w in widgets.items() if w.get("class").startswith("qMRML") and name != "SlicerPTQ"}
    assert mrml_widgets <= connected, f"connect mrmlSceneChanged to: {sorted(mrml_widgets - connected)}"


def test_combo_box_choices_come_from_the_logic():
    from SlicerPTQLib.logic import METHODS, PRECISIONS

    text = MODULE_SCRIPT.read_text()
    assert "Choice(list(METHODS))" in text and "Choice(list(PRECISIONS))" in text
    assert set(METHODS) == {"max", "percentile", "entropy", "mse", "auto"}
    assert set(PRECISIONS) == {"int8", "w4a8", "w2a8", "fp16", "fp32"}


def test_slicer_facing_library_imports_no_heavy_dependency():
    """The module must load in a fresh Slicer before torch & co. are installed (they come on first use)."""
    code = ("import sys; import SlicerPTQLib.logic, SlicerPTQLib.catalog, SlicerPTQLib.dependencies, "
            "SlicerPTQLib.worker_process, SlicerPTQLib.slicer_nodes; "
            "print(sorted(m for m in ('torch', 'monai', 'onnx', 'onnxruntime', 'openvino', 'nibabel', 'nrrd', "
            "'tensorrt') if m in sys.modules))")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]", f"imported at module load: {completed.stdout.strip()}"


# --- Model catalog -------------------------------------------------------------------------------

def _catalog_data():
    return json.loads(catalog.CATALOG_PATH.read_text())


def _schema():
    return json.loads(catalog.SCHEMA_PATH.read_text())


def test_catalog_validates_against_its_schema():
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft7Validator(_schema()).validate(_catalog_data())
    catalog.validate(_catalog_data(), _schema())


def test_first_catalog_entry_is_the_shipped_model_with_its_exact_spec():
    first = catalog.load_catalog()[0]
    assert first.id == "deepbet-brain-extraction"
    assert first.source == shipped.SHIPPED_MODEL, "catalog source drifted from shipped.SHIPPED_MODEL"
    assert first.spec == shipped.SHIPPED_SPEC, "catalog spec drifted from shipped.SHIPPED_SPEC"
    assert first.source.registry == "pypi" and first.license == "MIT"
    assert "12738006" in first.labels[0].terminology
    text = first.describe()
    assert "deepbet==1.0.2" in text and "128 x 128 x 128" in text and "1: brain" in text


def _broken(edit):
    data = copy.deepcopy(_catalog_data())
    edit(data["models"][0])
    return data


BROKEN_ENTRIES = {
    "missing title": (lambda m: m.pop("title"), r"models\[0\]: missing field\(s\) \['title'\]"),
    "bad sha256": (lambda m: m["source"].update(memberSha256="abc"), r"models\[0\]\.source\.memberSha256"),
    "unknown field": (lambda m: m.update(weights="x.pt"), r"unknown field\(s\) \['weights'\]"),
    "colour out of range": (lambda m: m["labels"][0].update(color=[1.5, 0, 0]), r"labels\[0\]\.color\[0\]"),
    "roi of two ints": (lambda m: m.update(roi=[128, 128]), r"models\[0\]\.roi: has 2 items"),
    "label value as text": (lambda m: m["labels"][0].update(value="1"), r"labels\[0\]\.value: expected integer"),
    "unknown modality": (lambda m: m.update(modality="XR"), r"models\[0\]\.modality"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_ENTRIES))
def test_broken_catalog_entries_are_rejected_with_the_field_named(case, tmp_path):
    edit, message = BROKEN_ENTRIES[case]
    data = _broken(edit)
    jsonschema = pytest.importorskip("jsonschema")
    assert list(jsonschema.Draft7Validator(_schema()).iter_errors(data)), "jsonschema accepts it too"
    broken = tmp_path / "Models.json"
    broken.write_text(json.dumps(data))
    with pytest.raises(PTQError, match=message):
        catalog.load_catalog(broken)


def test_duplicate_ids_and_unreadable_catalogs_are_errors(tmp_path):
    data = _catalog_data()
    data["models"].append(copy.deepcopy(data["models"][0]))
    duplicated = tmp_path / "Models.json"
    duplicated.write_text(json.dumps(data))
    with pytest.raises(PTQError, match="appear more than once"):
        catalog.load_catalog(duplicated)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PTQError, match="Cannot read the model catalog"):
        catalog.load_catalog(tmp_path / "bad.json")


def test_default_calibration_names_must_be_shipped_calibration_volumes(tmp_path):
    data = _catalog_data()
    data["models"][0]["defaultCalibration"] = ["mni2009a", "mni152"]  # mni152 is an evaluation volume
    broken = tmp_path / "Models.json"
    broken.write_text(json.dumps(data))
    with pytest.raises(PTQError, match=r"defaultCalibration names \['mni152'\], which are not shipped calibration "
                                       r"volumes \(mni2009a, renal_sub01, renal_sub02"):
        catalog.load_catalog(broken)
    data["models"][0]["defaultCalibration"] = []
    broken.write_text(json.dumps(data))
    with pytest.raises(PTQError, match=r"defaultCalibration: has 0 items"):
        catalog.load_catalog(broken)


def test_catalog_search_and_lookup():
    models = catalog.load_catalog()
    assert catalog.search(models, "") == models
    assert catalog.search(models, "brain MR") == models[:1]
    assert catalog.search(models, "liver") == []
    assert catalog.find_model(models, "deepbet-brain-extraction") is models[0]
    with pytest.raises(PTQError, match="Known models: deepbet-brain-extraction"):
        catalog.find_model(models, "totalsegmentator")
    assert catalog.terminologies_for(shipped.SHIPPED_SPEC, models) == {1: models[0].labels[0].terminology}


def test_terminology_string_has_slicers_seven_fields():
    text = catalog.terminology_string(("SCT", "123037004", "Anatomical Structure"), ("SCT", "12738006", "Brain"))
    parts = text.split("~")
    assert len(parts) == 7
    assert parts[0] == "Segmentation category and type - 3D Slicer General Anatomy list"
    assert parts[1:4] == ["SCT^123037004^Anatomical Structure", "SCT^12738006^Brain", "^^"]


# --- First-use dependencies ----------------------------------------------------------------------

def test_core_requirements_match_pyproject_dependencies():
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(declared) == sorted(r.pip for r in dependencies.CORE_REQUIREMENTS), \
        "keep dependencies.CORE_REQUIREMENTS equal to pyproject's [project] dependencies"


def test_the_triton_client_is_planned_for_the_remote_runtime_and_is_the_pyproject_extra():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["triton"] == [dependencies.TRITON_CLIENT.pip] and dependencies.TRITON_CLIENT.pip in extras["test"]
    everything_but_triton = lambda name: None if name == "tritonclient" else object()  # noqa: E731
    local = dependencies.install_plan(find_spec=everything_but_triton, version_of=lambda name: "9999", cuda_gpu=False)
    remote = dependencies.install_plan(find_spec=everything_but_triton, version_of=lambda name: "9999",
                                       cuda_gpu=False, remote=True)
    assert local.empty and remote.pip_arguments() == ["tritonclient[grpc,http]"]
    assert "tritonclient" in remote.question()


def test_install_plan_lists_missing_and_outdated_packages_only():
    installed = {"monai": "1.6.1", "onnx": "1.15.0", "openvino": "2026.4.0", "nibabel": "5.0", "pynrrd": "1.0",
                 "tqdm": "4.0", "numpy": "2.0", "scipy": "1.0", "onnxscript": "0.1", "einops": "0.8"}
    present = {"monai", "onnx", "openvino", "nibabel", "nrrd", "tqdm", "numpy", "scipy", "onnxscript", "einops", "yaml"}
    plan = dependencies.install_plan(find_spec=lambda name: object() if name in present else None,
                                     version_of=installed.get, cuda_gpu=False)
    assert plan.torch
    assert [r.pip for r in plan.packages] == ["onnx>=1.16", "onnxruntime>=1.18"]
    assert "PyTorch" in plan.question() and "onnxruntime" in plan.question()
    assert "about 234 MB" in plan.question()  # torch CPU 200 + onnx 17 + onnxruntime 17
    details = plan.details().splitlines()
    assert details[0].startswith("torch>=2.4 (about 200 MB, CPU build, by the PyTorch extension)")
    assert details[1:] == ["onnx>=1.16 (about 17 MB): model export and Q/DQ insertion; installed: "
                           + (dependencies.installed_version("onnx") or "none"),
                           "onnxruntime>=1.18 (about 17 MB): reference executor of quantized models; installed: "
                           + (dependencies.installed_version("onnxruntime") or "none")]
    gpu_plan = dependencies.install_plan(find_spec=lambda name: object() if name in present else None,
                                         version_of=installed.get, cuda_gpu=True)
    assert "tensorrt-cu12" in gpu_plan.pip_arguments() or "tensorrt-cu13" in gpu_plan.pip_arguments()
    assert gpu_plan.pip_arguments()[-2:] == ["--extra-index-url", dependencies.NVIDIA_INDEX]
    assert "CUDA build" in gpu_plan.question() and dependencies.NVIDIA_INDEX in gpu_plan.question()
    assert "GB" in gpu_plan.question() and "tens of minutes" in gpu_plan.question()  # CUDA torch + TensorRT


def test_too_old_torch_is_planned_for_the_pytorch_extension_without_importing_it():
    """Versions come from metadata: planning imports no torch (Windows would lock its DLLs)."""
    everything = lambda name: object()  # noqa: E731
    old = dependencies.install_plan(find_spec=everything, version_of=lambda name: "2.1.0+cu121" if name == "torch"
                                    else "9999", cuda_gpu=False)
    assert old.torch and not old.packages
    new = dependencies.install_plan(find_spec=everything, version_of=lambda name: "2.5.1+cu124" if name == "torch"
                                    else "9999", cuda_gpu=False)
    assert not new.torch
    assert dependencies.torch_cuda_major(lambda name: "2.5.1+cu124") == 12
    assert dependencies.torch_cuda_major(lambda name: "2.9.0+cu130") == 13
    assert dependencies.torch_cuda_major(lambda name: "2.13.0+cpu") is None
    assert dependencies.torch_cuda_major(lambda name: "2.13.0" if name == "torch" else None) is None
    assert dependencies.torch_cuda_major({"torch": "2.8.0", "nvidia-cuda-runtime-cu12": "12.8.90"}.get) == 12
    assert dependencies.torch_cuda_major({"torch": "2.8.0+cpu", "nvidia-cuda-runtime-cu12": "12.8.90"}.get) is None
    assert dependencies.torch_cuda_major(lambda name: None) is None
    code = ("import sys; from SlicerPTQLib import dependencies; dependencies.install_plan(); "
            "print('torch' in sys.modules)")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "False"


def test_tensorrt_is_planned_for_the_cuda_major_version():
    assert dependencies.tensorrt_requirement(12).pip == "tensorrt-cu12"
    assert dependencies.tensorrt_requirement(13).pip == "tensorrt-cu13"
    assert dependencies.cuda_python_requirement(13).pip == "cuda-bindings>=13,<14"
    assert dependencies.gpu_requirements(12)[0].pip == "tensorrt-cu12"


def test_this_environment_needs_nothing():
    plan = dependencies.install_plan(cuda_gpu=False)
    assert plan.empty, plan.question()


def test_install_runs_torch_first_then_pip_and_reports_failures():
    calls = []
    plan = dependencies.InstallPlan(torch=True, packages=[dependencies.Requirement("nibabel", "nibabel", "NIfTI")])

    def pip(args):
        # pip runs with torch pinned to the installed build, so it never replaces the PyTorch extension's torch
        calls.append(("pip", args[:2], Path(args[2]).read_text()))

    dependencies.install(plan, pip_install=pip, install_torch=lambda: calls.append(("torch",)) or True)
    torch_version = dependencies.installed_version("torch")
    assert calls == [("torch",), ("pip", ["nibabel", "--constraint"], f"torch=={torch_version}\n")]
    with pytest.raises(PTQError, match="PyTorch was not installed"):
        dependencies.install(plan, pip_install=lambda args: None, install_torch=lambda: False)

    def failing_pip(args):
        raise subprocess.CalledProcessError(1, ["pip", "install", *args])

    with pytest.raises(PTQError, match=r"slicer\.util\.pip_install\(\['nibabel'\]\)"):
        dependencies.install(plan, pip_install=failing_pip, install_torch=lambda: True)


# --- Widget calls vs the Logic ---------------------------------------------------------------------

def test_every_logic_call_of_the_widget_matches_ptqlogic():
    """The Widget cannot run here (no Qt), but each ``self.logic.X(...)`` it makes must name a PTQLogic
    method (or the Slicer logic base's parameter node) with arguments that method accepts."""
    import inspect

    from SlicerPTQLib.logic import PTQLogic

    slicer_base = {"getParameterNode"}  # ScriptedLoadableModuleLogic's, not PTQLogic's
    calls = [node for node in ast.walk(ast.parse(MODULE_SCRIPT.read_text()))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
             and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "logic"]
    assert calls
    problems = []
    for call in calls:
        name = call.func.attr
        if name in slicer_base:
            continue
        method = getattr(PTQLogic, name, None)
        if method is None:
            problems.append(f"line {call.lineno}: PTQLogic has no {name}")
            continue
        parameters = list(inspect.signature(method).parameters.values())[1:]  # without self
        names = {parameter.name for parameter in parameters}
        takes_kwargs = any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters)
        unknown = [kw.arg for kw in call.keywords if kw.arg and kw.arg not in names and not takes_kwargs]
        positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if unknown or (len(call.args) > len(positional)
                       and not any(p.kind is p.VAR_POSITIONAL for p in parameters)):
            problems.append(f"line {call.lineno}: {name}() takes no {unknown or 'that many positional arguments'}")
    assert not problems, problems
