"""Config folders in powerful-benchmarker's YAML format: load, merge, save.

A run's configuration comes from seven folders (`config_general`,
`config_models`, ...). Each folder's files are merged in the order the user
names them, with powerful-benchmarker's merge keys:

- ``key~OVERRIDE~: value``  replace ``key`` instead of merging into it;
- ``key~APPLY~N: {..}``     merge the dict into every dict N levels below the
  dict that holds ``key`` (``key``'s own value is level 1);
- ``key~SWAP~N: {..}``      rename keys of the dicts at level N: ``{old: new}``
  renames ``old``; ``{new: {..}}`` renames the only key there (the usual
  "change the class, keep the kwargs") and merges ``{..}`` into its value;
- ``key~DELETE~: ~``        remove ``key``.

A key may also carry a hyperparameter-search suffix, ``key~BAYESIAN~``,
``key~LOG_BAYESIAN~`` or ``key~INT_BAYESIAN~`` with a ``[low, high]`` value
(see `search_space`). Merging keeps such a key as it is, but treats it as the
same setting as plain ``key``: setting one replaces the other, and
``key~DELETE~`` removes either. The suffix is stripped only when a trial's
values are substituted.

Plain dicts merge recursively; any other value replaces. While merging we
keep a `Provenance` (which file last set each key path) so that errors found
much later, when objects are built, still name the file the user must edit.
"""

from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import yaml

CONFIG_FOLDERS: tuple[str, ...] = (
    "config_general",
    "config_models",
    "config_loss_and_miners",
    "config_optimizers",
    "config_transforms",
    "config_dataset",
    "config_eval",
)
# Keys no shipped default.yaml defines are saved with the general config.
FALLBACK_FOLDER = "config_general"
SAVED_CONFIGS_DIRNAME = "configs"
PACKAGE_CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"

KeyPath = tuple[str, ...]
PathLike = Union[str, Path]


class ConfigError(ValueError):
    """A configuration problem; the message names the file and the key."""


# --------------------------------------------------------------------------
# Provenance: which file set which key
# --------------------------------------------------------------------------


@dataclass
class Provenance:
    """Where each key path of a merged config came from.

    `sources` maps a key path (tuple of keys) to a label such as
    ``"config_loss_and_miners/default.yaml"`` or ``"command line --lr"``;
    `folders` maps each top-level key to the config folder that owns it (the
    folder it is saved under).
    """

    sources: dict[KeyPath, str] = field(default_factory=dict)
    folders: dict[str, str] = field(default_factory=dict)

    def origin(self, path: Union[str, Sequence[str]]) -> Optional[str]:
        """The source of `path` or, failing that, of its nearest ancestor."""
        keys = _as_key_path(path)
        for end in range(len(keys), 0, -1):
            found = self.sources.get(keys[:end])
            if found is not None:
                return found
        return None

    def where(self, path: Union[str, Sequence[str]]) -> str:
        """``"<file>: a.b.c"``, the prefix every config error message starts with."""
        dotted = ".".join(_as_key_path(path))
        source = self.origin(path)
        return f"{source}: {dotted}" if source else dotted

    def record(self, path: KeyPath, value: Any, source: str) -> None:
        """`path` and everything below it now come from `source`."""
        self.forget(path)
        for sub_path in _key_paths(value, path):
            self.sources[sub_path] = source

    def forget(self, path: KeyPath) -> None:
        for key in [k for k in self.sources if k[: len(path)] == path]:
            del self.sources[key]

    def rename(self, old: KeyPath, new: KeyPath) -> None:
        self.forget(new)
        for key in [k for k in self.sources if k[: len(old)] == old]:
            self.sources[new + key[len(old) :]] = self.sources.pop(key)


def where_of(provenance: Optional[Provenance], path: Union[str, Sequence[str]]) -> str:
    """`Provenance.where` that also works without a provenance."""
    if provenance is None:
        return ".".join(_as_key_path(path))
    return provenance.where(path)


def _as_key_path(path: Union[str, Sequence[str]]) -> KeyPath:
    if isinstance(path, str):
        return tuple(path.split(".")) if path else ()
    return tuple(str(k) for k in path)


def _key_paths(value: Any, prefix: KeyPath) -> Iterator[KeyPath]:
    yield prefix
    if isinstance(value, dict):
        for key, sub in value.items():
            yield from _key_paths(sub, prefix + (str(key),))


# --------------------------------------------------------------------------
# YAML
# --------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: PyYAML silently keeps the last
    one, which hides half-edited configs."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    mapping: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in mapping:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
        mapping[key] = loader.construct_object(value_node, deep=deep)
    return mapping


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping
)


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text; a syntax error becomes a `ConfigError` naming `source`
    and the (1-based) line and column."""
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        position = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or str(exc)
        raise ConfigError(f"{source}{position}: broken YAML: {problem}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: broken YAML: {exc}") from exc


def load_yaml_file(path: PathLike, label: Optional[str] = None) -> dict:
    """Read one config file, which must hold a mapping (or be empty)."""
    path = Path(path)
    label = label or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{label}: config file not found") from exc
    except OSError as exc:
        raise ConfigError(f"{label}: cannot read config file: {exc}") from exc
    data = parse_yaml(text, label)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{label}: a config file must hold a mapping of keys, got {type(data).__name__}"
        )
    return data


def dump_yaml(data: Any) -> str:
    """YAML text in the block style people edit by hand, keys in config order."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


# --------------------------------------------------------------------------
# Merging with powerful-benchmarker's merge keys
# --------------------------------------------------------------------------

_MERGE_KEY = re.compile(r"^(?P<name>.*?)~(?P<op>OVERRIDE|APPLY|SWAP|DELETE)~(?P<depth>\d*)$")
_OPS_WITH_DEPTH = ("APPLY", "SWAP")
# Search suffix -> kind of dimension (powerful-benchmarker's names).
SEARCH_SUFFIXES: dict[str, str] = {"BAYESIAN": "float", "LOG_BAYESIAN": "log", "INT_BAYESIAN": "int"}
_SEARCH_KEY = re.compile(r"^(?P<name>[^~]+)~(?P<suffix>" + "|".join(SEARCH_SUFFIXES) + r")~$")


def split_search_key(key: Any) -> Optional[tuple[str, str]]:
    """``"margin~BAYESIAN~"`` -> ``("margin", "BAYESIAN")``; None for any
    other key (merge keys included)."""
    if not isinstance(key, str):
        return None
    match = _SEARCH_KEY.match(key)
    return (match.group("name"), match.group("suffix")) if match else None


def base_key(key: Any) -> Any:
    """The key a search key stands for (``margin~BAYESIAN~`` -> ``margin``);
    any other key unchanged."""
    split = split_search_key(key)
    return split[0] if split else key


@dataclass(frozen=True)
class MergeKey:
    """A parsed key: ``trainer~APPLY~2`` -> name "trainer", op "APPLY", depth 2."""

    name: str
    op: Optional[str] = None
    depth: Optional[int] = None


def parse_merge_key(key: Any, where: str = "") -> MergeKey:
    """Split a config key into its name and merge instruction."""
    if not isinstance(key, str) or "~" not in key:
        return MergeKey(key)
    if split_search_key(key):
        # a search dimension is an ordinary key while merging; its [low, high]
        # value replaces whatever was there (see _drop_variants)
        return MergeKey(key)
    match = _MERGE_KEY.match(key)
    prefix = f"{where}: " if where else ""
    if match is None or not match.group("name") or (
        "~" in match.group("name") and not split_search_key(match.group("name"))
    ):
        raise ConfigError(
            f"{prefix}{key}: unknown merge key; use key~OVERRIDE~, key~APPLY~N, "
            "key~SWAP~N or key~DELETE~ (or key~BAYESIAN~, key~LOG_BAYESIAN~, "
            "key~INT_BAYESIAN~ for a search dimension)"
        )
    op, depth = match.group("op"), match.group("depth")
    if op in _OPS_WITH_DEPTH and not depth:
        raise ConfigError(f"{prefix}{key}: ~{op}~ needs a depth, e.g. {match.group('name')}~{op}~1")
    if op not in _OPS_WITH_DEPTH and depth:
        raise ConfigError(f"{prefix}{key}: ~{op}~ takes no depth")
    if depth and int(depth) < 1:
        raise ConfigError(f"{prefix}{key}: depth must be 1 or more")
    return MergeKey(match.group("name"), op, int(depth) if depth else None)


def merge(
    base: Mapping,
    update: Mapping,
    *,
    source: str = "",
    provenance: Optional[Provenance] = None,
    _path: KeyPath = (),
) -> dict:
    """Merge `update` into a copy of `base` (neither is modified).

    Plain dicts merge recursively, other values replace, merge keys act as
    described in the module docstring. The result never contains merge keys.
    `provenance`, if given, is updated so each key path set here points at
    `source`.
    """
    result = copy.deepcopy(dict(base))
    _refuse_variants_set_twice(update, source, _path)
    for raw_key, value in update.items():
        key = parse_merge_key(raw_key, _where(source, _path))
        path = _path + (key.name,)
        if key.op in (None, "OVERRIDE"):
            # `margin: 0.2` after `margin~BAYESIAN~: [0, 1]` (or the reverse)
            # is a new value for the same setting, not a second setting
            _drop_variants(result, key.name, provenance, _path)
        if key.op is None:
            if isinstance(value, dict) and isinstance(result.get(key.name), dict):
                result[key.name] = merge(
                    result[key.name], value, source=source, provenance=provenance, _path=path
                )
            else:
                result[key.name] = _clean(value, source, path)
                _record(provenance, path, result[key.name], source)
        elif key.op == "OVERRIDE":
            result[key.name] = _clean(value, source, path)
            _record(provenance, path, result[key.name], source)
        elif key.op == "DELETE":
            variants = [k for k in result if k == key.name or base_key(k) == base_key(key.name)]
            if not variants:
                raise ConfigError(f"{_where(source, path)}~DELETE~: nothing to delete")
            for variant in variants:
                del result[variant]
                if provenance is not None:
                    provenance.forget(_path + (str(variant),))
        elif key.op == "APPLY":
            _require_dict_target(result, key, raw_key, source, _path)
            result[key.name] = _apply(
                result[key.name], value, key.depth - 1, source, provenance, path, raw_key
            )
        elif key.op == "SWAP":
            _require_dict_target(result, key, raw_key, source, _path)
            if not isinstance(value, dict):
                raise ConfigError(f"{_where(source, _path + (raw_key,))}: ~SWAP~ needs a mapping")
            result[key.name] = _swap(
                result[key.name], value, key.depth - 1, source, provenance, path, raw_key
            )
    return result


def _drop_variants(result: dict, name: Any, provenance: Optional[Provenance], parent: KeyPath) -> None:
    """Remove the keys of `result` that set the same thing as `name` under
    another spelling (plain vs search suffix, or another search suffix)."""
    for other in [k for k in result if k != name and base_key(k) == base_key(name)]:
        del result[other]
        if provenance is not None:
            provenance.forget(parent + (str(other),))


def _refuse_variants_set_twice(update: Mapping, source: str, parent: KeyPath) -> None:
    """One mapping giving both ``margin`` and ``margin~BAYESIAN~`` is
    ambiguous: which one wins would depend on the order of the lines."""
    seen: dict[Any, Any] = {}
    for raw_key in update:
        name = raw_key
        if isinstance(raw_key, str) and not split_search_key(raw_key):
            match = _MERGE_KEY.match(raw_key)
            if match is not None and match.group("op") in ("APPLY", "SWAP", "DELETE"):
                continue  # acts on a key, does not set it
            name = match.group("name") if match is not None else raw_key
        base = base_key(name)
        if base in seen:
            raise ConfigError(
                f"{_where(source, parent + (str(raw_key),))}: '{seen[base]}' and '{raw_key}' "
                "set the same key in one mapping; keep one"
            )
        seen[base] = raw_key


def _where(source: str, path: KeyPath) -> str:
    dotted = ".".join(path)
    if source and dotted:
        return f"{source}: {dotted}"
    return source or dotted


def _record(provenance: Optional[Provenance], path: KeyPath, value: Any, source: str) -> None:
    if provenance is not None:
        provenance.record(path, value, source)


def _clean(value: Any, source: str, path: KeyPath) -> Any:
    """A value being set wholesale: resolve merge keys inside it against nothing."""
    if isinstance(value, dict):
        return merge({}, value, source=source, _path=path)
    return copy.deepcopy(value)


def _require_dict_target(result: dict, key: MergeKey, raw_key: str, source: str, parent: KeyPath) -> None:
    if key.name not in result:
        raise ConfigError(
            f"{_where(source, parent + (raw_key,))}: '{key.name}' is not set by an earlier "
            f"file, so there is nothing to {key.op.lower()}"
        )
    if not isinstance(result[key.name], dict):
        raise ConfigError(
            f"{_where(source, parent + (raw_key,))}: '{key.name}' is "
            f"{type(result[key.name]).__name__}, not a mapping"
        )


def _dicts_at_depth(node: dict, depth: int, path: KeyPath) -> Iterator[tuple[dict, KeyPath]]:
    """Every dict `depth` levels below `node` (depth 0 is `node` itself)."""
    if depth == 0:
        yield node, path
        return
    for key, sub in node.items():
        if isinstance(sub, dict):
            yield from _dicts_at_depth(sub, depth - 1, path + (str(key),))


def _apply(
    target: dict,
    value: Any,
    depth: int,
    source: str,
    provenance: Optional[Provenance],
    path: KeyPath,
    raw_key: str,
) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{_where(source, path[:-1] + (raw_key,))}: ~APPLY~ needs a mapping")
    target = copy.deepcopy(target)
    hits = list(_dicts_at_depth(target, depth, path))
    if not hits:
        raise ConfigError(
            f"{_where(source, path[:-1] + (raw_key,))}: no mapping at depth {depth + 1} "
            f"below '{path[-1]}' to apply to"
        )
    for node, node_path in hits:
        merged = merge(node, value, source=source, provenance=provenance, _path=node_path)
        node.clear()
        node.update(merged)
    return target


def _swap(
    target: dict,
    renames: dict,
    depth: int,
    source: str,
    provenance: Optional[Provenance],
    path: KeyPath,
    raw_key: str,
) -> dict:
    target = copy.deepcopy(target)
    where = _where(source, path[:-1] + (raw_key,))
    hits = list(_dicts_at_depth(target, depth, path))
    if not hits:
        raise ConfigError(f"{where}: no mapping at depth {depth + 1} below '{path[-1]}' to swap keys in")
    for node, node_path in hits:
        for old, new, extra in _swap_plan(node, renames, where):
            items = list(node.items())
            node.clear()
            for key, sub in items:  # rebuild to keep the key's position
                node[new if key == old else key] = sub
            if provenance is not None:
                provenance.rename(node_path + (str(old),), node_path + (str(new),))
            if extra:
                node[new] = merge(
                    node[new] if isinstance(node[new], dict) else {},
                    extra,
                    source=source,
                    provenance=provenance,
                    _path=node_path + (str(new),),
                )
    return target


def _swap_plan(node: dict, renames: dict, where: str) -> list[tuple[Any, Any, dict]]:
    """Which (old, new, kwargs-to-merge) renames `renames` asks for in `node`."""
    if all(isinstance(v, str) for v in renames.values()):
        missing = [old for old in renames if old not in node]
        if missing:
            raise ConfigError(
                f"{where}: cannot swap {missing[0]!r}: not among {sorted(map(str, node))}"
            )
        return [(old, new, {}) for old, new in renames.items()]
    if len(renames) != 1 or len(node) != 1:
        raise ConfigError(
            f"{where}: ~SWAP~ with {{new_key: {{..}}}} needs exactly one key on each side; "
            f"found {sorted(map(str, node))}. Use {{old_key: new_key}} to pick one"
        )
    (new, extra), (old,) = next(iter(renames.items())), tuple(node)
    if extra is not None and not isinstance(extra, dict):
        raise ConfigError(f"{where}: ~SWAP~ value for {new!r} must be a mapping or a key name")
    return [(old, new, extra or {})]


# --------------------------------------------------------------------------
# Config folders
# --------------------------------------------------------------------------


def package_config_root() -> Path:
    """The shipped config folders (`pml_loop/configs`)."""
    return PACKAGE_CONFIG_ROOT


def _looks_like_path(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) or "/" in name or "\\" in name


def _label(path: Path, root: Path) -> str:
    """`config_x/name.yaml` for shipped files, the full path for the user's."""
    if root == PACKAGE_CONFIG_ROOT:
        return str(path.relative_to(PACKAGE_CONFIG_ROOT))
    return str(path)


def find_config_file(
    folder: str, name: str, root_config_folder: Optional[PathLike] = None
) -> tuple[Path, str]:
    """Locate config `name` of `folder`: a path to a YAML file, else
    ``<root_config_folder>/<folder>/<name>.yaml``, else the shipped one.

    Returns the path and the label errors will use for it.
    """
    if _looks_like_path(name):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError(f"--{folder} {name}: config file not found")
        return path, str(path)
    roots = [Path(root_config_folder).expanduser()] if root_config_folder else []
    roots.append(PACKAGE_CONFIG_ROOT)
    for root in roots:
        for suffix in (".yaml", ".yml"):
            path = root / folder / f"{name}{suffix}"
            if path.is_file():
                return path, _label(path, root)
    available = sorted(available_configs(folder, root_config_folder))
    hint = difflib.get_close_matches(name, available, n=1)
    suggestion = f"; did you mean {hint[0]}?" if hint else ""
    searched = ", ".join(str(root / folder) for root in roots)
    raise ConfigError(
        f"--{folder} {name}: no {name}.yaml in {searched}{suggestion} "
        f"(available: {', '.join(available) or 'none'})"
    )


def available_configs(folder: str, root_config_folder: Optional[PathLike] = None) -> set[str]:
    """Names usable with ``--<folder>``: shipped files plus the user's."""
    roots = [PACKAGE_CONFIG_ROOT]
    if root_config_folder:
        roots.append(Path(root_config_folder).expanduser())
    return {
        path.stem
        for root in roots
        if (root / folder).is_dir()
        for path in (root / folder).iterdir()
        if path.suffix in (".yaml", ".yml")
    }


def merge_folder(
    folder: str,
    names: Sequence[str],
    root_config_folder: Optional[PathLike] = None,
    provenance: Optional[Provenance] = None,
) -> dict:
    """Merge the files `names` of one config folder, in order."""
    if isinstance(names, str):
        names = [names]
    merged: dict = {}
    for name in names:
        path, label = find_config_file(folder, str(name), root_config_folder)
        merged = merge(merged, load_yaml_file(path, label), source=label, provenance=provenance)
    return merged


@dataclass
class FolderConfigs:
    """The merged config of each folder (what is saved), plus provenance."""

    by_folder: dict[str, dict]
    provenance: Provenance

    def merged(self) -> dict:
        """One dict with every folder's top-level keys."""
        combined: dict = {}
        for folder in self.by_folder:
            combined.update(copy.deepcopy(self.by_folder[folder]))
        return combined

    def apply_overrides(self, overrides: Mapping[str, Any], label_prefix: str = "command line") -> None:
        """Merge each ``--key value`` into the top-level `key` of the folder
        that owns it (config_general when no folder has it), so the saved
        folders reproduce the run."""
        for raw_key, value in overrides.items():
            key = parse_merge_key(raw_key, f"{label_prefix} --{raw_key}")
            folder = self.provenance.folders.get(base_key(key.name), FALLBACK_FOLDER)
            self.by_folder.setdefault(folder, {})
            self.by_folder[folder] = merge(
                self.by_folder[folder],
                {raw_key: value},
                source=f"{label_prefix} --{raw_key}",
                provenance=self.provenance,
            )
            if key.op != "DELETE":
                self.provenance.folders[base_key(key.name)] = folder


def load_config_folders(
    names_by_folder: Mapping[str, Sequence[str]],
    root_config_folder: Optional[PathLike] = None,
    overrides: Optional[Mapping[str, Any]] = None,
) -> FolderConfigs:
    """Merge every config folder (``default`` for a folder not named), then
    the command-line overrides."""
    unknown = set(names_by_folder) - set(CONFIG_FOLDERS)
    if unknown:
        raise ConfigError(f"unknown config folder(s) {sorted(unknown)}; expected {list(CONFIG_FOLDERS)}")
    provenance = Provenance()
    by_folder: dict[str, dict] = {}
    for folder in CONFIG_FOLDERS:
        names = names_by_folder.get(folder) or ["default"]
        by_folder[folder] = merge_folder(folder, names, root_config_folder, provenance)
        _claim_keys(provenance, folder, by_folder[folder])
    configs = FolderConfigs(by_folder, provenance)
    if overrides:
        configs.apply_overrides(overrides)
    return configs


def _claim_keys(provenance: Provenance, folder: str, config: dict) -> None:
    for key in config:
        # keyed by the base name: `seed~INT_BAYESIAN~` belongs where `seed` does
        owner = provenance.folders.setdefault(base_key(key), folder)
        if owner != folder:
            raise ConfigError(
                f"{provenance.origin([key])}: top-level key '{key}' is also set by {owner}; "
                "each key belongs to one config folder"
            )


# --------------------------------------------------------------------------
# Saved configs (for --resume_training, --evaluate, --reproduce_results)
# --------------------------------------------------------------------------


def saved_configs_dir(experiment_dir: PathLike) -> Path:
    """``<experiment_dir>/configs``; also accepts that folder itself."""
    path = Path(experiment_dir).expanduser()
    if path.name == SAVED_CONFIGS_DIRNAME and not (path / SAVED_CONFIGS_DIRNAME).is_dir():
        return path
    return path / SAVED_CONFIGS_DIRNAME


def has_saved_config(experiment_dir: PathLike) -> bool:
    directory = saved_configs_dir(experiment_dir)
    return any((directory / f"{folder}.yaml").is_file() for folder in CONFIG_FOLDERS)


def split_by_folder(cfg: Mapping[str, Any], provenance: Provenance) -> dict[str, dict]:
    """The merged config cut back into its folders (by `provenance.folders`)."""
    by_folder: dict[str, dict] = {folder: {} for folder in CONFIG_FOLDERS}
    for key, value in cfg.items():
        by_folder[provenance.folders.get(base_key(key), FALLBACK_FOLDER)][key] = copy.deepcopy(value)
    return by_folder


def save_config(cfg: Mapping[str, Any], provenance: Provenance, experiment_dir: PathLike) -> Path:
    """Write each folder's part of the merged config to
    ``<experiment_dir>/configs/<folder>.yaml`` (e.g. ``configs/config_general.yaml``)
    and return that folder."""
    directory = saved_configs_dir(experiment_dir)
    directory.mkdir(parents=True, exist_ok=True)
    for folder, part in split_by_folder(cfg, provenance).items():
        (directory / f"{folder}.yaml").write_text(dump_yaml(part), encoding="utf-8")
    return directory


def load_saved_folders(experiment_dir: PathLike) -> FolderConfigs:
    """The per-folder configs `save_config` wrote (provenance points at them)."""
    directory = saved_configs_dir(experiment_dir)
    if not directory.is_dir():
        raise ConfigError(f"{directory}: no saved config folder")
    provenance = Provenance()
    by_folder: dict[str, dict] = {}
    for folder in CONFIG_FOLDERS:
        path = directory / f"{folder}.yaml"
        if not path.is_file():
            raise ConfigError(f"{path}: saved config file missing")
        by_folder[folder] = merge({}, load_yaml_file(path), source=str(path), provenance=provenance)
        _claim_keys(provenance, folder, by_folder[folder])
    return FolderConfigs(by_folder, provenance)


def load_saved_config(experiment_dir: PathLike) -> tuple[dict, Provenance]:
    """Reload a saved config: ``(merged cfg, provenance)``. `experiment_dir`
    may be the experiment folder or its ``configs`` folder."""
    configs = load_saved_folders(experiment_dir)
    return configs.merged(), configs.provenance


# --------------------------------------------------------------------------
# Validation against SCHEMA.md
# --------------------------------------------------------------------------


def _is_spec(value: Any) -> bool:
    """An object spec: ``{ClassName: {kwargs}}`` (kwargs may be empty/null)."""
    return (
        isinstance(value, dict)
        and len(value) == 1
        and isinstance(next(iter(value)), str)
        and (next(iter(value.values())) is None or isinstance(next(iter(value.values())), dict))
    )


def _spec_error(value: Any) -> Optional[str]:
    if _is_spec(value):
        return None
    if isinstance(value, dict) and len(value) > 1:
        # Typical cause: a later file merged a different class into the same key.
        return (
            f"expected one class name, got {len(value)} ({', '.join(map(str, value))}); "
            "to change the class use key~OVERRIDE~ or key~SWAP~N instead of a plain merge"
        )
    return f"expected an object {{ClassName: {{kwargs}}}}, got {value!r}"


def _optional_spec_error(value: Any) -> Optional[str]:
    return None if value is None else _spec_error(value)


def _spec_map_error(value: Any, allow_empty: bool) -> Optional[str]:
    if value is None and allow_empty:
        return None
    if not isinstance(value, dict):
        return f"expected a mapping of name -> {{ClassName: {{kwargs}}}}, got {value!r}"
    if not value and not allow_empty:
        return "must define at least one entry"
    for name, spec in value.items():
        problem = _spec_error(spec)
        if problem:
            return f"{name}: {problem}"
    return None


def _int_error(value: Any, minimum: int, allow_none: bool = False) -> Optional[str]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        bound = f"an integer >= {minimum}" + (" or null" if allow_none else "")
        return f"expected {bound}, got {value!r}"
    return None


def _models_error(value: Any) -> Optional[str]:
    if not isinstance(value, dict) or "trunk" not in value:
        return f"expected {{trunk: {{..}}, embedder: {{..}}}}, got {value!r}"
    for name, spec in value.items():
        problem = _optional_spec_error(spec) if name == "embedder" else _spec_error(spec)
        if problem:
            return f"{name}: {problem}"
    return None


def _transforms_error(value: Any) -> Optional[str]:
    if not isinstance(value, dict):
        return f"expected {{train: .., eval: ..}}, got {value!r}"
    for name in value:
        if name not in ("train", "eval"):
            return f"{name}: unknown transform set; use train and eval"
        problem = _optional_spec_error(value[name])
        if problem:
            return f"{name}: {problem}"
    return None


def _splits_error(value: Any) -> Optional[str]:
    if not isinstance(value, dict):
        return f"expected {{num_folds: N, folds: [..]}}, got {value!r}"
    folds_problem = _int_error(value.get("num_folds"), 2)
    if folds_problem:
        return f"num_folds: {folds_problem}"
    folds = value.get("folds")
    if not isinstance(folds, list) or not folds or not all(
        isinstance(f, int) and not isinstance(f, bool) and 0 <= f < value["num_folds"] for f in folds
    ):
        return f"folds: expected a non-empty list of fold indices in [0, {value['num_folds']}), got {folds!r}"
    return None


def _device_error(value: Any) -> Optional[str]:
    if isinstance(value, str) and (value in ("auto", "cpu") or re.fullmatch(r"cuda(:\d+)?", value)):
        return None
    return f"expected auto, cpu, cuda or cuda:N, got {value!r}"


def _str_list_error(value: Any) -> Optional[str]:
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return None
    return f"expected a non-empty list of names, got {value!r}"


def _bool_error(value: Any) -> Optional[str]:
    return None if isinstance(value, bool) else f"expected true or false, got {value!r}"


def _str_error(value: Any) -> Optional[str]:
    return None if isinstance(value, str) and value else f"expected a name, got {value!r}"


def _mixed_precision_error(value: Any) -> Optional[str]:
    from .precision import config_error  # precision imports this module

    return config_error(value)


# Top-level key -> check returning a problem or None. Mirrors SCHEMA.md.
SCHEMA_CHECKS = {
    "trainer": _spec_error,
    "num_epochs_train": lambda v: _int_error(v, 1),
    "save_interval": lambda v: _int_error(v, 1),
    "patience": lambda v: _int_error(v, 0, allow_none=True),
    "check_untrained_accuracy": _bool_error,
    "seed": lambda v: _int_error(v, 0),
    "device": _device_error,
    "num_threads": lambda v: _int_error(v, 1, allow_none=True),
    "splits": _splits_error,
    "dataset": _spec_error,
    "models": _models_error,
    "loss_funcs": lambda v: _spec_map_error(v, allow_empty=False),
    "mining_funcs": lambda v: _spec_map_error(v, allow_empty=True),
    "sampler": _optional_spec_error,
    "optimizers": lambda v: _spec_map_error(v, allow_empty=False),
    "lr_schedulers": lambda v: _spec_map_error(v, allow_empty=True),
    "transforms": _transforms_error,
    "tester": _spec_error,
    "accuracy_calculator": _spec_error,
    "eval_primary_metric": _str_error,
    "splits_to_eval": _str_list_error,
    "mixed_precision": _mixed_precision_error,  # optional: absent = float32
    # optional: absent = none
    "splits_to_eval_at_best": lambda v: None if v is None or v == [] else _str_list_error(v),
}
# Keys that may be absent (configs saved before they existed stay valid).
OPTIONAL_KEYS: tuple[str, ...] = ("mixed_precision", "splits_to_eval_at_best")
REQUIRED_KEYS: tuple[str, ...] = tuple(k for k in SCHEMA_CHECKS if k not in OPTIONAL_KEYS)
SCHEMA_KEYS: tuple[str, ...] = tuple(SCHEMA_CHECKS)


def validate_config(
    cfg: Mapping[str, Any],
    provenance: Optional[Provenance] = None,
    *,
    allow_unknown: bool = False,
) -> None:
    """Check the merged config against SCHEMA.md: every required top-level
    key present with the right shape, and (unless `allow_unknown`) no unknown
    top-level key, which is nearly always a typo in an override.

    Raises one `ConfigError` listing every problem, each prefixed with the
    file that set the key.
    """
    problems: list[str] = []
    for key, check in SCHEMA_CHECKS.items():
        if key not in cfg:
            if key in OPTIONAL_KEYS:
                continue
            folder = _expected_folder(key)
            problems.append(
                f"{key}: missing (expected in {folder}; named files such as "
                f"'--{folder} default other' are layered on 'default')"
            )
            continue
        problem = check(cfg[key])
        if problem:
            problems.append(f"{where_of(provenance, [key])}: {problem}")
    if not allow_unknown:
        for key in cfg:
            if key not in SCHEMA_CHECKS:
                hint = difflib.get_close_matches(str(key), SCHEMA_KEYS, n=1)
                suggestion = f"; did you mean {hint[0]}?" if hint else ""
                problems.append(f"{where_of(provenance, [key])}: unknown top-level key{suggestion}")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def _expected_folder(key: str) -> str:
    for folder in CONFIG_FOLDERS:
        path = PACKAGE_CONFIG_ROOT / folder / "default.yaml"
        if path.is_file() and key in (load_yaml_file(path) or {}):
            return folder
    return FALLBACK_FOLDER


__all__ = [
    "CONFIG_FOLDERS",
    "ConfigError",
    "FolderConfigs",
    "SEARCH_SUFFIXES",
    "MergeKey",
    "OPTIONAL_KEYS",
    "Provenance",
    "REQUIRED_KEYS",
    "SCHEMA_KEYS",
    "available_configs",
    "base_key",
    "dump_yaml",
    "find_config_file",
    "has_saved_config",
    "load_config_folders",
    "load_saved_config",
    "load_saved_folders",
    "load_yaml_file",
    "merge",
    "merge_folder",
    "package_config_root",
    "parse_merge_key",
    "parse_yaml",
    "save_config",
    "saved_configs_dir",
    "split_by_folder",
    "split_search_key",
    "validate_config",
    "where_of",
]
