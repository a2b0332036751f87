"""Streaming calibration statistics and ``--method auto`` (issue 18), on networks built here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from SlicerPTQLib import cli
from SlicerPTQLib.calibration import RangeCollector, collect_ranges, tensor_bytes
from SlicerPTQLib.export import export_onnx
from SlicerPTQLib.errors import PTQError
from SlicerPTQLib.method_choice import CANDIDATES, DICE_TIE, SHORTLIST_BAND, choose_method
from SlicerPTQLib import onnx_graph
from SlicerPTQLib.selfcheck import MAX_VOLUMES
from SlicerPTQLib.spec import ModelSpec
from SlicerPTQLib.volume import Volume
from SlicerPTQLib.volumes import write_volume


class SignNet(torch.nn.Module):
    """Two-class logits (x, -x) through identity convolutions, the middle one quantized
    (the first, on one channel, and the head stay float by policy): the label is the input's sign."""

    def __init__(self):
        super().__init__()
        self.split = torch.nn.Conv3d(1, 2, 1, bias=False)
        self.mix = torch.nn.Conv3d(2, 2, 1, bias=False)
        self.head = torch.nn.Conv3d(2, 2, 1, bias=False)
        with torch.no_grad():
            self.split.weight.copy_(torch.tensor([1.0, -1.0]).reshape(2, 1, 1, 1, 1))
            self.mix.weight.copy_(torch.eye(2).reshape(2, 2, 1, 1, 1))
            self.head.weight.copy_(torch.eye(2).reshape(2, 2, 1, 1, 1))

    def forward(self, x):
        return self.head(self.mix(self.split(x)))


class NormNet(torch.nn.Module):
    """Conv, GroupNorm, Mish, Conv: the kind of network where max is not the best method."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.GroupNorm(4, 8),
                                        torch.nn.Mish(), torch.nn.Conv3d(8, 8, 3, padding=1),
                                        torch.nn.ReLU(), torch.nn.Conv3d(8, 2, 1))

    def forward(self, x):
        return self.body(x)


def _crops(count, seed=0, size=16):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(1, size, size, size)).astype(np.float32) for _ in range(count)]


def _tensors(path):
    """The activations the CPU placement quantizes, as the pipeline picks them."""
    from SlicerPTQLib.qdq import PLACEMENTS, choose_activation_tensors

    return choose_activation_tensors(onnx_graph.load_model(path), PLACEMENTS["cpu"], frozenset())


def test_grouped_histograms_equal_one_group(tmp_path):
    path = export_onnx(NormNet().eval(), tmp_path / "norm.onnx", 1, (1, 1, 16, 16, 16))
    names = _tensors(path)
    crops = _crops(3)
    sizes = tensor_bytes(onnx_graph.load_model(path), "input", (1, 1, 16, 16, 16))
    assert sizes["output"] == 4 * 2 * 16 ** 3
    whole = RangeCollector(path, names, ["percentile", "mse"])
    whole.feed(crops)
    tight = RangeCollector(path, names, ["percentile", "mse"], memory_budget=sizes["output"])
    tight.feed(crops)
    assert whole.groups_used == 1 and tight.groups_used >= 4
    for method in ("max", "percentile", "mse"):
        assert tight.ranges(method) == pytest.approx(whole.ranges(method), rel=1e-6)
    assert collect_ranges(path, names, crops, "percentile") == pytest.approx(whole.ranges("percentile"), rel=1e-6)


def test_nan_activation_is_still_refused(tmp_path):
    path = export_onnx(SignNet().eval(), tmp_path / "sign.onnx", 1, (1, 1, 16, 16, 16))
    crops = _crops(1)
    crops[0][0, 3, 3, 3] = np.nan
    with pytest.raises(PTQError, match="NaN or Inf"):
        collect_ranges(path, ["output"], crops, "max")
    with pytest.raises(PTQError, match="NaN or Inf"):
        collect_ranges(path, ["output"], crops, "entropy")


def test_auto_avoids_max_when_one_outlier_would_flatten_the_grid(tmp_path):
    path = export_onnx(SignNet().eval(), tmp_path / "sign.onnx", 1, (1, 1, 16, 16, 16))
    crops = _crops(8)
    crops[0][0, 5, 5, 5] = 1e4  # one calibration voxel 10^4 sigma out: max's scale rounds all else to 0
    choice, ranges = choose_method(path, _tensors(path), crops)
    assert choice.fit_crops == 4 and choice.held_out_crops == 4
    assert set(choice.agreement) == set(CANDIDATES)
    assert choice.agreement["max"] < 0.9 and choice.chosen != "max"
    # Label agreement first (gaps under DICE_TIE are equal), then the output error among equals.
    equal = [method for method, dice in choice.agreement.items()
             if dice >= max(choice.agreement.values()) - DICE_TIE]
    assert "max" not in equal and choice.chosen in equal
    assert choice.relative_rmse[choice.chosen] == min(choice.relative_rmse[method] for method in equal)
    assert max(ranges.values()) < 1e3 and "held back" in choice.reason and choice.agreement[choice.chosen] > 0.98


def test_whole_volumes_decide_among_the_methods_the_crops_shortlist(tmp_path):
    path = export_onnx(NormNet().eval(), tmp_path / "norm.onnx", 1, (1, 1, 16, 16, 16))
    crops = _crops(8)
    crops[0][0, 5, 5, 5] = 60.0  # an outlier that widens max's grid
    volumes = [np.random.default_rng(seed).normal(size=(1, 24, 24, 24)).astype(np.float32) for seed in (7, 8)]
    choice, ranges = choose_method(path, _tensors(path), crops, volumes=volumes, roi=(16, 16, 16))
    best_on_crops = max(choice.agreement.values())
    shortlist = {method for method, dice in choice.agreement.items() if dice >= best_on_crops - SHORTLIST_BAND}
    assert len(shortlist) > 1 and set(choice.volume_agreement) == shortlist
    assert choice.volume_agreement[choice.chosen] == max(choice.volume_agreement.values())
    assert "whole calibration volume" in choice.reason
    # The ranges returned are the chosen method's over every crop, as --method CHOSEN gives them.
    assert ranges == pytest.approx(collect_ranges(path, _tensors(path), crops, choice.chosen), rel=1e-6)
    # Without volumes the crops decide, as before.
    crops_only, _ = choose_method(path, _tensors(path), crops)
    assert crops_only.volume_agreement == {} and "held back" in crops_only.reason


def test_quantize_auto_records_the_choice_and_distinct_crops(tmp_path, capsys):
    network = NormNet().eval()
    model = tmp_path / "norm.pt"
    torch.jit.save(torch.jit.trace(network, torch.zeros(1, 1, 16, 16, 16)), str(model))
    ModelSpec(name="norm", roi_size=(16, 16, 16)).save(tmp_path / "norm.json")
    volumes = [tmp_path / f"v{seed}.nii.gz" for seed in range(MAX_VOLUMES + 1)]
    for seed, volume in enumerate(volumes):
        write_volume(Volume(array=np.random.default_rng(seed).normal(size=(24, 24, 24)).astype(np.float32),
                            affine=np.eye(4)), volume)
    assert cli.main(["quantize", str(model), "--calib", *map(str, volumes), "--out", str(tmp_path / "out"),
                     "--num-crops", "6", "--method", "auto"]) == 0
    report = json.loads((tmp_path / "out" / "quantization.json").read_text())
    record = report["calibration_method"]
    assert record["requested"] == "auto" and record["chosen"] in CANDIDATES
    assert report["qdq"]["method"] == record["chosen"] and report["settings"]["method"] == "auto"
    assert report["crops"]["requested"] == 6 and 1 <= report["crops"]["distinct"] <= 6
    assert record["fit_crops"] + record["held_out_crops"] == report["crops"]["distinct"]
    assert f"method     {record['chosen']}" in capsys.readouterr().out
    # The whole-volume stage segments as many calibration volumes as the self-check, no more.
    assert len(record["volume_agreement"]) > 1
    assert f"on the {MAX_VOLUMES} whole calibration volume(s)" in record["reason"]
    assert len(report["self_check"]["volumes"]) == MAX_VOLUMES
