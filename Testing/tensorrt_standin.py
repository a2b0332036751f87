"""A strict, recording stand-in for the ``tensorrt`` module, built from the real bindings' API.

:func:`standin` returns a module object for one release in
``tensorrt_surface.json`` (written by ``tensorrt_surface.py`` from NVIDIA's
wheels). Every module name, class member, enum member and method
signature comes from that release: an unknown name raises
``AttributeError`` as the real bindings do, a call that does not bind to
the pybind11 signature (argument count, keyword names, simple types)
raises ``TypeError``, and a read-only property refuses assignment. Each
call is appended to ``module.calls`` as ``("Class.method", args)``.

Behind the surface sits a small simulation of what the project asks of
TensorRT: the ONNX parser reads the real ONNX file, the builder checks the
optimization profile against the network input (``min <= opt <= max``
elementwise, one shape per dim) and serializes a plan, the runtime
refuses a plan of another version, and ``execute_async_v3`` reads the
input from the bound host address and writes a known function of it
(output channel ``k`` = ``(k + 1) * sum of input channels``) to the bound
output address, so wrong addresses, shapes or I/O modes show up as wrong
numbers. ``module.failures`` makes a step fail the way TensorRT does
(a factory returning nullptr after logging an error, a None engine, a
None context, a False from ``set_tensor_address``). A member the
simulation does not cover raises ``NotImplementedError``.

Device memory for the runtime comes from :class:`HostMemory` (numpy arrays
whose addresses stand in for device pointers).
"""

from __future__ import annotations

import ctypes
import inspect
import json
import re
import time
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

SURFACE_FILE = Path(__file__).resolve().parent / "tensorrt_surface.json"
_PLAN_MAGIC = b"STANDIN-PLAN\n"


def surfaces() -> Dict[str, Dict]:
    """``{release: surface}`` with ``same_as`` entries resolved."""
    releases = json.loads(SURFACE_FILE.read_text())["releases"]
    return {name: (releases[entry["same_as"]] if "same_as" in entry else entry) for name, entry in releases.items()}


def distinct_releases() -> List[str]:
    """One release per distinct API (the CUDA 13 twin of a CUDA 12 build is left out)."""
    releases = json.loads(SURFACE_FILE.read_text())["releases"]
    return [name for name, entry in releases.items() if "same_as" not in entry]


# -- signatures -------------------------------------------------------------------------------

def _split_top(text: str) -> List[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    if current.strip():
        parts.append(current.strip())
    return parts


def _parse(signature: str) -> Tuple[inspect.Signature, Dict[str, str], str]:
    """``inspect.Signature`` (self included), parameter types and the return type of a pybind11 line."""
    match = re.match(r"^\w+\((.*)\)(?:\s*->\s*(.+))?$", signature)
    if match is None:
        return inspect.Signature([inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL),
                                  inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]), {}, ""
    parameters, types_ = [], {}
    keyword_only = False
    for part in _split_top(match.group(1)):
        if part == "*":
            keyword_only = True
            continue
        if part.startswith("**"):
            parameters.append(inspect.Parameter(part[2:].split(":")[0], inspect.Parameter.VAR_KEYWORD))
            continue
        if part.startswith("*"):
            parameters.append(inspect.Parameter(part[1:].split(":")[0], inspect.Parameter.VAR_POSITIONAL))
            continue
        declaration, _, default = part.partition("=")
        name, _, annotation = declaration.partition(":")
        kind = inspect.Parameter.KEYWORD_ONLY if keyword_only else inspect.Parameter.POSITIONAL_OR_KEYWORD
        parameters.append(inspect.Parameter(name.strip(), kind,
                                            default=default.strip() if default else inspect.Parameter.empty))
        types_[name.strip()] = annotation.strip()
    return inspect.Signature(parameters), types_, (match.group(2) or "").strip()


# -- enums --------------------------------------------------------------------------------------

class StandInEnumMember:
    def __init__(self, enum: str, name: str, value: int) -> None:
        self.enum, self.name, self.value = enum, name, value

    def __int__(self) -> int:
        return self.value

    __index__ = __int__

    def __hash__(self) -> int:
        return hash((self.enum, self.value))

    def __eq__(self, other) -> bool:
        if isinstance(other, StandInEnumMember):
            return (self.enum, self.value) == (other.enum, other.value)
        return NotImplemented

    def __repr__(self) -> str:
        return f"<{self.enum}.{self.name}: {self.value}>"


class StandInEnum:
    """An enum type: its members as attributes; any other name raises AttributeError."""

    def __init__(self, name: str, members: Dict[str, int]) -> None:
        self._name = name
        self.__members__ = {key: StandInEnumMember(name, key, value) for key, value in members.items()}

    def __getattr__(self, key: str):
        members = self.__dict__.get("__members__", {})
        if key in members:
            return members[key]
        raise AttributeError(f"type object '{self._name}' has no attribute '{key}'")

    def __instancecheck__(self, value) -> bool:
        return isinstance(value, StandInEnumMember) and value.enum == self._name


# -- the strict object base ---------------------------------------------------------------------

class _StandInType(type):
    """Class-level names of the surface (``trt.ILogger.ERROR``) resolve through the module."""

    def __getattr__(cls, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        member = cls._si_lookup(name)
        if member is None:
            raise AttributeError(f"type object '{cls._si_class}' has no attribute '{name}'")
        if member["kind"] in ("value", "enum"):
            return cls._si_module._si_class_value(cls._si_class, name)
        raise NotImplementedError(f"stand-in class attribute {cls._si_class}.{name} ({member['kind']})")


class StandInObject(metaclass=_StandInType):
    """Attribute access checked against one class of the surface; calls recorded and simulated."""

    _si_class = ""
    _si_module = None

    def __init__(self, *args, **kwargs) -> None:
        object.__setattr__(self, "_si_props", {})
        self._si_call("__init__", args, kwargs)

    def __getattribute__(self, name: str):
        if name.startswith("__") or name.startswith("_si_"):
            return object.__getattribute__(self, name)
        for klass in type(self).__mro__:  # attributes a Python subclass (our logger) defines itself
            if klass.__dict__.get("_si_generated"):
                break
            if name in klass.__dict__:
                return object.__getattribute__(self, name)
        if type(self).__dict__.get("_si_generated") is None and name in object.__getattribute__(self, "__dict__"):
            return object.__getattribute__(self, "__dict__")[name]
        member = self._si_member(name)
        kind = member["kind"]
        if kind == "property":
            props = object.__getattribute__(self, "_si_props")
            getter = getattr(type(self), f"_si_get_{name}", None)
            if getter is not None:
                return getter(self)
            if name in props:
                return props[name]
            raise NotImplementedError(f"stand-in {self._si_class}.{name} has no value")
        if kind in ("method", "staticmethod"):
            return lambda *args, **kwargs: self._si_call(name, args, kwargs)
        if kind == "value":
            return self._si_module._si_class_value(self._si_class, name)
        if kind == "enum":
            return self._si_module._si_class_value(self._si_class, name)
        raise NotImplementedError(f"stand-in {self._si_class}.{name} ({kind})")

    def __setattr__(self, name: str, value) -> None:
        if name.startswith("_si_"):
            object.__setattr__(self, name, value)
            return
        if type(self).__dict__.get("_si_generated") is None:
            member = self._si_module._si_surface["classes"][self._si_class].get(name)
            if member is None:  # a Python subclass's own attribute
                object.__setattr__(self, name, value)
                return
        member = self._si_member(name)
        if member["kind"] != "property" or not member["writable"]:
            raise AttributeError(f"can't set attribute '{name}' of {self._si_class} (read-only in TensorRT "
                                 f"{self._si_module.__version__})")
        self._si_module.calls.append((f"{self._si_class}.{name}=", (value,)))
        object.__getattribute__(self, "_si_props")[name] = value

    @classmethod
    def _si_lookup(cls, name: str):
        return cls._si_module._si_surface["classes"][cls._si_class].get(name)

    def _si_member(self, name: str) -> Dict:
        member = type(self)._si_lookup(name)
        if member is None:
            raise AttributeError(f"'tensorrt.{self._si_class}' object has no attribute '{name}' (TensorRT "
                                 f"{self._si_module.__version__})")
        return member

    def _si_call(self, name: str, args, kwargs):
        member = self._si_member(name)
        self._si_module._si_check_call(f"{self._si_class}.{name}", member["signatures"], (self,) + tuple(args),
                                       kwargs)
        self._si_module.calls.append((f"{self._si_class}.{name}", tuple(args) + tuple(kwargs.items())))
        implementation = getattr(type(self), f"_si_{name}", None)
        if implementation is None:
            raise NotImplementedError(f"stand-in has no behaviour for {self._si_class}.{name}")
        return implementation(self, *args, **kwargs)


# -- the simulated behaviour --------------------------------------------------------------------

class _ILogger:
    def _si___init__(self):
        return None


class _Builder:
    def _si___init__(self, logger):
        self._si_module._si_factory("Builder", logger)
        self._si_logger = logger

    def _si_create_network(self, flags=0):
        network = self._si_module._si_new("INetworkDefinition")
        network._si_flags = int(flags)
        return network

    def _si_create_builder_config(self):
        config = self._si_module._si_new("IBuilderConfig")
        config._si_profiles = []
        return config

    def _si_create_optimization_profile(self):
        profile = self._si_module._si_new("IOptimizationProfile")
        profile._si_shapes = {}
        return profile

    def _si_build_serialized_network(self, network, config):
        trt = self._si_module
        inputs = getattr(network, "_si_inputs", None)
        if inputs is None:
            raise RuntimeError("build_serialized_network: the network has no layers (nothing parsed)")
        if len(config._si_profiles) != 1:
            return trt._si_error(self._si_logger, f"{len(config._si_profiles)} optimization profiles; expected 1")
        shapes = config._si_profiles[0]._si_shapes
        for name, dims in inputs.items():
            if name not in shapes:
                return trt._si_error(self._si_logger, f"no profile shapes for network input '{name}'")
            low, opt, high = shapes[name]
            for axis, fixed in enumerate(dims):
                if fixed is not None and not low[axis] == opt[axis] == high[axis] == fixed:
                    return trt._si_error(self._si_logger, f"profile of '{name}' disagrees with fixed dim {axis}")
        plan = {"version": trt.__version__, "inputs": {name: shapes[name] for name in inputs},
                "outputs": network._si_outputs, "flags": network._si_flags, "onnx": network._si_onnx,
                "quantized": network._si_quantized, "float16_initializers": network._si_float16,
                "compute": network._si_compute}
        memory = trt._si_new("IHostMemory")
        memory._si_bytes = _PLAN_MAGIC + json.dumps(plan).encode()
        return memory


class _IHostMemory:
    def __bytes__(self) -> bytes:
        return self._si_bytes

    def _si_get_nbytes(self) -> int:
        return len(self._si_bytes)


class _INetworkDefinition:
    def _si_get_num_layers(self) -> int:
        return self._si_num_layers


class _OnnxParser:
    def _si___init__(self, network, logger):
        self._si_network, self._si_errors, self._si_flags = network, [], set()

    def _si_set_flag(self, flag):
        self._si_flags.add(flag.name)

    def _si_parse_from_file(self, model):
        import onnx

        try:
            graph = onnx.load(str(model), load_external_data=False).graph
        except Exception as exc:  # the real parser reports any failure as a parser error
            self._si_errors = [f"cannot read {model}: {exc}"]
            return False
        initializers = {init.name for init in graph.initializer}

        def dims(value):
            return [dim.dim_value if dim.HasField("dim_value") else None for dim in value.type.tensor_type.shape.dim]

        network = self._si_network
        network._si_inputs = {value.name: dims(value) for value in graph.input if value.name not in initializers}
        network._si_outputs = {value.name: dims(value) for value in graph.output}
        network._si_num_layers = len(graph.node)
        network._si_onnx = str(model)
        network._si_quantized = any(node.op_type == "DequantizeLinear" for node in graph.node)
        # What a strongly typed build takes its precision from: the ONNX tensor types.
        network._si_float16 = sum(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.initializer)
        network._si_compute = [[node.op_type, node.name, node.input[0], node.output[0], node.input[1]]
                               for node in graph.node if node.op_type in ("Conv", "ConvTranspose")]
        return True

    def _si_get_num_errors(self) -> int:
        return len(self._si_errors)

    def _si_get_error(self, index):
        return self._si_errors[index]


class _IBuilderConfig:
    def _si_set_memory_pool_limit(self, pool, pool_size):
        return None

    def _si_create_timing_cache(self, serialized_timing_cache):
        cache = self._si_module._si_new("ITimingCache")
        cache._si_data = bytes(serialized_timing_cache) or b"timing-cache"
        return cache

    def _si_set_timing_cache(self, cache, ignore_mismatch):
        self._si_timing_cache = cache
        return True

    def _si_get_timing_cache(self):
        return self._si_timing_cache

    def _si_add_optimization_profile(self, profile):
        self._si_profiles.append(profile)
        return len(self._si_profiles) - 1


class _ITimingCache:
    def _si_serialize(self):
        memory = self._si_module._si_new("IHostMemory")
        memory._si_bytes = self._si_data
        return memory


class _IOptimizationProfile:
    def _si_set_shape(self, input, min, opt, max):
        shapes = [tuple(int(v) for v in shape) for shape in (min, opt, max)]
        if len({len(shape) for shape in shapes}) != 1:
            raise ValueError(f"set_shape('{input}'): min, opt and max have different ranks")
        if not all(lo <= mid <= hi for lo, mid, hi in zip(*shapes)):
            raise ValueError(f"set_shape('{input}'): needs min <= opt <= max in every dim, got {shapes}")
        self._si_shapes[input] = shapes


class _Runtime:
    def _si___init__(self, logger):
        self._si_module._si_factory("Runtime", logger)
        self._si_logger = logger

    def _si_deserialize_cuda_engine(self, serialized_engine):
        trt = self._si_module
        data = bytes(serialized_engine)
        if "deserialize" in trt.failures or not data.startswith(_PLAN_MAGIC):
            return trt._si_error(self._si_logger, trt.failures.get("deserialize", "Serialization assertion "
                                                                     "failed: magic tag does not match"))
        plan = json.loads(data[len(_PLAN_MAGIC):])
        if plan["version"] != trt.__version__:
            return trt._si_error(self._si_logger, f"the plan was built by TensorRT {plan['version']}")
        engine = trt._si_new("ICudaEngine")
        engine._si_plan = plan
        engine._si_names = list(plan["inputs"]) + list(plan["outputs"])
        return engine


class _ICudaEngine:
    def _si_get_num_io_tensors(self) -> int:
        return len(self._si_names)

    def _si_get_tensor_name(self, index):
        return self._si_names[index]

    def _si_get_tensor_mode(self, name):
        modes = self._si_module.TensorIOMode
        if name in self._si_plan["inputs"]:
            return modes.INPUT
        return modes.OUTPUT if name in self._si_plan["outputs"] else modes.NONE

    def _si_get_tensor_dtype(self, name):
        return self._si_module.float32

    def _si_get_tensor_profile_shape(self, name, profile_index):
        if name not in self._si_plan["inputs"] or profile_index != 0:
            return []
        return [self._si_module.Dims(shape) for shape in self._si_plan["inputs"][name]]

    def _si_create_execution_context(self):
        trt = self._si_module
        if "context" in trt.failures:
            return trt._si_error(trt._si_last_logger, trt.failures["context"])
        context = trt._si_new("IExecutionContext")
        context._si_engine, context._si_shapes, context._si_addresses = self, {}, {}
        return context

    def _si_create_engine_inspector(self):
        inspector = self._si_module._si_new("EngineInspector")
        inspector._si_engine = self
        return inspector


class _IExecutionContext:
    def _si_set_input_shape(self, name, shape):
        plan = self._si_engine._si_plan
        if name not in plan["inputs"]:
            return False
        low, _, high = plan["inputs"][name]
        shape = tuple(int(v) for v in shape)
        if len(shape) != len(low) or not all(lo <= v <= hi for lo, v, hi in zip(low, shape, high)):
            return False
        self._si_shapes[name] = shape
        return True

    def _si_get_tensor_shape(self, name):
        plan = self._si_engine._si_plan
        (input_name,) = plan["inputs"]
        if name not in plan["outputs"] or input_name not in self._si_shapes:
            return self._si_module.Dims([-1] * 5)
        batch, _, *spatial = self._si_shapes[input_name]
        return self._si_module.Dims([batch, plan["outputs"][name][1], *spatial])

    def _si_set_tensor_address(self, name, memory):
        if "address" in self._si_module.failures or name not in self._si_engine._si_names:
            return False
        self._si_addresses[name] = int(memory)
        return True

    def _si_execute_async_v3(self, stream_handle):
        plan = self._si_engine._si_plan
        (input_name,) = plan["inputs"]
        if input_name not in self._si_shapes or set(self._si_addresses) != set(self._si_engine._si_names):
            return False
        shape = self._si_shapes[input_name]
        source = _view(self._si_addresses[input_name], shape)
        total = source.sum(axis=1)
        for name, dims in plan["outputs"].items():
            target = _view(self._si_addresses[name], (shape[0], dims[1], *shape[2:]))
            for channel in range(dims[1]):
                target[:, channel] = (channel + 1) * total
        return True


class _EngineInspector:
    def _si_get_engine_information(self, format):
        plan = self._si_engine._si_plan
        eleven = int(self._si_module.__version__.split(".")[0]) >= 11
        layers = [_inspector_layer(node, plan["quantized"], eleven) for node in plan["compute"]]
        document = {"Layers": layers}
        if eleven:
            document["I/O Tensors"] = [{"Name": name, "IOMode": "Input" if name in plan["inputs"] else "Output",
                                        "DataType": "Float"} for name in self._si_engine._si_names]
        else:
            document["Bindings"] = list(self._si_engine._si_names)
        return json.dumps(document)


def _inspector_layer(node, quantized: bool, eleven: bool) -> Dict[str, Any]:
    """One layer of the engine inspector's JSON in the 10.x or 11.x schema (``node``: op, name, x, y, w)."""
    op_type, name, source, target, weight = node
    kind = "Int8" if quantized else "Float"
    deconv = op_type == "ConvTranspose"
    metadata = f"[ONNX Layer: {name}]"
    if eleven:
        return {"Name": f"myl0_{name}", "LayerType": "kgen",
                "Inputs": [{"Name": source, "Datatype": kind, "Format": "kDHWC32"}],
                "Outputs": [{"Name": target, "Datatype": "Float", "Format": "kLINEAR"}],
                "Constants": [{"Name": weight, "Datatype": kind, "Dimensions": [8, 8, 3, 3, 3]}],
                "Metadata": metadata}
    return {"Name": name, "LayerType": "CaskDeconvolutionV2" if deconv else "CaskConvolution",
            "ParameterType": "Deconvolution" if deconv else "Convolution",
            "Inputs": [{"Name": source, "Format/Datatype": f"Row major linear {kind}"}],
            "Outputs": [{"Name": target, "Format/Datatype": "Row major linear FP32"}],
            "Weights": {"Type": kind, "Count": 216}, "Metadata": metadata}


def _view(address: int, shape: Sequence[int]) -> np.ndarray:
    count = int(np.prod(shape))
    return np.ctypeslib.as_array((ctypes.c_float * count).from_address(address)).reshape(shape)


_BEHAVIOURS = {"ILogger": _ILogger, "Builder": _Builder, "IHostMemory": _IHostMemory, "INetworkDefinition": _INetworkDefinition,
               "OnnxParser": _OnnxParser, "IBuilderConfig": _IBuilderConfig, "ITimingCache": _ITimingCache,
               "IOptimizationProfile": _IOptimizationProfile, "Runtime": _Runtime, "ICudaEngine": _ICudaEngine,
               "IExecutionContext": _IExecutionContext, "EngineInspector": _EngineInspector}


# -- the module ---------------------------------------------------------------------------------

class StandInTensorRT(types.ModuleType):
    """The ``tensorrt`` module of one release (see the module docstring)."""

    def __init__(self, release: str) -> None:
        super().__init__("tensorrt")
        surface = surfaces()[release]
        object.__setattr__(self, "_si_surface", surface)
        object.__setattr__(self, "_si_release", release)
        object.__setattr__(self, "__version__", surface["version"])
        object.__setattr__(self, "calls", [])
        object.__setattr__(self, "failures", {})
        object.__setattr__(self, "_si_cache", {})
        object.__setattr__(self, "_si_last_logger", None)

    def __getattr__(self, name: str):
        cache = self.__dict__["_si_cache"]
        if name in cache:
            return cache[name]
        surface = self.__dict__["_si_surface"]
        kind = surface["module"].get(name)
        if kind is None:
            raise AttributeError(f"module 'tensorrt' has no attribute '{name}' (TensorRT {self.__version__})")
        if kind == "enum":
            value = StandInEnum(name, surface["enums"][name])
        elif kind == "class":
            value = self._si_make_class(name)
        elif kind.startswith("enum value "):
            enum, member = kind[len("enum value "):].split(".")
            value = getattr(getattr(self, enum), member)
        else:
            raise NotImplementedError(f"stand-in tensorrt.{name} ({kind})")
        cache[name] = value
        return value

    def _si_make_class(self, name: str):
        if name == "Dims":
            return _dims_class(self)
        bases = (_BEHAVIOURS[name],) if name in _BEHAVIOURS else ()
        return _StandInType(name, bases + (StandInObject,),
                            {"_si_generated": True, "_si_class": name, "_si_module": self})

    def _si_class_value(self, class_name: str, name: str):
        member = self._si_surface["classes"][class_name][name]
        if member["kind"] == "enum":
            return StandInEnum(f"{class_name}.{name}", member["members"])
        enum_owner = next((cls for cls, members in self._si_surface["classes"].items()
                           if members.get(member["type"], {}).get("kind") == "enum"), None)
        enum = self._si_class_value(enum_owner, member["type"]) if enum_owner else getattr(self, member["type"])
        return getattr(enum, member["name"])

    def _si_new(self, name: str):
        """An object of class ``name`` as TensorRT returns it (no constructor call recorded)."""
        cls = getattr(self, name)
        instance = object.__new__(cls)
        object.__setattr__(instance, "_si_props", {})
        return instance

    def _si_factory(self, name: str, logger) -> None:
        """Fail like pybind11 when the factory returns nullptr, after logging TensorRT's reason."""
        object.__setattr__(self, "_si_last_logger", logger)
        if name in self.failures:
            logger.log(self.ILogger.ERROR, self.failures[name])
            raise TypeError("pybind11::init(): factory function returned nullptr")

    def _si_error(self, logger, message: str):
        if logger is not None:
            logger.log(self.ILogger.ERROR, message)
        return None

    def _si_check_call(self, what: str, signatures: List[str], args, kwargs) -> None:
        problems = []
        for line in signatures or [""]:
            signature, annotations, _ = _parse(line)
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError as exc:
                problems.append(f"{line}: {exc}")
                continue
            wrong = [f"{key}={value!r} is not {annotations[key]}" for key, value in bound.arguments.items()
                     if key in annotations and key != "self" and not self._si_accepts(annotations[key], value)]
            if not wrong:
                return
            problems.append(f"{line}: {'; '.join(wrong)}")
        raise TypeError(f"{what}(): incompatible function arguments (TensorRT {self.__version__}): "
                        + " | ".join(problems))

    def _si_accepts(self, annotation: str, value) -> bool:
        if annotation in ("int", "typing.SupportsInt"):
            return isinstance(value, (int, np.integer, StandInEnumMember)) and not isinstance(value, bool)
        if annotation in ("float", "typing.SupportsFloat"):
            return isinstance(value, (int, float, np.number))
        if annotation == "str":
            return isinstance(value, str)
        if annotation == "bool":
            return isinstance(value, (bool, np.bool_))
        if annotation == "Dims":
            return isinstance(value, (list, tuple)) and all(isinstance(v, (int, np.integer)) for v in value)
        if annotation in ("buffer", "typing_extensions.Buffer", "collections.abc.Buffer"):
            return isinstance(value, (bytes, bytearray, memoryview))
        kind = self._si_surface["module"].get(annotation)
        if kind == "class":
            return isinstance(value, getattr(self, annotation))
        if kind == "enum":
            return isinstance(value, StandInEnumMember) and value.enum == annotation
        if "." in annotation and annotation.split(".")[0] in self._si_surface["classes"]:
            return isinstance(value, StandInEnumMember) and value.enum == annotation
        return True


def _dims_class(trt):
    class Dims(tuple):
        """``trt.Dims``: a tuple of ints here."""

    return Dims


def standin(release: str) -> StandInTensorRT:
    return StandInTensorRT(release)


class HostMemory:
    """Device memory stand-in for the runtime: numpy arrays, their host addresses as device pointers."""

    name = "host"

    def __init__(self, device: int = 0) -> None:
        self.events: List[str] = []

    def identity(self) -> Tuple[str, str]:
        return "Stand-in GPU", "8.9"

    @contextmanager
    def current(self):
        yield

    @property
    def stream_handle(self) -> int:
        return 7

    def upload(self, array: np.ndarray) -> np.ndarray:
        return np.array(array, copy=True, order="C")

    def empty(self, shape, dtype) -> np.ndarray:
        return np.full(tuple(shape), np.nan, dtype=dtype)

    def address(self, buffer: np.ndarray) -> int:
        return int(buffer.ctypes.data)

    def download(self, buffer: np.ndarray) -> np.ndarray:
        return np.array(buffer, copy=True)

    def synchronize(self) -> None:
        return None

    def timed(self, work, repeats: int) -> list:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            work()
            times.append((time.perf_counter() - started) * 1e3)
        return times
