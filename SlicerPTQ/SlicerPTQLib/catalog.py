"""The model catalog (``Resources/Models.json``) the Slicer module lists.

Each entry says what a network segments, how its input is prepared and
which pinned registry archive its weights come from. Entries are checked
against ``Models.schema.json`` on load, so a broken catalog fails with the
entry and field named instead of half-working in the GUI.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import PTQError
from .fetch import Source, fetch
from .schema import resolve_ref
from .spec import ModelSpec, sidecar_path

RESOURCES = Path(__file__).resolve().parents[1] / "Resources"
CATALOG_PATH = RESOURCES / "Models.json"
SCHEMA_PATH = RESOURCES / "Models.schema.json"

#: The terminology context of Slicer's built-in anatomy list.
TERMINOLOGY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
ANATOMY_CONTEXT = "Anatomic codes - DICOM master list"

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool,
          "integer": int, "number": (int, float), "null": type(None)}


@dataclass(frozen=True)
class LabelInfo:
    """One output label: value in the label map, name, RGB colour in [0, 1]."""

    value: int
    name: str
    color: Tuple[float, float, float]
    terminology: str = ""


@dataclass(frozen=True)
class CatalogModel:
    """One catalog entry with its spec and where its weights come from."""

    id: str
    title: str
    description: str
    modality: str
    body_part: str
    architecture: str
    model_format: str
    license: str
    citation: str
    roi: Tuple[int, int, int]
    preprocessing: str
    labels: Tuple[LabelInfo, ...]
    spec: ModelSpec
    source: Source
    #: names of shipped calibration volumes (:data:`.shipped.CATALOG`) used when the user checks none
    default_calibration: Tuple[str, ...] = ()

    def matches(self, text: str) -> bool:
        """True when every word of ``text`` appears in the entry's visible fields."""
        haystack = " ".join([self.id, self.title, self.description, self.modality, self.body_part,
                             self.architecture, self.model_format] + [label.name for label in self.labels]).lower()
        return all(word in haystack for word in text.lower().split())

    def describe(self) -> str:
        """Plain-text summary for the GUI (tooltip / details box)."""
        labels = ", ".join(f"{label.value}: {label.name}" for label in self.labels)
        return "\n".join([
            self.title, "", self.description, "",
            f"Modality: {self.modality}" + (f" ({self.body_part})" if self.body_part else ""),
            f"Architecture: {self.architecture} [{self.model_format}]",
            f"Patch (ROI): {' x '.join(str(v) for v in self.roi)} voxels",
            f"Labels: {labels}",
            f"Preprocessing: {self.preprocessing}",
            f"Weights: {self.source.label} from {self.source.registry} ({self.source.member}, "
            f"sha256 {self.source.member_sha256[:12]}...), licence {self.license}",
        ] + ([f"Cite: {self.citation}"] if self.citation else []))

    def fetch(self) -> Path:
        """The verified local weights, with this entry's spec written beside them.

        Downloads the pinned archive once (then reused from the cache);
        raises PTQError naming the package when it cannot be had.
        """
        path = fetch(self.source)
        sidecar = sidecar_path(path)
        if not sidecar.is_file() or ModelSpec.load(sidecar) != self.spec:
            try:
                self.spec.save(sidecar)
            except OSError as exc:
                raise PTQError(f"Cannot write the model metadata {sidecar}: {exc}. "
                               "Set SLICER_PTQ_CACHE to a writable folder.") from exc
        return path

    def default_calibration_files(self) -> List[Path]:
        """The entry's default calibration volumes, fetched (pinned, cached); PTQError when it has none."""
        from . import shipped

        if not self.default_calibration:
            raise PTQError(f"Model '{self.id}' has no default calibration set; check a few unlabeled volumes "
                           "like the ones to segment as calibration volumes.")
        return [paths[0] for _, paths in shipped.fetch_volumes(self._calibration_entries(), "calibration")]

    def downloads_pending(self, calibration: bool = False) -> bool:
        """True when its weights (or, with ``calibration``, its default calibration volumes) are not cached."""
        from .fetch import is_cached

        sources = [self.source] + ([entry.image for entry in self._calibration_entries()] if calibration else [])
        return not all(is_cached(source) for source in sources)

    def _calibration_entries(self):
        from . import shipped

        return [entry for entry in shipped.catalog("calibration") if entry.name in self.default_calibration]


def load_catalog(path: Path = CATALOG_PATH, schema_path: Path = SCHEMA_PATH) -> List[CatalogModel]:
    """Read and validate a catalog file; entries in file order."""
    data = _read_json(path, "model catalog")
    validate(data, _read_json(schema_path, "model catalog schema"), where=str(path))
    models = [_entry(item) for item in data["models"]]
    ids = [model.id for model in models]
    duplicates = sorted({model_id for model_id in ids if ids.count(model_id) > 1})
    if duplicates:
        raise PTQError(f"{path}: model id(s) {duplicates} appear more than once; give each entry a unique id.")
    return models


def find_model(models: Sequence[CatalogModel], model_id: str) -> CatalogModel:
    """The entry with ``model_id``, or PTQError listing the known ids."""
    for model in models:
        if model.id == model_id:
            return model
    raise PTQError(f"No model '{model_id}' in the catalog. Known models: {', '.join(m.id for m in models)}.")


def search(models: Sequence[CatalogModel], text: str) -> List[CatalogModel]:
    """Entries matching every word of ``text`` (all of them for empty text)."""
    return [model for model in models if model.matches(text)]


def terminologies_for(spec: ModelSpec, models: Optional[Sequence[CatalogModel]] = None) -> Dict[int, str]:
    """Slicer terminology strings per label value for a model the catalog knows.

    Models are matched by spec name; unknown models get no terminology.
    """
    models = load_catalog() if models is None else models
    for model in models:
        if model.spec.name == spec.name:
            return {label.value: label.terminology for label in model.labels if label.terminology}
    return {}


def terminology_string(category: Sequence[str], type_: Sequence[str],
                       type_modifier: Sequence[str] = ("", "", "")) -> str:
    """Slicer's serialized terminology entry for a category/type code pair.

    Format: ``context~category~type~typeModifier~anatomicContext~region~regionModifier``
    with each code written ``scheme^value^meaning``.
    """
    codes = ["^".join(code) for code in (category, type_, type_modifier)]
    return "~".join([TERMINOLOGY_CONTEXT, *codes, ANATOMY_CONTEXT, "^^", "^^"])


def validate(value, schema: dict, where: str = "catalog", root: Optional[dict] = None) -> None:
    """Check ``value`` against the JSON-schema subset the catalog schema uses.

    Supports type, enum, required, properties, additionalProperties (false),
    items, minItems/maxItems, minimum/maximum, minLength, pattern and local
    ``$ref``. Raises PTQError naming the offending path.
    """
    root = schema if root is None else root
    if "$ref" in schema:
        return validate(value, resolve_ref(schema["$ref"], root), where, root)
    expected = schema.get("type")
    if expected and not _is_type(value, expected):
        raise PTQError(f"{where}: expected {expected}, got {json.dumps(value)[:60]}. Fix the catalog entry.")
    if "enum" in schema and value not in schema["enum"]:
        raise PTQError(f"{where}: {json.dumps(value)} is not one of {schema['enum']}.")
    if isinstance(value, dict):
        missing = [key for key in schema.get("required", []) if key not in value]
        if missing:
            raise PTQError(f"{where}: missing field(s) {missing}. Add them to the catalog entry.")
        properties = schema.get("properties", {})
        extra = sorted(set(value) - set(properties))
        if schema.get("additionalProperties") is False and extra:
            raise PTQError(f"{where}: unknown field(s) {extra}; known fields are {sorted(properties)}.")
        for key, item in value.items():
            if key in properties:
                validate(item, properties[key], f"{where}.{key}", root)
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", len(value)):
            raise PTQError(f"{where}: has {len(value)} items, expected between {schema.get('minItems', 0)} "
                           f"and {schema.get('maxItems', 'any number')}.")
        for index, item in enumerate(value):
            if "items" in schema:
                validate(item, schema["items"], f"{where}[{index}]", root)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < schema.get("minimum", value) or value > schema.get("maximum", value):
            raise PTQError(f"{where}: {value} is outside [{schema.get('minimum')}, {schema.get('maximum')}].")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            raise PTQError(f"{where}: must not be empty.")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            raise PTQError(f"{where}: {value!r} does not match {schema['pattern']}.")


def _is_type(value, expected: str) -> bool:
    if isinstance(value, bool) and expected in ("integer", "number"):
        return False
    return isinstance(value, _TYPES[expected])


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PTQError(f"Cannot read the {what} {path}: {exc}. Reinstall the extension or fix the JSON.") from exc


def _entry(item: dict) -> CatalogModel:
    labels = tuple(LabelInfo(value=label["value"], name=label["name"], color=tuple(label["color"]),
                             terminology=_terminology(label.get("terminology")))
                   for label in item["labels"])
    spec = ModelSpec.from_dict({
        **item["spec"], "name": item["id"], "modality": item["modality"], "description": item["description"],
        "roi_size": item["roi"], "labels": {label.value: label.name for label in labels},
        "colors": {label.value: label.color for label in labels}})
    source = item["source"]
    default_calibration = tuple(item.get("defaultCalibration", ()))
    _check_calibration_names(item["id"], default_calibration)
    return CatalogModel(
        id=item["id"], title=item["title"], description=item["description"], modality=item["modality"],
        body_part=item.get("bodyPart", ""), architecture=item["architecture"], model_format=item["format"],
        license=item["license"], citation=item.get("citation", ""), roi=tuple(item["roi"]),
        preprocessing=item["preprocessing"], labels=labels, spec=spec,
        source=Source(registry=source["registry"], package=source["package"], version=source["version"],
                      archive_sha256=source["archiveSha256"], member=source["member"],
                      member_sha256=source["memberSha256"]),
        default_calibration=default_calibration)


def _check_calibration_names(model_id: str, names: Sequence[str]) -> None:
    from . import shipped

    known = [entry.name for entry in shipped.catalog("calibration")]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise PTQError(f"Catalog model '{model_id}': defaultCalibration names {unknown}, which are not shipped "
                       f"calibration volumes ({', '.join(known)}). Fix the catalog entry.")


def _terminology(entry: Optional[dict]) -> str:
    if not entry:
        return ""
    return terminology_string(entry["category"], entry["type"], entry.get("typeModifier", ("", "", "")))
