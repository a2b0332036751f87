"""Model loading from every source a user brings, and its errors."""

import json

import pytest
import torch

from SlicerPTQLib.errors import PTQError
from SlicerPTQLib.models import build_monai_network, load_model
from SlicerPTQLib.spec import ModelSpec, sidecar_path

UNET_ARGS = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8], "strides": [2],
             "num_res_units": 1}


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_missing_model_names_the_path(tmp_path):
    with pytest.raises(PTQError, match="not found"):
        load_model(tmp_path / "nope.pt")


def test_unknown_extension_says_what_is_accepted(tmp_path):
    path = tmp_path / "net.bin"
    path.write_bytes(b"x")
    with pytest.raises(PTQError, match=r"\.onnx"):
        load_model(path)


def test_state_dict_without_arch_asks_for_arch(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(build_monai_network("UNet", UNET_ARGS).state_dict(), path)
    with pytest.raises(PTQError, match="--arch"):
        load_model(path)


def test_monai_architecture_with_state_dict(tmp_path):
    reference = build_monai_network("UNet", UNET_ARGS)
    path = tmp_path / "weights.pt"
    torch.save(reference.state_dict(), path)
    loaded = load_model(path, arch="UNet", arch_args=UNET_ARGS)
    assert loaded.kind == "torch"
    assert loaded.spec.out_channels == 3
    assert _same_weights(loaded.module, reference)


def test_unknown_architecture_lists_known_ones(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(b"")
    with pytest.raises(PTQError, match="Unknown architecture 'NotANet'.*UNet"):
        load_model(path, arch="NotANet", arch_args={})


def test_weights_that_do_not_fit_the_architecture(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(build_monai_network("UNet", UNET_ARGS).state_dict(), path)
    with pytest.raises(PTQError, match="do not fit"):
        load_model(path, arch="UNet", arch_args={**UNET_ARGS, "channels": [8, 16]})


def test_corrupt_onnx_file(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x00not an onnx file")
    with pytest.raises(PTQError, match="not a readable ONNX"):
        load_model(path)


def test_torchscript_reads_the_sidecar_spec(shipped_model_path):
    loaded = load_model(shipped_model_path)
    assert loaded.kind == "torch"
    assert loaded.spec == ModelSpec.load(sidecar_path(shipped_model_path))
    assert loaded.spec.roi_size == (128, 128, 128)


def test_monai_bundle(tmp_path):
    bundle = tmp_path / "spleen_bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    network = build_monai_network("UNet", {**UNET_ARGS, "out_channels": 2})
    torch.save(network.state_dict(), bundle / "models" / "model.pt")
    inference = {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "pixdim": [1.5, 1.5, 2.0],
        "network_def": {"_target_": "UNet", **{**UNET_ARGS, "out_channels": 2}},
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": "@pixdim"},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -57, "a_max": 164,
             "b_min": 0.0, "b_max": 1.0, "clip": True}]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [64, 64, 32], "sw_batch_size": 2,
                    "overlap": 0.25},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True}]},
    }
    metadata = {"description": "spleen", "network_data_format": {
        "inputs": {"image": {"num_channels": 1, "modality": "CT"}},
        "outputs": {"pred": {"num_channels": 2, "channel_def": {"0": "background", "1": "spleen"}}}}}
    (bundle / "configs" / "inference.json").write_text(json.dumps(inference))
    (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata))
    loaded = load_model(bundle)
    spec = loaded.spec
    assert _same_weights(loaded.module, network)
    assert spec.labels == {1: "spleen"} and spec.modality == "CT"
    assert spec.spacing == (1.5, 1.5, 2.0) and spec.orientation == "RAS"
    assert spec.intensity.kind == "clip_scale" and spec.intensity.a_min == -57
    assert spec.roi_size == (64, 64, 32) and spec.overlap == 0.25
    assert spec.output == "softmax"


def test_bundle_without_config(tmp_path):
    (tmp_path / "models").mkdir()
    with pytest.raises(PTQError, match="not a MONAI bundle"):
        load_model(tmp_path)
