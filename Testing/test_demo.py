"""The demo's headline: INT8 against the same runtime's FP32, said plainly when it is not faster."""

from SlicerPTQLib.demo import render


def _summary(int8_s: float) -> dict:
    return {
        "cpu": {"description": "test CPU, int8: AVX2 without VNNI"},
        "models": {"fp32_onnx": "/out/model.fp32.onnx", "quantized_onnx": "/out/model.int8.onnx"},
        "size_mb": {"fp32_onnx": 8.0, "quantized_onnx": 2.0},
        "size_ratio_int8_vs_fp32_onnx": 0.25,
        "patch_latency": [{"backend": "PyTorch eager FP32", "median_s": 0.5, "p90_s": 0.6},
                          {"backend": "OpenVINO FP32", "median_s": 0.125, "p90_s": 0.13},
                          {"backend": "OpenVINO INT8", "median_s": int8_s, "p90_s": int8_s,
                           "int8_layers": {"conv_int8": 34, "conv_total": 35}}],
        "self_check": "self-check passed: ...",
        "calibration_method": {"requested": "auto", "chosen": "percentile",
                               "reason": "best label agreement with FP32 on the 4 whole calibration volume(s)"},
        "volumes": [{"volume": "mni152", "dice_quantized_vs_fp32": 0.998}],
    }


def test_headline_compares_int8_with_openvino_fp32_and_pytorch():
    text = render(_summary(0.1))
    assert "x OpenVINO FP32" in text and "x PyTorch FP32" in text
    assert "INT8 runs 1.25x OpenVINO FP32's speed" in text
    assert "Calibration method: percentile (best label agreement" in text   # what auto chose, and why


def test_headline_says_plainly_when_int8_is_not_faster():
    text = render(_summary(0.13))
    assert "INT8 is NOT faster than OpenVINO FP32 on this CPU (0.96x)" in text
    assert "model.fp32.onnx" in text
