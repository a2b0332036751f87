"""FP32 ONNX export of a network, verified against PyTorch.

Every model source (TorchScript, MONAI ``nn.Module``, later others) meets
the quantizer as one FP32 ONNX file with a single 5-D input
``(B, C, D, H, W)``. A user-supplied ONNX file is checked with
:func:`onnx_input_spec` instead.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from .atomic import replacing
from .errors import PTQError

INPUT_NAME = "input"
OUTPUT_NAME = "output"


@dataclass(frozen=True)
class OnnxInputSpec:
    """The single image input of an ONNX segmentation network.

    ``shape`` holds an int for a fixed dim and a string (symbolic name) or
    None for a dynamic one, in ``(B, C, D, H, W)`` order.
    """

    name: str
    shape: Tuple[Union[int, str, None], ...]

    @property
    def channels(self) -> Optional[int]:
        """Input channels, or None when the file leaves them dynamic."""
        return self.shape[1] if isinstance(self.shape[1], int) else None

    @property
    def dynamic_spatial(self) -> bool:
        """True when every spatial dim (D, H, W) is dynamic."""
        return all(not isinstance(dim, int) for dim in self.shape[2:])

    @property
    def static_spatial(self) -> Optional[Tuple[int, int, int]]:
        """The fixed (D, H, W) the file demands, or None if any is dynamic."""
        dims = self.shape[2:]
        if all(isinstance(dim, int) for dim in dims):
            return tuple(dims)  # type: ignore[return-value]
        return None


def onnx_input_spec(path: Path, expected_channels: Optional[int] = None) -> OnnxInputSpec:
    """Read the image input of the ONNX file at ``path`` and check it.

    Raises PTQError when the file is unreadable, has other than one 5-D
    input, or its channel count differs from ``expected_channels``.
    """
    import onnx

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ...
        raise PTQError(f"Cannot read ONNX model {path}: {exc}. Check the path and that "
                       "the file is a complete .onnx export.") from exc
    initializers = {tensor.name for tensor in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in initializers]
    if len(inputs) != 1:
        raise PTQError(f"ONNX model {path} has {len(inputs)} inputs "
                       f"({[value.name for value in inputs]}); a segmentation network "
                       "needs exactly one image input (B, C, D, H, W). Re-export it with one input.")
    value = inputs[0]
    dims = value.type.tensor_type.shape.dim
    shape = tuple(dim.dim_value if dim.HasField("dim_value")
                  else (dim.dim_param or None) for dim in dims)
    if len(shape) != 5:
        raise PTQError(f"ONNX model {path} input {value.name!r} has shape {shape}; "
                       "a 3D segmentation network needs 5 dims (B, C, D, H, W).")
    spec = OnnxInputSpec(name=value.name, shape=shape)
    if expected_channels is not None and spec.channels is not None \
            and spec.channels != expected_channels:
        raise PTQError(f"ONNX model {path} expects {spec.channels} input channel(s) but the "
                       f"model metadata says {expected_channels}; fix in_channels in the "
                       "model's .json sidecar (or pick the matching model file).")
    return spec


def export_onnx(module, path: Path, in_channels: int,
                example_shape: Optional[Sequence[int]] = None,
                dynamic_spatial: bool = True, opset: int = 17,
                tolerance: float = 1e-3, spatial_multiple: Optional[int] = None) -> Path:
    """Export ``module`` (``nn.Module`` or TorchScript) to an FP32 ONNX file.

    The input is named ``"input"`` with shape ``example_shape`` (default
    ``(1, in_channels, 96, 96, 96)``); batch and, with ``dynamic_spatial``,
    D/H/W are dynamic. The file is checked with ``onnx.checker`` and run
    once in ONNX Runtime: the largest output difference to PyTorch must
    stay within ``tolerance * max(1, max|torch output|)``. With dynamic dims
    a second, wider input is compared too, which catches networks that
    bake their shape in (SwinUNETR's window masks). The wider input adds
    the smallest multiple of ``spatial_multiple`` (the spec's size rule)
    of at least 32 voxels to the width, and a network that rejects it
    breaks its own rule (PTQError); without ``spatial_multiple`` 32 voxels
    are added and a size the network rejects skips that comparison.
    Written atomically.
    """
    path = Path(path)
    shape = tuple(int(v) for v in (example_shape or (1, in_channels, 96, 96, 96)))
    if len(shape) != 5 or shape[1] != in_channels:
        raise PTQError(f"Example shape {shape} must be (B, {in_channels}, D, H, W) "
                       f"for a network with {in_channels} input channel(s).")
    module = module.eval()
    example = _example_input(shape)
    reference = _torch_outputs(module, example)
    output_names = [OUTPUT_NAME] + [f"{OUTPUT_NAME}_{i}" for i in range(1, len(reference))]
    dynamic_axes = None
    if dynamic_spatial:
        axes = {0: "batch", 2: "depth", 3: "height", 4: "width"}
        dynamic_axes = {INPUT_NAME: axes, **{name: axes for name in output_names}}

    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path, suffix=".onnx") as tmp:
        _export(module, example, tmp, output_names, dynamic_axes, opset)
        _check(tmp)
        _compare(tmp, example, reference, tolerance, what=f"the example input {shape}")
        if dynamic_spatial:
            step = 32 if not spatial_multiple else spatial_multiple * -(-32 // spatial_multiple)
            wider = shape[:4] + (shape[4] + step,)
            wider_input = _example_input(wider)
            try:
                wider_reference = _torch_outputs(module, wider_input)
            except PTQError as exc:
                if spatial_multiple:
                    raise PTQError(f"The network rejects input size {wider} although its metadata says any "
                                   f"multiple of spatial_multiple {spatial_multiple} fits ({exc}); fix "
                                   "spatial_multiple, or set dynamic_spatial to false.") from exc
                wider_reference = None  # no size rule given: the network itself rejects that size
            if wider_reference is not None:
                _compare(tmp, wider_input, wider_reference, tolerance,
                         what=f"a second input size {wider}",
                         fix="the network bakes its input shape into the graph; export "
                             "with dynamic_spatial=False (a fixed patch size)")
    return path


def _example_input(shape: Sequence[int]):
    import torch

    generator = torch.Generator().manual_seed(0)
    return torch.randn(*shape, generator=generator)


def _torch_outputs(module, example) -> list:
    """The module's outputs on ``example`` as numpy arrays (tuples flattened)."""
    import torch

    try:
        with torch.no_grad():
            outputs = module(example)
    except Exception as exc:
        raise PTQError(f"The PyTorch model failed on an input of shape {tuple(example.shape)}: "
                       f"{exc}. Check in_channels and that the patch size suits the "
                       "network (e.g. a multiple of 32 for 5 downsamplings).") from exc
    if isinstance(outputs, torch.Tensor):
        outputs = [outputs]
    elif isinstance(outputs, dict):
        outputs = list(outputs.values())
    return [output.detach().cpu().numpy() for output in outputs]


def _export(module, example, path: Path, output_names, dynamic_axes, opset: int) -> None:
    """TorchScript goes through the TorchScript exporter; it also serves every
    MONAI CNN tested (UNet, SegResNet, BasicUNet, DynUNet, SwinUNETR). A plain
    ``nn.Module`` that it cannot export gets a second try with dynamo."""
    import torch

    common = dict(input_names=[INPUT_NAME], output_names=output_names, opset_version=opset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, (example,), str(path), dynamo=False,
                              dynamic_axes=dynamic_axes, **common)
            return
        except Exception as exc:
            if isinstance(module, torch.jit.ScriptModule):
                raise PTQError(f"ONNX export of the TorchScript model failed: {exc}. "
                               "Export it to ONNX yourself and pass the .onnx file.") from exc
            legacy_error = exc
        dynamic_shapes = None
        if dynamic_axes is not None:
            dim = torch.export.Dim.AUTO
            dynamic_shapes = ({0: dim, 2: dim, 3: dim, 4: dim},)
        try:
            program = torch.onnx.export(module, (example,), dynamo=True,
                                        dynamic_shapes=dynamic_shapes, **common)
            program.save(str(path))
        except Exception as exc:
            raise PTQError(f"ONNX export failed with both exporters (TorchScript: "
                           f"{legacy_error}; dynamo: {exc}). Export the model to ONNX "
                           "yourself and pass the .onnx file.") from exc


def _check(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise PTQError(f"The exported ONNX graph is invalid: {exc}. Try another opset.") from exc


def _compare(path: Path, example, reference: list, tolerance: float, what: str,
             fix: str = "report the model; an operator exports wrongly") -> None:
    """Run the ONNX file on ``example`` in ONNX Runtime and compare to PyTorch."""
    import onnxruntime as ort

    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # the failure is reported in the PTQError
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        outputs = session.run(None, {INPUT_NAME: example.numpy()})
    except Exception as exc:
        raise PTQError(f"The exported ONNX model does not run on {what}: {exc}; {fix}.") from exc
    for index, (ours, theirs) in enumerate(zip(outputs, reference)):
        if ours.shape != theirs.shape:
            raise PTQError(f"ONNX output {index} has shape {ours.shape} but PyTorch gives "
                           f"{theirs.shape} on {what}; {fix}.")
        difference = float(np.max(np.abs(ours - theirs))) if ours.size else 0.0
        limit = tolerance * max(1.0, float(np.max(np.abs(theirs))) if theirs.size else 1.0)
        if not difference <= limit:
            raise PTQError(f"ONNX output {index} differs from PyTorch by up to {difference:.3g} "
                           f"(allowed {limit:.3g}) on {what}; {fix}.")
