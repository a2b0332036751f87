"""The project's TensorRT calls, checked on a CPU against the API of real TensorRT releases.

``tensorrt_surface.json`` is the Python API of NVIDIA's bindings wheels
(10.1, 10.16 and 11.4; regenerate with ``python Testing/tensorrt_surface.py``).
Two checks use it:

- every ``trt.<name>`` chain written in the TensorRT code exists in each
  release (a static scan, so untested branches count too);
- the builder, the engine cache and the runtime run end to end against a
  strict recording stand-in of each release (``tensorrt_standin.py``):
  unknown names raise, calls must bind to the real signatures, and the
  recorded order and arguments are checked (strongly typed network, one
  profile with min <= opt <= max, I/O modes, shapes, ``execute_async_v3``
  on the stream, outputs computed from the bound addresses). TensorRT
  failures (a factory returning nullptr, a None engine or context, a
  refused address) must surface as one PTQError quoting TensorRT's log.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from SlicerPTQLib.errors import PTQError
from tensorrt_models import export_unet, ort_qdq
from tensorrt_standin import HostMemory, distinct_releases, standin, surfaces

REPO = Path(__file__).resolve().parents[1]
TENSORRT_CODE = [REPO / "SlicerPTQ" / "SlicerPTQLib" / "tensorrt_build.py",
                 REPO / "SlicerPTQ" / "SlicerPTQLib" / "runtimes" / "tensorrt_runtime.py",
                 REPO / "benchmarks" / "bench_gpu.py", REPO / "benchmarks" / "gpu_check.py"]
RELEASES = distinct_releases()
ROI = (16, 16, 16)


def test_surface_covers_a_10x_and_an_11x_release():
    versions = {surface["version"].split(".")[0] for surface in surfaces().values()}
    assert {"10", "11"} <= versions
    assert "cu13:11.4.0.106" in surfaces()


def _trt_chains(path: Path):
    """``(line, ["X", "Y"])`` for every ``trt.X.Y`` attribute chain in ``path``."""
    chains = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            names, current = [], node
            while isinstance(current, ast.Attribute):
                names.insert(0, current.attr)
                current = current.value
            if isinstance(current, ast.Name) and current.id == "trt":
                chains.append((node.lineno, names))
    # Keep the longest chain starting at each place (trt.A.B, not also trt.A).
    longest = {}
    for line, names in chains:
        if len(names) > len(longest.get((line, names[0]), [])):
            longest[(line, names[0])] = names
    return sorted((line, names) for (line, _), names in longest.items())


@pytest.mark.parametrize("release", RELEASES)
def test_every_trt_name_in_the_code_exists_in_the_release(release):
    surface = surfaces()[release]
    missing, seen = [], 0
    for path in TENSORRT_CODE:
        for line, names in _trt_chains(path):
            seen += 1
            head = names[0]
            if head.startswith("__"):
                continue
            kind = surface["module"].get(head)
            if kind is None:
                missing.append(f"{path.name}:{line} trt.{head}")
            elif len(names) > 1 and kind == "enum" and names[1] not in surface["enums"][head]:
                missing.append(f"{path.name}:{line} trt.{'.'.join(names[:2])}")
            elif len(names) > 1 and kind == "class" and names[1] not in surface["classes"][head] \
                    and not names[1].startswith("__"):
                missing.append(f"{path.name}:{line} trt.{'.'.join(names[:2])}")
    assert seen > 20
    assert not missing, f"not in TensorRT {surface['version']}: {missing}"


def test_the_static_scan_sees_a_removed_name(tmp_path):
    code = tmp_path / "old.py"
    code.write_text("def f(trt):\n    return trt.BuilderFlag.INT8, trt.Builder.build_engine\n")
    assert _trt_chains(code) == [(2, ["Builder", "build_engine"]), (2, ["BuilderFlag", "INT8"])]
    eleven = surfaces()["cu12:11.4.0.106"]
    assert "INT8" not in eleven["enums"]["BuilderFlag"] and "build_engine" not in eleven["classes"]["Builder"]


# -- the stand-in run ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def float_onnx(tmp_path_factory) -> Path:
    return export_unet(tmp_path_factory.mktemp("trt_api") / "tiny.fp32.onnx", ROI, channels=(4, 8), num_res_units=0)


@pytest.fixture(scope="module")
def qdq_onnx(float_onnx, tmp_path_factory) -> Path:
    return ort_qdq(float_onnx, tmp_path_factory.mktemp("trt_api_qdq") / "tiny.int8.onnx", ROI, crops=1)


@pytest.fixture(params=RELEASES)
def trt(request, monkeypatch):
    """The stand-in of one release as ``tensorrt``, with host memory as the GPU."""
    return _install_standin(request.param, monkeypatch)


@pytest.fixture
def newest_trt(monkeypatch):
    """The stand-in of the newest release only (for long runs that make no release-specific call)."""
    return _install_standin(RELEASES[-1], monkeypatch)


def _install_standin(release: str, monkeypatch):
    from SlicerPTQLib import tensorrt_build
    from SlicerPTQLib.runtimes import cuda_memory, tensorrt_runtime

    module = standin(release)
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    monkeypatch.setattr(tensorrt_build, "_LOGGER", None)
    monkeypatch.setattr(tensorrt_runtime, "_RUNTIME_CHECK", {})
    monkeypatch.setattr(cuda_memory, "device_status", lambda: (True, "host"))
    monkeypatch.setattr(cuda_memory, "open_device", lambda device=0: HostMemory(device))
    monkeypatch.setattr(tensorrt_runtime.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "tensorrt" else _find_spec(name, *a))
    return module


_find_spec = importlib.util.find_spec


def _in_order(names, expected) -> bool:
    """True when ``expected`` occurs in ``names`` in this order (other calls may come between)."""
    remaining = iter(names)
    return all(any(name == wanted for name in remaining) for wanted in expected)


def _names(calls):
    return [name for name, _ in calls]


def _args(calls, name):
    return [args for called, args in calls if called == name]


def test_int8_build_and_run_follow_the_documented_sequence(trt, qdq_onnx, tmp_path):
    from SlicerPTQLib.runtimes.tensorrt_runtime import TensorRTRuntime

    runtime = TensorRTRuntime(qdq_onnx, precision="int8", roi=ROI, max_batch=2, cache_dir=tmp_path)
    major = int(trt.__version__.split(".")[0])
    names = _names(trt.calls)
    build_order = ["Builder.__init__", "Builder.create_network", "OnnxParser.__init__", "OnnxParser.set_flag",
                   "OnnxParser.parse_from_file", "Builder.create_builder_config",
                   "IBuilderConfig.set_memory_pool_limit", "IBuilderConfig.builder_optimization_level=",
                   "IBuilderConfig.profiling_verbosity=", "Builder.create_optimization_profile",
                   "IOptimizationProfile.set_shape", "IBuilderConfig.add_optimization_profile",
                   "Builder.build_serialized_network", "Runtime.__init__", "Runtime.deserialize_cuda_engine",
                   "ICudaEngine.create_execution_context"]
    assert _in_order(names, build_order), names
    (flags,) = _args(trt.calls, "Builder.create_network")[0]
    strongly_typed = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert flags == (0 if major >= 11 else strongly_typed)
    (name, low, opt, high), = _args(trt.calls, "IOptimizationProfile.set_shape")
    assert (name, list(low), list(opt), list(high)) == ("input", [1, 1, *ROI], [2, 1, *ROI], [2, 1, *ROI])
    assert _args(trt.calls, "OnnxParser.set_flag") == [(trt.OnnxParserFlag.NATIVE_INSTANCENORM,)]
    assert _args(trt.calls, "IBuilderConfig.profiling_verbosity=") == [(trt.ProfilingVerbosity.DETAILED,)]
    assert (runtime.max_batch, runtime.channels, runtime.spatial_range) == (2, 1, (ROI, ROI))

    trt.calls.clear()
    patches = np.random.default_rng(0).standard_normal((3, 1, *ROI)).astype(np.float32)
    output = runtime.predict(patches)
    expected = np.stack([(k + 1) * patches[:, 0] for k in range(2)], axis=1)
    np.testing.assert_allclose(output, expected, rtol=1e-6)
    assert _args(trt.calls, "IExecutionContext.set_input_shape") == [("input", (2, 1, *ROI)), ("input", (1, 1, *ROI))]
    addressed = [args[0] for args in _args(trt.calls, "IExecutionContext.set_tensor_address")]
    assert addressed == ["input", "output", "input", "output"]
    assert _args(trt.calls, "IExecutionContext.execute_async_v3") == [(7,), (7,)]

    layers = runtime.layer_precisions()
    assert layers and {layer["precision"] for layer in layers} == {"int8"}
    assert [layer["convtranspose"] for layer in layers if "convtranspose" in layer] == ["yes"]
    runtime.close()


def _plan(engine_path: Path) -> dict:
    """The stand-in's serialized plan: what the builder was given."""
    import json

    from tensorrt_standin import _PLAN_MAGIC

    return json.loads(engine_path.read_bytes()[len(_PLAN_MAGIC):])


def test_int8_engine_is_built_with_fp16_float_parts_by_default(trt, qdq_onnx, tmp_path):
    """The INT8 network's float parts are FP16 tensors (strongly typed: no FP16 builder flag), unless asked not to."""
    from SlicerPTQLib.fp16_float_parts import RECIPE
    from SlicerPTQLib.runtimes.tensorrt_runtime import TensorRTRuntime
    from SlicerPTQLib.tensorrt_build import onnx_compute_ops

    half = TensorRTRuntime(qdq_onnx, precision="int8", roi=ROI, max_batch=1, cache_dir=tmp_path)
    (parsed,) = _args(trt.calls, "OnnxParser.parse_from_file")
    assert parsed[0].endswith("tiny.int8.fp16-float-parts.onnx")
    assert not any(name.startswith("IBuilderConfig.set_flag") for name in _names(trt.calls))
    assert _plan(half.engine_path)["float16_initializers"] > 0 and _plan(half.engine_path)["quantized"]
    assert half.metadata["float_parts"]["fp16_nodes"] > 0 and half.metadata["onnx_file"].endswith("float-parts.onnx")
    # Layer names map to the user's QDQ file; the temporary FP16 copy is gone.
    assert half.metadata["onnx_ops"] == onnx_compute_ops(qdq_onnx) and half.metadata["onnx_ops"]
    assert not Path(parsed[0]).exists()

    trt.calls.clear()
    full = TensorRTRuntime(qdq_onnx, precision="int8", roi=ROI, max_batch=1, cache_dir=tmp_path, float_parts="fp32")
    (parsed,) = _args(trt.calls, "OnnxParser.parse_from_file")
    assert parsed[0] == str(qdq_onnx) and _plan(full.engine_path)["float16_initializers"] == 0
    assert full.built and full.engine_path != half.engine_path
    keys = [_sidecar_key(engine.engine_path) for engine in (half, full)]
    assert keys[0]["quantization"]["float_parts"] == "fp16" and keys[0]["quantization"]["float_parts_recipe"] == RECIPE
    assert keys[1]["quantization"]["float_parts"] == "fp32" and "float_parts_recipe" not in keys[1]["quantization"]


def _sidecar_key(engine_path: Path) -> dict:
    from SlicerPTQLib.engine_cache import read_sidecar

    return read_sidecar(engine_path)["key"]


def test_float_parts_setting_is_checked():
    from SlicerPTQLib.tensorrt_build import BuildSettings

    with pytest.raises(PTQError, match="float_parts 'bf16'"):
        BuildSettings(precision="int8", float_parts="bf16")


def test_second_runtime_is_a_cache_hit_without_a_build(trt, float_onnx, tmp_path):
    from SlicerPTQLib.runtimes.tensorrt_runtime import TensorRTRuntime

    first = TensorRTRuntime(float_onnx, precision="fp32", roi=ROI, max_batch=1, cache_dir=tmp_path)
    trt.calls.clear()
    second = TensorRTRuntime(float_onnx, precision="fp32", roi=ROI, max_batch=1, cache_dir=tmp_path)
    assert first.built and not second.built and second.engine_path == first.engine_path
    assert "Builder.build_serialized_network" not in _names(trt.calls)
    assert {layer["precision"] for layer in second.layer_precisions()} == {"fp32"}


def test_tensorrt_available_creates_one_runtime(trt):
    from SlicerPTQLib.runtimes.tensorrt_runtime import tensorrt_available

    assert tensorrt_available() == (True, f"TensorRT {trt.__version__} on Stand-in GPU (device memory: host)")
    assert tensorrt_available()[0]
    assert _names(trt.calls).count("Runtime.__init__") == 1


def test_runtime_that_cannot_start_cuda_is_reported(trt):
    from SlicerPTQLib.runtimes.tensorrt_runtime import tensorrt_available

    trt.failures["Runtime"] = "CUDA initialization failure with error: 35"
    usable, reason = tensorrt_available()
    assert not usable and "cannot create a runtime: CUDA initialization failure with error: 35" in reason
    assert "nullptr" not in reason


def test_builder_that_cannot_start_cuda_raises_ptqerror(trt, float_onnx, tmp_path):
    from SlicerPTQLib.tensorrt_build import BuildSettings, build_serialized_engine

    trt.failures["Builder"] = "CUDA initialization failure with error: 999"
    with pytest.raises(PTQError, match="cannot create a builder: CUDA initialization failure with error: 999"):
        build_serialized_engine(float_onnx, BuildSettings(precision="fp32", roi=ROI, max_batch=1))


@pytest.mark.parametrize("failure, message", [
    ("deserialize", "could not load the engine"),
    ("context", "could not create an execution context"),
])
def test_engine_load_failures_quote_tensorrt(trt, float_onnx, tmp_path, failure, message):
    from SlicerPTQLib.runtimes.tensorrt_runtime import TensorRTRuntime

    trt.failures[failure] = f"simulated {failure} failure"
    with pytest.raises(PTQError, match=message) as raised:
        TensorRTRuntime(float_onnx, precision="fp32", roi=ROI, max_batch=1, cache_dir=tmp_path)
    assert f"simulated {failure} failure" in str(raised.value)


def test_refused_tensor_address_raises_ptqerror(trt, float_onnx, tmp_path):
    from SlicerPTQLib.runtimes.tensorrt_runtime import TensorRTRuntime

    runtime = TensorRTRuntime(float_onnx, precision="fp32", roi=ROI, max_batch=1, cache_dir=tmp_path)
    trt.failures["address"] = "refused"
    with pytest.raises(PTQError, match="refused the device address of tensor 'input'"):
        runtime.predict(np.zeros((1, 1, *ROI), np.float32))


def test_stand_in_refuses_what_the_release_lacks(trt):
    with pytest.raises(AttributeError):
        trt.IExecutionContext.execute_async_v2
    logger = _logger(trt)
    builder = trt.Builder(logger)
    with pytest.raises(AttributeError, match="build_engine"):
        builder.build_engine
    profile = builder.create_optimization_profile()
    with pytest.raises(ValueError, match="min <= opt <= max"):
        profile.set_shape("input", [2, 1, 16, 16, 16], [2, 1, 16, 16, 16], [1, 1, 16, 16, 16])
    with pytest.raises(TypeError, match="incompatible function arguments"):
        builder.create_network("strongly typed")


def _logger(trt):
    from SlicerPTQLib.tensorrt_build import trt_logger

    return trt_logger()


def test_bench_gpu_table_with_max_batch_1(capsys, monkeypatch):
    """``--max-batch 1`` used to stop the table with StopIteration (and the JSON was written after it)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import bench_gpu

    def row(ms: float) -> dict:
        times = {"batch": 1, "mean_ms": ms, "median_ms": ms, "median_ms_per_patch": ms, "runs": 3}
        return {"engine_mb": ms, "patch_batch1": times, "patch_max_batch": times, "volume_median_s": ms,
                "dice_vs_fp32": 1.0, "layers": {"conv_int8": 0, "conv_total": 1}, "convtranspose": []}

    engines = {"fp32": row(4.0), "fp16": row(2.0), "int8": row(1.0), "int8_fp32_float": row(1.5)}
    assert list(engines) == list(bench_gpu.ENGINES)
    results = {"machine": {"gpu": "GPU", "tensorrt_runtime": "TensorRT"}, "roi": [16, 16, 16], "max_batch": 1,
               "engines": engines, **{key: bench_gpu.speedups(engines[baseline], engines[compared])
                                      for key, _, baseline, compared in bench_gpu.COMPARISONS}}
    bench_gpu.print_table(results)
    lines = capsys.readouterr().out.splitlines()
    # The headline first: INT8 (FP16 float parts) vs FP16.
    comparisons = [line for line in lines if " vs " in line]
    assert comparisons[0].startswith("INT8 vs FP16: patch 2.00x faster (batch 1), 2.00x (batch 1)")
    assert comparisons[1].startswith("INT8 vs FP32: patch 4.00x faster")
    assert comparisons[2].startswith("INT8 with FP16 float parts vs with FP32 ones: patch 1.50x faster")
    assert any(line.startswith("int8_fp32_float ") for line in lines)


def test_fp16_cache_key_names_the_onnxruntime_converter(trt, float_onnx):
    import onnxruntime

    from SlicerPTQLib.tensorrt_build import BuildSettings, engine_key

    key = engine_key(float_onnx, BuildSettings(precision="fp16", roi=ROI, max_batch=1))
    assert key.quantization["fp16_converter"] == f"onnxruntime {onnxruntime.__version__}"
    assert (key.gpu_name, key.compute_capability, key.tensorrt_version) == ("Stand-in GPU", "8.9", trt.__version__)


def test_cpu_placement_file_warns_when_built_for_tensorrt(trt, qdq_onnx, tmp_path):
    import json
    import shutil

    from SlicerPTQLib.pipeline import REPORT_NAME
    from SlicerPTQLib.tensorrt_build import BuildSettings, engine_for

    model = tmp_path / "model.int8.onnx"
    shutil.copy(qdq_onnx, model)
    (tmp_path / REPORT_NAME).write_text(json.dumps({"settings": {"placement": "cpu"},
                                                    "files": {"quantized_onnx": model.name}}))
    engine = engine_for(model, BuildSettings(precision="int8", roi=ROI, max_batch=1), cache_dir=tmp_path / "c")
    assert any("placement 'cpu'" in warning for warning in engine.metadata["qdq_warnings"])


def test_gpu_check_without_gpu_exits_2_and_writes_the_environment(tmp_path):
    import json
    import subprocess

    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and run.stderr.strip().count("\n") == 0
    record = json.loads((tmp_path / "gpu_check.json").read_text())["environment"]
    assert record["ok"] and record["tensorrt_available"] is False and record["versions"]["python"]


def test_gpu_check_steps_run_against_the_stand_in(trt, tmp_path, monkeypatch):
    """Steps 1-5 end to end on the stand-in: every TensorRT call they make exists and binds."""
    import json

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu_check

    monkeypatch.setattr(gpu_check, "SPEED_ROI", ROI)
    assert gpu_check.main(["--out", str(tmp_path), "--repeats", "2", "--skip-shipped"]) == 0
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(results) == ["environment", "tiny_unet", "convtranspose_axis", "inspector_fixtures", "speed"]
    assert all(step["ok"] for step in results.values()), results
    assert results["tiny_unet"]["second_load_cache_hit"] is True
    axes = {key: row for key, row in results["convtranspose_axis"].items() if key not in ("ok", "seconds")}
    assert set(axes) == {"axis0", "axis1", "per_tensor"}
    assert all("error" not in row and row["convtranspose_ran_int8"] for row in axes.values()), axes
    assert len(list((tmp_path / "inspector").glob("*.json"))) == 7
    assert set(results["speed"]["int8_speedup_vs_fp16"]) == {"batch1", "batch2"}
    assert set(results["speed"]["int8_speedup_vs_int8_fp32_float"]) == {"batch1", "batch2"}
    tiny = results["tiny_unet"]
    assert {"fp32", "fp16", "int8", "int8_fp32_float"} <= set(tiny) and "vs_fp32_qdq" in tiny["int8"]
    assert all(tiny[name]["layer_precisions"] for name in ("int8", "int8_fp32_float"))


def test_bench_gpu_runs_against_the_stand_in(newest_trt, tmp_path, monkeypatch, shipped_model_path, calibration_paths,
                                             evaluation_cases):
    """bench_gpu.py end to end on the shipped model: four engines, INT8 with and without FP16 float parts.

    One release: bench_gpu makes no TensorRT call of its own beyond the runtime's, which every release
    runs above; this checks the script's own code, which a GPU would otherwise meet first.
    """
    import json

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import bench_gpu

    out = tmp_path / "gpu.json"
    status = bench_gpu.main(["--calib", str(calibration_paths[0]), "--num-crops", "2", "--repeats", "2",
                             "--warmup", "1", "--volume-repeats", "1", "--max-batch", "1",
                             "--work", str(tmp_path / "work"), "--cache-dir", str(tmp_path / "engines"),
                             "--out", str(out)])
    assert status == 0
    results = json.loads(out.read_text())
    engines = results["engines"]
    assert list(engines) == list(bench_gpu.ENGINES)
    assert [(row["precision"], row["float_parts"]) for row in engines.values()] == list(bench_gpu.ENGINES.values())
    assert len({row["engine"] for row in engines.values()}) == 4
    assert all(key in results for key, _, _, _ in bench_gpu.COMPARISONS)
    assert engines["int8"]["layer_precisions"] and "dice_vs_reference" in engines["int8"]
