"""Read a MONAI bundle's configs as data, never as code.

MONAI's ``ConfigParser`` evaluates every ``"$..."`` string as Python and
instantiates any ``_target_``, so a downloaded bundle could run anything.
Here configs (JSON or YAML) are parsed as plain data; ``"@id"`` references
and ``"%file::id"`` macros are followed by hand; the network is built only
from a ``monai.networks.nets`` / ``torch.nn`` module class with literal
arguments. A value that needs code is refused, naming its config key,
unless the caller trusts the bundle (``trust_bundle_code``): then MONAI's
own parser evaluates the keys SlicerPTQ reads, as MONAI would.

Example::

    config = BundleConfig.read(folder / "configs" / "inference.json", folder)
    roi = config.value("inferer::roi_size")  # a literal, or PTQError
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional

from .errors import PTQError

SEPARATOR = "::"
OLD_SEPARATOR = "#"  # MONAI still reads ids written with '#'
TRUST_HINT = ("Use a bundle without code, or, if you trust its author, pass --trust-bundle-code "
              "(trust_bundle_code=True in Python) to let MONAI evaluate it.")
#: Keys a network config may carry besides its constructor arguments.
NETWORK_KEYS = ("_target_", "_desc_", "_disabled_")


def read_structured(path: Path) -> Any:
    """A JSON or YAML file as plain data (YAML through ``safe_load``: no Python tags)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PTQError(f"Cannot read bundle config {path}: {exc}. Check the file.") from exc
    if Path(path).suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise PTQError(f"Cannot read bundle config {path}: {exc}. Check that it is valid YAML.") from exc
    try:
        return json.loads(text)
    except ValueError as exc:
        raise PTQError(f"Cannot read bundle config {path}: {exc}. Check that it is valid JSON.") from exc


class BundleConfig:
    """One bundle config (plus its metadata under ``_meta_``), read as data."""

    def __init__(self, data: dict, path: Path, bundle_root: Path):
        self.data = data
        self.path = Path(path)
        self.bundle_root = Path(bundle_root)

    @classmethod
    def read(cls, path: Path, bundle_root: Path, metadata: Optional[Path] = None) -> "BundleConfig":
        data = read_structured(path)
        if not isinstance(data, dict):
            raise PTQError(f"Bundle config {path} holds a {type(data).__name__}, not a mapping of keys to values.")
        if metadata is not None:
            meta = read_structured(metadata)
            data["_meta_"] = meta if isinstance(meta, dict) else {}
        return cls(data, path, bundle_root)

    def raw(self, key: str, default: Any = None) -> Any:
        """The value at ``key`` (``"a::b::0"``) as written, or ``default``."""
        node = self.data
        for part in _split(key):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return default
        return node

    def value(self, key: str, default: Any = None) -> Any:
        """The value at ``key`` with references and macros followed; refuses any ``$`` expression."""
        if self.raw(key, _MISSING) is _MISSING:
            return default
        return self._literal(self.raw(key), key, seen=())

    def network(self, key: str = "network_def"):
        """The torch module ``key`` describes (see :func:`build_network`)."""
        return build_network(self, key)

    def _literal(self, node: Any, key: str, seen: tuple) -> Any:
        if isinstance(node, dict):
            return {name: self._literal(item, f"{key}{SEPARATOR}{name}", seen) for name, item in node.items()}
        if isinstance(node, list):
            return [self._literal(item, f"{key}{SEPARATOR}{index}", seen) for index, item in enumerate(node)]
        if not isinstance(node, str):
            return node
        if node.startswith("$"):
            raise PTQError(f"Bundle config {self.path.name} key '{key}' is a Python expression ({_short(node)}), "
                           f"which SlicerPTQ does not run from a model file. {TRUST_HINT}")
        if node.startswith("@"):
            target = _absolute(node[1:], key)
            if target in seen:
                raise PTQError(f"Bundle config {self.path.name} key '{key}' refers to itself through '{node}'. "
                               "Fix the reference.")
            found = self.raw(target, _MISSING)
            if found is _MISSING:
                raise PTQError(f"Bundle config {self.path.name} key '{key}' refers to '{node}', which the config "
                               "does not define. Fix the reference.")
            return self._literal(found, target, seen + (target,))
        if node.startswith("%"):
            return self._literal(self._macro(node[1:], key), key, seen)
        return node

    def _macro(self, text: str, key: str) -> Any:
        """``%file.json::id`` (a file in the bundle) or ``%id`` (this config), copied."""
        text = text.replace(OLD_SEPARATOR, SEPARATOR)
        lower = text.lower()
        for suffix in (".json", ".yaml", ".yml"):
            end = lower.find(suffix)
            if end >= 0 and (lower[end + len(suffix):] == "" or lower[end + len(suffix):].startswith(SEPARATOR)):
                file_part, ids = text[:end + len(suffix)], text[end + len(suffix) + len(SEPARATOR):]
                source = self._bundle_file(file_part, key)
                found = BundleConfig(read_structured(source), source, self.bundle_root).raw(ids, _MISSING) \
                    if ids else read_structured(source)
                break
        else:
            found = self.raw(_absolute(text, key), _MISSING)
        if found is _MISSING:
            raise PTQError(f"Bundle config {self.path.name} key '{key}' copies '%{text}', which does not exist. "
                           "Fix the macro.")
        return copy.deepcopy(found)

    def _bundle_file(self, name: str, key: str) -> Path:
        root = self.bundle_root.resolve()
        for base in (root, self.path.parent.resolve()):
            candidate = (base / name).resolve()
            if candidate.is_file() and (candidate == root or root in candidate.parents):
                return candidate
        raise PTQError(f"Bundle config {self.path.name} key '{key}' copies from '{name}', which is not a file "
                       f"inside the bundle {self.bundle_root}. Keep macro files inside the bundle.")


class TrustedBundleConfig(BundleConfig):
    """The same reads through MONAI's ``ConfigParser``: expressions run. Only for trusted bundles."""

    def __init__(self, path: Path, bundle_root: Path, metadata: Optional[Path] = None):
        from monai.bundle import ConfigParser

        self.parser = ConfigParser()
        try:
            self.parser.read_config(str(path))
            if metadata is not None:
                self.parser.read_meta(str(metadata))
        except Exception as exc:  # MONAI raises many kinds while reading configs
            raise PTQError(f"Cannot read bundle config {path}: {exc}. Check that it is valid JSON/YAML.") from exc
        self.parser["bundle_root"] = str(bundle_root)
        super().__init__(self.parser.get(), path, bundle_root)

    def value(self, key: str, default: Any = None) -> Any:
        if self.raw(key, _MISSING) is _MISSING:
            return default
        return self._parsed(key)

    def network(self, key: str = "network_def"):
        return self._parsed(key)

    def _parsed(self, key: str) -> Any:
        try:
            return self.parser.get_parsed_content(key)
        except Exception as exc:  # whatever the bundle's own code raises
            raise PTQError(f"Bundle config {self.path.name} key '{key}' failed to evaluate: {exc}. "
                           "Fix the bundle.") from exc


def build_network(config: BundleConfig, key: str = "network_def"):
    """The torch module ``config[key]`` describes: a network class from ``monai.networks.nets`` or
    ``torch.nn`` with literal arguments; anything else is refused naming the key."""
    description = config.value(key)
    if not isinstance(description, dict) or "_target_" not in description:
        raise PTQError(f"Bundle config {config.path.name} key '{key}' does not describe a network "
                       "(a mapping with '_target_'). Give the bundle a network_def.")
    for name, item in description.items():
        if name.startswith("_") and name not in NETWORK_KEYS:
            raise PTQError(f"Bundle config {config.path.name} key '{key}{SEPARATOR}{name}' asks MONAI to run "
                           f"the network definition in a special way, which SlicerPTQ does not do. {TRUST_HINT}")
        if name != "_target_":
            _refuse_nested_targets(item, f"{key}{SEPARATOR}{name}", config)
    if description.get("_disabled_"):
        raise PTQError(f"Bundle config {config.path.name} disables '{key}' (_disabled_). Enable it or give "
                       "another network_def.")
    network_class = network_class_named(str(description["_target_"]), f"{key}{SEPARATOR}_target_", config)
    arguments = {name: item for name, item in description.items() if name not in NETWORK_KEYS}
    try:
        return network_class(**arguments)
    except (TypeError, ValueError, AssertionError) as exc:  # MONAI checks arguments with all three
        raise PTQError(f"Bundle config {config.path.name} key '{key}' has arguments {network_class.__name__} "
                       f"does not take: {exc}. Fix network_def.") from exc


def network_class_named(target: str, key: str, config: BundleConfig):
    """The class ``target`` names (``UNet``, ``monai.networks.nets.UNet``, ``torch.nn.Conv3d``), if it is a
    torch module from MONAI's networks or torch.nn."""
    import torch
    from monai.networks import nets

    name = target.rsplit(".", 1)[-1]
    if "." not in target or target.startswith("monai.networks.nets."):
        found = getattr(nets, name, None)
    elif target.startswith("torch.nn.") and target.count(".") == 2:
        found = getattr(torch.nn, name, None)
    else:
        found = None
    if not (isinstance(found, type) and issubclass(found, torch.nn.Module)) or name.startswith("_"):
        raise PTQError(f"Bundle config {config.path.name} key '{key}' names '{target}', which is not a network "
                       f"class of monai.networks.nets or torch.nn; SlicerPTQ builds only those. {TRUST_HINT}")
    return found


def _refuse_nested_targets(node: Any, key: str, config: BundleConfig) -> None:
    if isinstance(node, dict):
        if "_target_" in node:
            raise PTQError(f"Bundle config {config.path.name} key '{key}' instantiates '{node['_target_']}' "
                           f"inside the network arguments; SlicerPTQ takes literal arguments only. {TRUST_HINT}")
        for name, item in node.items():
            _refuse_nested_targets(item, f"{key}{SEPARATOR}{name}", config)
    elif isinstance(node, list):
        for index, item in enumerate(node):
            _refuse_nested_targets(item, f"{key}{SEPARATOR}{index}", config)


class _Missing:
    pass


_MISSING = _Missing()


def _split(key: str):
    key = key.replace(OLD_SEPARATOR, SEPARATOR)
    return key.split(SEPARATOR) if key else []


def _absolute(reference: str, key: str) -> str:
    """A reference id made absolute: MONAI's relative ``::name`` (same level) / ``::::name`` (one up)."""
    reference = reference.replace(OLD_SEPARATOR, SEPARATOR)
    if not reference.startswith(SEPARATOR):
        return reference
    depth = 0
    while reference.startswith(SEPARATOR):
        reference = reference[len(SEPARATOR):]
        depth += 1
    parents = _split(key)[:-depth] if depth <= len(_split(key)) else []
    return SEPARATOR.join(parents + [reference])


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
