"""The segmentation architectures SlicerPTQ knows, and how each one exports.

Every network of the two source papers (MedPTQ: U-Net, TransUNet, UNesT,
nnU-Net, SwinUNETR, SegResNet, VISTA3D) has an entry here: MONAI's own
classes where MONAI has the network, the project's :mod:`networks` where it
has none. An entry gives two constructor configurations (``"small"`` for
tests and CPU training, ``"paper"`` close to the published one), the patch
size rule (multiple of N; fixed size for networks with learned position
embeddings) and how to export (dynamic spatial dims, or static).

Example::

    net = build("SegResNet", config_args("SegResNet", "small", out_channels=4))
    roi = get("SegResNet").default_roi("small")  # (64, 64, 64)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from .errors import PTQError
from .spec import ModelSpec

CONFIGS = ("small", "paper")


def _monai(class_name: str, **fixed) -> Callable[..., Any]:
    def construct(**args):
        from monai.networks import nets

        return getattr(nets, class_name)(**fixed, **args)

    construct.__name__ = class_name
    return construct


def _project(class_name: str) -> Callable[..., Any]:
    def construct(**args):
        from . import networks

        return getattr(networks, class_name)(**args)

    construct.__name__ = class_name
    return construct


@dataclass(frozen=True)
class Architecture:
    """One registry entry.

    ``configs[name]`` holds the constructor arguments without the channel
    counts (filled in by :func:`config_args`). ``spatial_multiple``: every
    patch dim must be a multiple of it. ``fixed_roi``: the network takes one
    patch size only (learned position embeddings or baked window masks);
    ``roi_arg`` names the constructor argument that sets it, if any.
    ``dynamic_spatial``: export with dynamic D/H/W. ``ort_preprocess``:
    whether onnxruntime's ``quant_pre_process`` may run on the export
    (it constant-folds SwinUNETR's window masks into a huge constant).
    ``out_arg``: how the class count is passed (``"out_channels"`` or
    ``"class_ids"`` for VISTA3D's class prompts). ``min_size``: smallest
    patch dim (SwinUNETR's instance norm at 1/32 needs more than 1 voxel).
    """

    name: str
    construct: Callable[..., Any]
    configs: Dict[str, Dict[str, Any]]
    rois: Dict[str, Tuple[int, int, int]]
    spatial_multiple: int
    source: str
    family: str = "cnn"
    dynamic_spatial: bool = True
    fixed_roi: bool = False
    roi_arg: Optional[str] = None
    ort_preprocess: bool = True
    out_arg: str = "out_channels"
    notes: str = ""
    min_size: int = 1
    small_multiples: Dict[str, int] = field(default_factory=dict)

    def default_roi(self, config: str = "small") -> Tuple[int, int, int]:
        """The patch size this configuration is built and tested at."""
        _check_config(config)
        return self.rois[config]

    def multiple(self, config: str = "small") -> int:
        """Patch dims must be multiples of this for ``config``."""
        return self.small_multiples.get(config, self.spatial_multiple)

    def check_roi(self, roi: Sequence[int], config: str = "small") -> Tuple[int, int, int]:
        """``roi`` as 3 ints, or PTQError when the network cannot take it."""
        roi = tuple(int(v) for v in roi)
        multiple = self.multiple(config)
        smallest = max(self.min_size, multiple)
        if len(roi) != 3 or any(v < smallest or v % multiple for v in roi):
            raise PTQError(f"{self.name} needs a patch size of 3 multiples of {multiple}, each at least "
                           f"{smallest}; got {roi}. Use e.g. {self.default_roi(config)}.")
        return roi  # type: ignore[return-value]


def _check_config(config: str) -> None:
    if config not in CONFIGS:
        raise PTQError(f"Unknown configuration '{config}'. Choose one of: {', '.join(CONFIGS)}.")


_CUBE64 = (64, 64, 64)
_CUBE96 = (96, 96, 96)

_ENTRIES = (
    Architecture(
        "UNet", _monai("UNet"),
        configs={"small": dict(spatial_dims=3, channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=1),
                 "paper": dict(spatial_dims=3, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2),
                               num_res_units=2)},
        rois={"small": _CUBE64, "paper": _CUBE96}, spatial_multiple=16, small_multiples={"small": 8},
        source="Kerfoot et al., MICCAI STACOM 2018 (MONAI UNet; MedPTQ's BTCV U-Net)"),
    Architecture(
        "BasicUNet", _monai("BasicUNet"),
        configs={"small": dict(spatial_dims=3, features=(8, 8, 16, 32, 64, 8)),
                 "paper": dict(spatial_dims=3, features=(32, 32, 64, 128, 256, 32))},
        rois={"small": _CUBE64, "paper": _CUBE96}, spatial_multiple=16,
        source="Falk et al., Nature Methods 2019 (MONAI BasicUNet)"),
    Architecture(
        "SegResNet", _monai("SegResNet"),
        configs={"small": dict(spatial_dims=3, init_filters=8, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1)),
                 "paper": dict(spatial_dims=3, init_filters=16, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1))},
        rois={"small": _CUBE64, "paper": _CUBE96}, spatial_multiple=8,
        source="Myronenko, BrainLes 2018, arXiv:1810.11654 (MONAI SegResNet)"),
    Architecture(
        "SegResNetDS", _monai("SegResNetDS"),
        configs={"small": dict(spatial_dims=3, init_filters=8, blocks_down=(1, 1, 1, 1), norm="instance"),
                 "paper": dict(spatial_dims=3, init_filters=32, blocks_down=(1, 2, 2, 4, 4), norm="instance",
                               dsdepth=4)},
        rois={"small": _CUBE64, "paper": _CUBE96}, spatial_multiple=16, small_multiples={"small": 8},
        source="Myronenko et al., Auto3DSeg SegResNet with deep supervision (MONAI SegResNetDS)",
        notes="in eval mode the deep-supervision heads are skipped: one output"),
    Architecture(
        "DynUNet", _monai("DynUNet"),
        configs={"small": dict(spatial_dims=3, kernel_size=(3, 3, 3, 3), strides=(1, 2, 2, 2),
                               upsample_kernel_size=(2, 2, 2), filters=(8, 16, 32, 64)),
                 "paper": dict(spatial_dims=3, kernel_size=(3,) * 6, strides=(1, 2, 2, 2, 2, 2),
                               upsample_kernel_size=(2,) * 5, filters=(32, 64, 128, 256, 320, 320))},
        rois={"small": _CUBE64, "paper": _CUBE96}, spatial_multiple=32, small_multiples={"small": 8},
        source="Isensee et al., nnU-Net, Nature Methods 2021 (3d_fullres layout; MONAI DynUNet)"),
    Architecture(
        "UNETR", _monai("UNETR"),
        configs={"small": dict(spatial_dims=3, feature_size=8, hidden_size=96, mlp_dim=192, num_heads=4),
                 "paper": dict(spatial_dims=3, feature_size=16, hidden_size=768, mlp_dim=3072, num_heads=12)},
        rois={"small": _CUBE64, "paper": _CUBE96}, spatial_multiple=16, family="transformer",
        dynamic_spatial=False, fixed_roi=True, roi_arg="img_size",
        source="Hatamizadeh et al., UNETR, WACV 2022, arXiv:2103.10504 (MONAI UNETR)",
        notes="learned position embedding: one patch size, exported static"),
    Architecture(
        "SwinUNETR", _monai("SwinUNETR"),
        configs={"small": dict(spatial_dims=3, feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 3, 6, 6)),
                 "paper": dict(spatial_dims=3, feature_size=48, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24))},
        rois={"small": _CUBE64, "paper": _CUBE96}, spatial_multiple=32, family="transformer",
        dynamic_spatial=False, fixed_roi=True, ort_preprocess=False, min_size=64,
        source="Hatamizadeh et al., Swin UNETR, BrainLes 2021, arXiv:2201.01266 (MONAI SwinUNETR)",
        notes="window shapes and shift masks are baked in at export: static; no quant_pre_process"),
    Architecture(
        "SwinUNETRv2", _monai("SwinUNETR", use_v2=True),
        configs={"small": dict(spatial_dims=3, feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 3, 6, 6)),
                 "paper": dict(spatial_dims=3, feature_size=48, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24))},
        rois={"small": _CUBE64, "paper": _CUBE96}, spatial_multiple=32, family="transformer",
        dynamic_spatial=False, fixed_roi=True, ort_preprocess=False, min_size=64,
        source="He et al., SwinUNETR-V2, MICCAI 2023 (MONAI SwinUNETR use_v2=True)",
        notes="as SwinUNETR, plus a residual conv block before each stage"),
    Architecture(
        "VISTA3D", _project("VISTA3DAuto"),
        configs={"small": dict(encoder_embed_dim=16, blocks_down=(1, 1, 1, 1), n_class_embeddings=16),
                 "paper": dict(encoder_embed_dim=48, blocks_down=(1, 2, 2, 4, 4), n_class_embeddings=512)},
        rois={"small": _CUBE64, "paper": _CUBE96}, spatial_multiple=16, small_multiples={"small": 8},
        out_arg="class_ids",
        source="He et al., VISTA3D, arXiv:2406.05285 (MONAI SegResNetDS2 + ClassMappingClassify)",
        notes="automatic (class-prompt) branch with the classes fixed; point prompts not exported"),
    Architecture(
        "TransUNet", _project("TransUNet"),
        configs={"small": dict(encoder_channels=(8, 16, 32, 64), hidden_size=64, num_layers=2, num_heads=4,
                               mlp_dim=128, decoder_channels=(64, 32, 16, 8)),
                 "paper": dict(encoder_channels=(64, 256, 512, 1024), hidden_size=768, num_layers=12,
                               num_heads=12, mlp_dim=3072, decoder_channels=(256, 128, 64, 16))},
        rois={"small": _CUBE64, "paper": _CUBE96}, spatial_multiple=16, family="transformer",
        dynamic_spatial=False, fixed_roi=True, roi_arg="img_size",
        source="Chen et al., TransUNet, arXiv:2102.04306 (built here, networks/transunet.py)"),
    Architecture(
        "UNesT", _project("UNesT"),
        configs={"small": dict(embed_dims=(32, 64, 128), depths=(1, 1, 2), num_heads=(2, 4, 8), feature_size=8),
                 "paper": dict(embed_dims=(128, 256, 512), depths=(2, 2, 8), num_heads=(4, 8, 16),
                               feature_size=32)},
        rois={"small": _CUBE64, "paper": _CUBE96}, spatial_multiple=16, family="transformer",
        dynamic_spatial=False, fixed_roi=True, roi_arg="img_size",
        source="Yu et al., UNesT, Medical Image Analysis 2023, arXiv:2209.14378 (built here, networks/unest.py)"),
)

#: name -> :class:`Architecture`, in the order of the papers' tables.
REGISTRY: Dict[str, Architecture] = {entry.name: entry for entry in _ENTRIES}
#: Other names users type for the same networks.
ALIASES = {"nnUNet": "DynUNet", "nnU-Net": "DynUNet", "U-Net": "UNet", "SwinUNETR-V2": "SwinUNETRv2",
           "VISTA3DAuto": "VISTA3D"}


def get(name: str) -> Architecture:
    """The registry entry for ``name`` (aliases such as ``"nnU-Net"`` accepted)."""
    entry = REGISTRY.get(ALIASES.get(name, name))
    if entry is None:
        raise PTQError(f"Unknown architecture '{name}'. Known: {', '.join(REGISTRY)} "
                       f"(aliases: {', '.join(ALIASES)}).")
    return entry


def config_args(name: str, config: str = "small", in_channels: int = 1, out_channels: int = 2,
                roi: Optional[Sequence[int]] = None, **overrides) -> Dict[str, Any]:
    """Full constructor arguments of ``name`` in ``config`` for these channel counts.

    ``roi`` (default: the configuration's) is checked against the
    network's size rule and passed as ``img_size`` where the network
    needs it. ``overrides`` replace single arguments.
    """
    entry = get(name)
    _check_config(config)
    if in_channels < 1 or out_channels < 2:
        raise PTQError(f"{entry.name} needs in_channels >= 1 and out_channels >= 2 "
                       f"(got {in_channels}, {out_channels}); a single foreground class still has "
                       "a background channel.")
    args = copy.deepcopy(entry.configs[config])
    args["in_channels"] = in_channels
    if entry.out_arg == "class_ids":
        args["class_ids"] = list(range(out_channels))
    else:
        args["out_channels"] = out_channels
    roi = entry.check_roi(roi if roi is not None else entry.default_roi(config), config)
    if entry.roi_arg is not None:
        args[entry.roi_arg] = roi
    args.update(overrides)
    return args


def build(name: str, args: Optional[Dict[str, Any]] = None):
    """An ``nn.Module`` of architecture ``name`` built from constructor ``args``.

    Without ``args`` the small configuration (1 input channel, 2 classes).
    Raises PTQError for unknown names or arguments the constructor rejects.
    """
    entry = get(name)
    args = config_args(entry.name) if args is None else dict(args)
    try:
        return entry.construct(**args)
    except (TypeError, ValueError, AssertionError) as exc:
        raise PTQError(f"Bad arguments for {entry.name}: {exc}. Start from "
                       f"architectures.config_args('{entry.name}') and change single values.") from exc


def spec_for(name: str, args: Dict[str, Any], roi: Sequence[int], labels: Optional[Dict[int, str]] = None,
             **fields) -> ModelSpec:
    """A :class:`ModelSpec` telling the pipeline how this network exports.

    ``roi`` is the sliding-window patch; static-shape networks are exported
    at exactly that size. Other ModelSpec fields come from ``fields``.
    """
    entry = get(name)
    out_channels = len(args["class_ids"]) if entry.out_arg == "class_ids" else int(args["out_channels"])
    spec = ModelSpec(name=fields.pop("model_name", entry.name), in_channels=int(args["in_channels"]),
                     out_channels=out_channels, roi_size=tuple(int(v) for v in roi),
                     labels=labels or {k: f"class {k}" for k in range(1, out_channels)},
                     dynamic_spatial=entry.dynamic_spatial, spatial_multiple=entry.spatial_multiple, **fields)
    return spec
