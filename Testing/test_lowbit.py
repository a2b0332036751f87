"""Low-bit weights: grids, attention, im2col layouts, the solver on a real layer, packing, end to end."""

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from SlicerPTQLib import lowbit
from SlicerPTQLib.errors import PTQError
from SlicerPTQLib.lowbit.admm import solve_admm, solve_rtn
from SlicerPTQLib.lowbit.attention import class_weights, pool_to, voxel_weights
from SlicerPTQLib.lowbit.features import LayerMatrix
from SlicerPTQLib.lowbit.graph import boundary_layers, find_layers
from SlicerPTQLib.lowbit.grid import fit_scale, level_limit, project
from SlicerPTQLib.lowbit.packing import pack_bits, unpack_bits
from SlicerPTQLib.lowbit.runner import IncrementalRunner
from SlicerPTQLib.onnx_graph import cpu_session
from SlicerPTQLib.qdq import quantize_onnx


def export(module, path: Path, shape) -> Path:
    module.eval()
    torch.onnx.export(module, torch.zeros(shape), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["output"])
    return path


def real_input(seed: int, shape) -> np.ndarray:
    """A smooth positive image (random fields are a poor stand-in for conv inputs)."""
    rng = np.random.default_rng(seed)
    field = rng.standard_normal(shape).astype(np.float32)
    volumes = torch.from_numpy(field.reshape((-1,) + tuple(shape[-3:])))
    smooth = torch.nn.functional.avg_pool3d(volumes, 5, 1, 2).numpy().reshape(shape)
    return np.abs(smooth) * 3.0


class LayoutNet(torch.nn.Module):
    """Conv geometry a solver must get right: stride, padding, dilation, groups, transposed, linear."""

    def __init__(self):
        super().__init__()
        # Fixed weights: an unlucky draw can leave a ReLU layer all zero, and a layer with no
        # signal has no error to compare.
        torch.manual_seed(0)
        self.strided = torch.nn.Conv3d(2, 8, 3, stride=2, padding=1)
        self.dilated = torch.nn.Conv3d(8, 8, 3, padding=2, dilation=2, bias=False)
        self.grouped = torch.nn.Conv3d(8, 8, 3, padding=1, groups=2)
        self.up = torch.nn.ConvTranspose3d(8, 4, 3, stride=2, padding=1, output_padding=1)
        self.up_even = torch.nn.ConvTranspose3d(4, 3, 2, stride=2)
        self.head = torch.nn.Linear(3, 5)

    def forward(self, x):
        x = torch.relu(self.strided(x))
        x = torch.relu(self.dilated(x))
        x = torch.relu(self.grouped(x))
        x = torch.relu(self.up(x))
        x = self.up_even(x)
        return self.head(x.permute(0, 2, 3, 4, 1))


class TinySegNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = torch.nn.Conv3d(1, 8, 3, padding=1)
        self.down = torch.nn.Conv3d(8, 16, 3, stride=2, padding=1)
        self.mid = torch.nn.Conv3d(16, 16, 3, padding=1)
        self.up = torch.nn.ConvTranspose3d(16, 8, 2, stride=2)
        self.out = torch.nn.Conv3d(8, 2, 1)

    def forward(self, x):
        skip = torch.relu(self.enc(x))
        x = torch.relu(self.down(skip))
        x = torch.relu(self.mid(x))
        x = torch.relu(self.up(x)) + skip
        return torch.softmax(self.out(x), dim=1)


# Grids ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fitted_and_projected_weights_lie_on_the_grid(bits):
    limit = level_limit(bits)
    values = torch.randn(6, 300) * torch.linspace(0.01, 2.0, 6)[:, None]
    scale, q = fit_scale(values, bits)
    assert torch.equal(q, q.round()) and q.abs().max() <= limit and (scale > 0).all()
    # The fitted scale beats plain max-abs scaling on squared error.
    max_scale = values.abs().amax(dim=1) / limit
    max_q = torch.clamp(torch.round(values / max_scale[:, None]), -limit, limit)
    fitted_error = ((values - scale[:, None] * q) ** 2).sum()
    assert fitted_error <= ((values - max_scale[:, None] * max_q) ** 2).sum() + 1e-6
    new_scale, new_q = project(values * 1.3, scale, bits)
    assert torch.equal(new_q, new_q.round()) and new_q.abs().max() <= limit and (new_scale > 0).all()


def test_grid_limits_and_bad_bits():
    assert [level_limit(b) for b in (2, 3, 4, 8)] == [1, 3, 7, 127]
    with pytest.raises(PTQError, match="Weight bits"):
        level_limit(1)


# Attention --------------------------------------------------------------------------------------

def test_attention_weights_follow_the_formula():
    # 2 classes on 4x4x4: background 56 voxels, foreground 8 (a 2x2x2 corner).
    prediction = np.zeros((1, 2, 4, 4, 4), np.float32)
    prediction[0, 0] = 0.9
    prediction[0, 1, :2, :2, :2] = 1.0
    weights = voxel_weights(prediction)
    assert weights.shape == (1, 4, 4, 4)
    assert np.allclose(weights[0, :2, :2, :2], np.sqrt(56 / 8)) and np.allclose(weights[0, 2:, 2:, 2:], 1.0)
    assert class_weights(np.array([0] * 90 + [1] * 10 + [2] * 40)) == pytest.approx(
        {0: 1.0, 1: 3.0, 2: np.sqrt(90 / 40)})
    # Average pooling to a coarser layer: the corner 2x2x2 block becomes one voxel.
    pooled = pool_to(torch.from_numpy(weights), (2, 2, 2))
    assert pooled[0, 0, 0, 0] == pytest.approx(np.sqrt(7.0)) and pooled[0, 1, 1, 1] == pytest.approx(1.0)
    assert pooled.mean() == pytest.approx(weights.mean())


# Layouts ----------------------------------------------------------------------------------------

def test_layer_equations_reproduce_fp32_outputs(tmp_path):
    """With the FP32 input, the FP32 weights give zero output error for every layer kind."""
    model = onnx.load(str(export(LayoutNet(), tmp_path / "layout.onnx", (1, 2, 8, 8, 8))))
    layers, _ = find_layers(model)
    assert [layer.op_type for layer in layers] == ["Conv", "Conv", "Conv", "ConvTranspose", "ConvTranspose", "MatMul"]
    runner = IncrementalRunner(model, {"input": real_input(0, (1, 2, 8, 8, 8))})
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for layer in layers:
        x, y = runner.compute([layer.input, layer.output])
        matrix = LayerMatrix(layer)
        weight = initializers[layer.weight]
        rows = matrix.to_rows(weight)
        assert np.array_equal(matrix.from_rows(rows), weight)
        equations = matrix.equations(x, y, None, torch.device("cpu"))
        assert len(equations) == layer.groups
        for group, eq in enumerate(equations):
            part = torch.from_numpy(rows[matrix.group_rows(group)].astype(np.float32))
            relative = float(eq.weighted_error(part).sum() / eq.target_energy.sum())
            assert relative < 1e-5, layer.name


def test_batchnorm_after_conv_is_folded(tmp_path):
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((4, 2, 3, 3, 3)).astype(np.float32)
    bn = [rng.uniform(0.5, 2, 4), rng.standard_normal(4), rng.standard_normal(4), rng.uniform(0.5, 2, 4)]
    bn[0][1] = -bn[0][1]  # a negative gain flips the grid integers
    names = ["gamma", "beta", "mean", "var"]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["conv"], name="conv", pads=[1] * 6),
         helper.make_node("BatchNormalization", ["conv"] + names, ["bn"], name="bn"),
         helper.make_node("Relu", ["bn"], ["output"], name="relu")], "bn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 2, 6, 6, 6])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 6, 6, 6])],
        [numpy_helper.from_array(weight, "w")]
        + [numpy_helper.from_array(a.astype(np.float32), n) for a, n in zip(bn, names)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    layers, _ = find_layers(model)
    assert layers[0].folded == "bn" and layers[0].output == "bn"
    runner = IncrementalRunner(model, {"input": real_input(1, (1, 2, 6, 6, 6))})
    x, y = runner.compute(["input", "bn"])
    matrix = LayerMatrix(layers[0])
    (eq,) = matrix.equations(x, y, None, torch.device("cpu"))
    effective = torch.from_numpy(matrix.to_rows(weight) * layers[0].gain[:, None]).float()
    assert float(eq.weighted_error(effective).sum() / eq.target_energy.sum()) < 1e-5
    path = tmp_path / "bn.onnx"
    onnx.save(model, str(path))
    result = lowbit.quantize_weights(path, x[0], 4, iterations=20, keep_first_last_8bit=False)
    q, scales = result.weight_quant["w"]
    assert np.abs(q).max() <= 7 and (scales > 0).all() and q.shape == weight.shape


# The solver on a real layer ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def shipped_onnx(shipped_model_path, tmp_path_factory) -> Path:
    module = torch.jit.load(str(shipped_model_path))
    return export(module, tmp_path_factory.mktemp("lowbit") / "bbox.onnx", (1, 1, 64, 64, 64))


@pytest.fixture(scope="module")
def real_crop(calibration_paths) -> np.ndarray:
    from SlicerPTQLib.preprocess import prepare
    from SlicerPTQLib.shipped import SHIPPED_SPEC
    from SlicerPTQLib.volumes import read_volume

    image, _ = prepare(read_volume(calibration_paths[0]), SHIPPED_SPEC)
    return np.ascontiguousarray(image[:, 32:96, 32:96, 32:96])


@pytest.mark.parametrize("bits", [4, 2])
def test_admm_beats_round_to_nearest_on_a_real_layer(shipped_onnx, real_crop, bits):
    model = onnx.load(str(shipped_onnx))
    layers, _ = find_layers(model)
    layer = next(item for item in layers if item.name == "/down1/block1/double_conv/3/Conv")
    runner = IncrementalRunner(model, {"input": real_crop[None]})
    (x, y, prediction) = runner.compute([layer.input, layer.output, "output"])
    weights = pool_to(torch.from_numpy(voxel_weights(prediction)), y.shape[2:])
    matrix = LayerMatrix(layer)
    (eq,) = matrix.equations(x, y, weights, torch.device("cpu"))
    initializer = next(t for t in model.graph.initializer if t.name == layer.weight)
    w0 = torch.from_numpy(matrix.to_rows(np.array(numpy_helper.to_array(initializer)))).float()
    rtn = solve_rtn(eq, w0, bits)
    solved = solve_admm(eq, w0, bits, rtn, iterations=100)
    assert solved.error < 0.6 * rtn.error
    assert torch.equal(solved.q, solved.q.round()) and solved.q.abs().max() <= level_limit(bits)
    recomputed = float(eq.weighted_error(solved.scale[:, None] * solved.q).sum())
    assert recomputed == pytest.approx(solved.error, rel=1e-3)


# Packing ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_round_trips_exactly(bits):
    limit = level_limit(bits)
    q = np.random.default_rng(bits).integers(-limit, limit + 1, size=(7, 3, 3, 3, 5)).astype(np.int8)
    stream = pack_bits(q, bits)
    assert stream.nbytes == -(-q.size * bits // 8)
    assert np.array_equal(unpack_bits(stream, bits, q.size).reshape(q.shape), q)
    outside = -128 if bits == 8 else limit + 1
    with pytest.raises(ValueError):
        pack_bits(np.full(3, outside, np.int8), bits)


def test_packed_file_is_small_and_reloads_identically(tmp_path):
    path = export(TinySegNet(), tmp_path / "tiny.onnx", (1, 1, 16, 16, 16))
    sample = real_input(3, (1, 16, 16, 16))
    result = lowbit.quantize_weights(path, sample, 2, iterations=30)
    packed = lowbit.save_packed(tmp_path / "tiny.packed.npz", result)
    reloaded = lowbit.read_packed(packed)
    assert reloaded.weight_quant.keys() == result.weight_quant.keys()
    for name, (q, scales) in result.weight_quant.items():
        assert np.array_equal(reloaded.weight_quant[name][0], q)
        assert np.array_equal(reloaded.weight_quant[name][1], scales)
        assert reloaded.bits[name] == result.bits[name]
    stored = sum(np.load(packed)[f"q{i}"].nbytes for i in range(len(result.weight_quant)))
    expected = sum(-(-q.size * result.bits[n] // 8) for n, (q, _) in result.weight_quant.items())
    assert stored == expected
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(PTQError, match="broken.npz"):
        lowbit.load_packed(tmp_path / "broken.npz")


# End to end -------------------------------------------------------------------------------------

def test_quantize_weights_feeds_the_qdq_writer(tmp_path):
    path = export(TinySegNet(), tmp_path / "tiny.onnx", (1, 1, 16, 16, 16))
    sample = real_input(4, (1, 16, 16, 16))
    calls = []
    result = lowbit.quantize_weights(path, sample, 4, iterations=40,
                                     progress_callback=lambda *a: calls.append(a))
    model = onnx.load(str(path))
    layers, _ = find_layers(model)
    boundary = boundary_layers(model, layers)
    assert boundary == {layers[0].name, layers[-1].name}
    assert set(result.weight_quant) == {layer.weight for layer in layers}
    for layer, report in zip(layers, result.layers):
        q, scales = result.weight_quant[layer.weight]
        assert q.dtype == np.int8 and scales.shape == (q.shape[layer.out_axis],)
        assert np.abs(q).max() <= (127 if layer.name in boundary else 7)
        assert report.admm_error <= report.rtn_error * (1 + 1e-4)
    assert calls[-1][1:] == (len(layers), len(layers))
    assert len(result.table().splitlines()) == len(layers) + 1
    out = tmp_path / "tiny.w4a8.onnx"
    quantize_onnx(path, out, [sample], weight_quant=result.weight_quant)
    probabilities = cpu_session(out).run(None, {"input": sample[None]})[0]
    assert probabilities.shape == (1, 2, 16, 16, 16) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-4)


def test_lowbit_file_runs_on_openvino_int8_kernels_as_simulated(tmp_path):
    """The W4A8 file's 4-bit layers run OpenVINO's INT8 kernels and give the simulated model's output.

    The simulation is ONNX Runtime on the graph OpenVINO runs on this CPU
    (without int8 dot products, the 8-bit first and last layers rescaled so
    their int16 pair sums cannot overflow, and the transposed convolution
    reading float).
    """
    from SlicerPTQLib.int8_compat import as_run_here, path_here
    from SlicerPTQLib.runtimes import create_runtime

    path = export(TinySegNet(), tmp_path / "tiny.onnx", (1, 1, 16, 16, 16))
    sample = real_input(4, (1, 16, 16, 16))
    result = lowbit.quantize_weights(path, sample, 4, iterations=40)
    out = tmp_path / "tiny.w4a8.onnx"
    quantize_onnx(path, out, [sample], weight_quant=result.weight_quant)
    simulated = create_runtime(as_run_here(out, tmp_path), "onnxruntime")
    openvino = create_runtime(out, "openvino")
    patch = real_input(11, (1, 1, 16, 16, 16))
    expected, output = simulated.predict(patch), openvino.predict(patch)
    # Probabilities differ only where a float sum rounds one activation to
    # the neighbouring level (measured: 2.4e-4 at most); labels stay put.
    assert np.abs(output - expected).max() < 5e-3
    assert (output.argmax(axis=1) == expected.argmax(axis=1)).mean() >= 0.999
    layers = [layer for layer in openvino.layer_precisions() if layer["type"] in ("Convolution", "Deconvolution")]
    # The first and last layers keep 8-bit weights; OpenVINO names the transposed conv itself, which
    # reads float without VNNI (int8_compat: OpenVINO's int8 one is no faster there).
    four_bit = [layer for layer in layers if layer["name"].startswith(("/down/", "/mid/"))
                or (layer["type"] == "Deconvolution" and not path_here().float_deconvolution_inputs)]
    expected = 2 if path_here().float_deconvolution_inputs else 3
    assert len(four_bit) == expected and all(layer["precision"] in ("int8", "uint8") for layer in four_bit), layers


def test_keep_float_and_simulated_4bit_activations(tmp_path):
    path = export(TinySegNet(), tmp_path / "tiny.onnx", (1, 1, 16, 16, 16))
    model = onnx.load(str(path))
    layers, _ = find_layers(model)
    sample = real_input(7, (1, 16, 16, 16))
    result = lowbit.quantize_weights(path, sample, 3, iterations=10, activation_bits=4,
                                     keep_float=[layers[2].node_name])
    assert layers[2].weight not in result.weight_quant and len(result.weight_quant) == len(layers) - 1
    assert "simulated" in result.summary()["activations"]
    middle = result.weight_quant[layers[1].weight][0]
    assert np.abs(middle).max() <= 3


def test_bad_arguments_are_user_errors(tmp_path):
    path = export(TinySegNet(), tmp_path / "tiny.onnx", (1, 1, 16, 16, 16))
    sample = real_input(5, (1, 16, 16, 16))
    with pytest.raises(PTQError, match="solver"):
        lowbit.quantize_weights(path, sample, 4, solver="gptq")
    with pytest.raises(PTQError, match="Weight bits"):
        lowbit.quantize_weights(path, sample, 1)
    with pytest.raises(PTQError, match="shape"):
        lowbit.quantize_weights(path, sample[0], 4)
    with pytest.raises(PTQError, match="not in the model"):
        lowbit.quantize_weights(path, sample, 4, activation_ranges={"nope": 1.0})
    (tmp_path / "bad.onnx").write_bytes(b"junk")
    with pytest.raises(PTQError, match="bad.onnx"):
        lowbit.quantize_weights(tmp_path / "bad.onnx", sample, 4)


def test_runner_matches_a_full_run_and_guards_late_weight_changes(tmp_path):
    path = export(TinySegNet(), tmp_path / "tiny.onnx", (1, 1, 16, 16, 16))
    model = onnx.load(str(path))
    layers, _ = find_layers(model)
    sample = real_input(6, (1, 1, 16, 16, 16))
    runner = IncrementalRunner(model, {"input": sample})
    (first,) = runner.compute([layers[1].input])
    (output,) = runner.compute(["output"])
    reference = cpu_session(path).run(None, {"input": sample})[0]
    assert np.allclose(output, reference, atol=1e-5)
    with pytest.raises(RuntimeError):
        runner.set_initializer(layers[0].weight, np.zeros(layers[0].weight_shape, np.float32))


@pytest.mark.slow
def test_w4a8_admm_keeps_dice_on_the_shipped_model(shipped_model_path, calibration_paths, evaluation_cases,
                                                   tmp_path):
    """Full size: W4A8 with the solver within 0.01 Dice of FP32; OpenVINO's INT8 kernels agree
    with the simulated model as well as they do on the plain INT8 model.

    (Float sums that differ in the last bit flip a few activation roundings,
    and the flips spread: the plain INT8 model agrees with itself on another
    thread count, or on an image with 1e-5 noise, only to ~0.9988 Dice; see
    benchmarks/README.md. So the low-bit model is held to the INT8 model's
    agreement, not to 1.)
    """
    from SlicerPTQLib.calibration import collect_ranges
    from SlicerPTQLib.inference import segment_volume
    from SlicerPTQLib.metrics import dice
    from SlicerPTQLib.preprocess import prepare
    from SlicerPTQLib.qdq import PLACEMENTS, choose_activation_tensors
    from SlicerPTQLib.runtimes import create_runtime
    from SlicerPTQLib.shipped import SHIPPED_SPEC, reference_mask
    from SlicerPTQLib.volumes import read_volume

    fp32 = export(torch.jit.load(str(shipped_model_path)), tmp_path / "model.fp32.onnx", (1, 1, 128, 128, 128))
    sample, _ = prepare(read_volume(calibration_paths[0]), SHIPPED_SPEC)
    ranges = collect_ranges(fp32, choose_activation_tensors(onnx.load(str(fp32)), PLACEMENTS["cpu"]), [sample])
    result = lowbit.quantize_weights(fp32, sample, 4, activation_ranges=ranges)
    lowbit_model, int8_model = tmp_path / "model.w4a8.onnx", tmp_path / "model.int8.onnx"
    quantize_onnx(fp32, lowbit_model, ranges, weight_quant=result.weight_quant)
    quantize_onnx(fp32, int8_model, ranges)
    name, image, mask = evaluation_cases[0]
    volume = read_volume(image)

    def labels(model, backend):
        runtime = create_runtime(model, backend)
        try:
            return segment_volume(runtime, volume, SHIPPED_SPEC)[0].array.astype(np.int64)
        finally:
            runtime.close()

    def brain(a, b):
        return dice(a, b, [1])[1]

    fp32_labels = labels(fp32, "onnxruntime")
    lowbit_openvino = labels(lowbit_model, "openvino")
    reference = reference_mask(mask).array.astype(np.int64)
    assert brain(lowbit_openvino, reference) >= brain(fp32_labels, reference) - 0.01
    int8_agreement = brain(labels(int8_model, "openvino"), labels(int8_model, "onnxruntime"))
    lowbit_agreement = brain(lowbit_openvino, labels(lowbit_model, "onnxruntime"))
    assert lowbit_agreement >= min(0.999, int8_agreement - 0.0005)
