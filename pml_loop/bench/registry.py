"""From ``{ClassName: {kwargs}}`` to objects: one resolver, one registry.

Names are looked up, first match wins, in:

1. the user registry (`register`), so a user's class is one call away and
   may shadow a built-in name;
2. pml_loop's own modules (`pml_loop`, `pml_loop.data`,
   `pml_loop.data.transforms`, `pml_loop.models`, `pml_loop.bench.evaluation`),
   imported lazily so that a module still being written, or failing to
   import, never blocks PML's classes (its import error is shown if the name
   is found nowhere);
3. PML's losses, miners, reducers, distances, regularizers, samplers,
   testers, trainers, kNN helpers and AccuracyCalculator;
4. `torch.optim`, `torch.optim.lr_scheduler`, `torch.nn`.

A name with a dot (``my_pkg.nets.Trunk`` or ``my_pkg.nets:Trunk``) is
imported directly.

Keyword values under `NESTED_KEYS` that are themselves object specs (or lists
/ mappings of them) are built first, so
``LoOpLoss: {loss: {TripletMarginLoss: {distance: {CosineSimilarity: {}}}}}``
becomes nested objects. Every failure is a `ConfigError` whose message
starts with the config file and key path.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, TypeVar, Union, overload

from .config import ConfigError, KeyPath, Provenance, where_of

T = TypeVar("T")

PML_LOOP_MODULES: tuple[str, ...] = (
    "pml_loop",
    "pml_loop.data",
    "pml_loop.data.transforms",
    "pml_loop.models",
    "pml_loop.bench.evaluation",
)
LIBRARY_MODULES: tuple[str, ...] = (
    "pytorch_metric_learning.losses",
    "pytorch_metric_learning.miners",
    "pytorch_metric_learning.reducers",
    "pytorch_metric_learning.distances",
    "pytorch_metric_learning.regularizers",
    "pytorch_metric_learning.samplers",
    "pytorch_metric_learning.testers",
    "pytorch_metric_learning.trainers",
    "pytorch_metric_learning.utils.inference",
    "pytorch_metric_learning.utils.accuracy_calculator",
    "torch.optim",
    "torch.optim.lr_scheduler",
    "torch.nn",
)
SEARCH_MODULES: tuple[str, ...] = PML_LOOP_MODULES + LIBRARY_MODULES

# Keyword arguments whose value, when it is a spec, is an object to build.
NESTED_KEYS: frozenset[str] = frozenset(
    {
        "distance",
        "reducer",
        "reducers",
        "miner",
        "miners",
        "loss",
        "losses",
        "embedding_regularizer",
        "weight_regularizer",
        "transform",
        "transforms",
        "trunk",
        "embedder",
        "model",
        "knn_func",
        "kmeans_func",
        "accuracy_calculator",
    }
)

_USER_REGISTRY: dict[str, Any] = {}


# --------------------------------------------------------------------------
# Where an object sits in the config (for messages)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Location:
    """A key path in the merged config, printed as ``"<file>: a.b.c"``.

    With a `Provenance` the file is looked up for the deepest key, so a
    nested class set by a later file is blamed on that file; without one,
    `prefix` (any text, e.g. ``"config_x/default.yaml: loss_funcs"``) leads.
    """

    prefix: str = ""
    path: KeyPath = ()
    provenance: Optional[Provenance] = None

    def child(self, *keys: Any) -> "Location":
        return Location(self.prefix, self.path + tuple(str(k) for k in keys), self.provenance)

    def __str__(self) -> str:
        if self.provenance is not None:
            return where_of(self.provenance, self.path)
        dotted = ".".join(self.path)
        if self.prefix and dotted:
            return f"{self.prefix}.{dotted}"
        return self.prefix or dotted or "<config>"


Where = Union[str, Location]


def _location(where: Where) -> Location:
    return where if isinstance(where, Location) else Location(prefix=where)


# --------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------


@overload
def register(obj: T, name: Optional[str] = None) -> T: ...
@overload
def register(obj: None = None, name: Optional[str] = None) -> Callable[[T], T]: ...


def register(obj: Any = None, name: Optional[str] = None) -> Any:
    """Make `obj` (a class or factory function) buildable by name.

    ``register(MyLoss)``, ``@register`` and ``@register(name="Alias")`` all
    work. Registered names are searched before every built-in one, so a user
    may deliberately replace a library class; registering a name again
    replaces the earlier entry.
    """
    if obj is None:
        return lambda target: register(target, name)
    if not callable(obj):
        raise TypeError(f"register() needs a class or function, got {obj!r}")
    key = name or getattr(obj, "__name__", None)
    if not key:
        raise TypeError(f"register() cannot infer a name for {obj!r}; pass name=")
    _USER_REGISTRY[key] = obj
    return obj


def unregister(name: str) -> None:
    """Forget a name given to `register` (a missing name is ignored)."""
    _USER_REGISTRY.pop(name, None)


def registered_names() -> list[str]:
    """Names in the user registry."""
    return sorted(_USER_REGISTRY)


# --------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------


def _import(module_name: str, failures: Optional[dict[str, str]] = None) -> Optional[types.ModuleType]:
    try:
        return importlib.import_module(module_name)
    except Exception as exc:  # a half-written module must not block the others
        missing_itself = isinstance(exc, ModuleNotFoundError) and exc.name == module_name
        if failures is not None and not missing_itself:
            failures[module_name] = f"{type(exc).__name__}: {exc}"
        return None


def _public_callable(module: types.ModuleType, name: str) -> Optional[Any]:
    if name.startswith("_"):
        return None
    value = getattr(module, name, None)
    if value is None or isinstance(value, types.ModuleType) or not callable(value):
        return None
    return value


def _import_path(name: str) -> Optional[Any]:
    module_name, _, attr = name.replace(":", ".").rpartition(".")
    module = _import(module_name)
    return None if module is None else _public_callable(module, attr)


def resolve(name: str, *, where: Where = "") -> Any:
    """The class (or factory) a config name stands for; `ConfigError` with a
    close-match suggestion when there is none."""
    if name in _USER_REGISTRY:
        return _USER_REGISTRY[name]
    if "." in name or ":" in name:
        found = _import_path(name)
        if found is None:
            raise ConfigError(f"{_location(where).child(name)}: cannot import {name!r}")
        return found
    failures: dict[str, str] = {}
    for module_name in SEARCH_MODULES:
        module = _import(module_name, failures)
        if module is not None:
            found = _public_callable(module, name)
            if found is not None:
                return found
    raise ConfigError(_unknown_message(name, _location(where), failures))


def known_names() -> set[str]:
    """Every name `resolve` can find without an import path."""
    names = set(_USER_REGISTRY)
    for module_name in SEARCH_MODULES:
        module = _import(module_name)
        if module is not None:
            names.update(n for n in dir(module) if _public_callable(module, n) is not None)
    return names


def _unknown_message(name: str, where: Location, failures: Mapping[str, str]) -> str:
    matches = difflib.get_close_matches(name, sorted(known_names()), n=1, cutoff=0.6)
    message = f"{where.child(name)}: unknown class"
    if matches:
        message += f"; did you mean {matches[0]}?"
    else:
        message += "; register your own with pml_loop.bench.registry.register, or give an import path"
    for module_name, error in failures.items():
        # A pml_loop module that failed to import may be where the name lives.
        message += f"\n  (note: {module_name} did not import: {error})"
    return message


# --------------------------------------------------------------------------
# Keyword checks
# --------------------------------------------------------------------------


def accepted_kwargs(target: Any) -> tuple[list[str], bool]:
    """The keyword names `target(...)` accepts, and whether it also takes
    arbitrary ones.

    PML classes pass ``**kwargs`` up their base classes; we follow the MRO's
    ``__init__`` methods until one takes no ``**kwargs`` (torch's `Module`
    and `object` accept anything syntactically but take nothing).
    """
    names: list[str] = []
    if not inspect.isclass(target):
        return _signature_names(target, names)
    import torch

    for klass in target.__mro__:
        if klass in (object, torch.nn.Module):
            return names, False
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        names, open_ended = _signature_names(init, names)
        if not open_ended:
            return names, False
    return names, True


def _signature_names(func: Any, names: list[str]) -> tuple[list[str], bool]:
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return names, True
    open_ended = False
    for param in signature.parameters.values():
        if param.kind is param.VAR_KEYWORD:
            open_ended = True
        elif param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
            if param.name != "self" and param.name not in names:
                names.append(param.name)
    return names, open_ended


def check_kwargs(target: Any, kwargs: Iterable[str], *, where: Where = "", name: str = "") -> None:
    """`ConfigError` naming the first keyword `target` does not accept."""
    accepted, open_ended = accepted_kwargs(target)
    if open_ended:
        return
    for key in kwargs:
        if key not in accepted:
            matches = difflib.get_close_matches(key, accepted, n=1)
            hint = f"; did you mean {matches[0]}?" if matches else ""
            raise ConfigError(
                f"{_location(where).child(name or _name_of(target), key)}: unexpected keyword "
                f"for {_name_of(target)}{hint} (accepted: {', '.join(accepted) or 'none'})"
            )


def _name_of(target: Any) -> str:
    return getattr(target, "__name__", type(target).__name__)


# --------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------


def is_spec(value: Any) -> bool:
    """True for ``{Name: {kwargs}}`` / ``{Name: null}``."""
    return (
        isinstance(value, dict)
        and len(value) == 1
        and isinstance(next(iter(value)), str)
        and (next(iter(value.values())) is None or isinstance(next(iter(value.values())), dict))
    )


def split_spec(spec: Any, *, where: Where = "") -> tuple[str, dict]:
    """``{Name: kwargs}`` -> (Name, kwargs) with kwargs never None."""
    if not is_spec(spec):
        raise ConfigError(
            f"{_location(where)}: expected an object {{ClassName: {{kwargs}}}}, got {spec!r}"
        )
    name, kwargs = next(iter(spec.items()))
    return name, dict(kwargs or {})


def build(spec: Mapping[str, Optional[Mapping[str, Any]]], *, where: Where = "", **extra_kwargs: Any) -> Any:
    """Build the object ``{ClassName: {kwargs}}`` describes.

    `extra_kwargs` are added to (and win over) the config's keywords: the
    runner passes what only exists at run time (``root``, ``labels``,
    ``models``...). `where` says where the spec sits, for error messages:
    either text such as ``"config_eval/default.yaml: tester"`` or a
    `Location`.
    """
    return _build(spec, _location(where), (), extra_kwargs)


def _build(spec: Any, where: Location, args: Sequence[Any], extra_kwargs: Mapping[str, Any]) -> Any:
    name, kwargs = split_spec(spec, where=where)
    target = resolve(name, where=where)
    here = where.child(name)
    kwargs = {key: _build_nested(key, value, here.child(key)) for key, value in kwargs.items()}
    kwargs.update(extra_kwargs)
    check_kwargs(target, kwargs, where=where, name=name)
    try:
        return target(*args, **kwargs)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{here}: {name}(...) failed: {type(exc).__name__}: {exc}") from exc


def _build_nested(key: str, value: Any, where: Location) -> Any:
    if key not in NESTED_KEYS:
        return value
    if is_spec(value) and not _is_named_specs(value):
        return _build(value, where, (), {})
    if isinstance(value, list) and value and all(is_spec(item) for item in value):
        return [_build(item, where.child(index), (), {}) for index, item in enumerate(value)]
    if _is_named_specs(value):
        return {name: _build(item, where.child(name), (), {}) for name, item in value.items()}
    return value


def _is_named_specs(value: Any) -> bool:
    """``{name: {ClassName: {..}}, ..}`` (e.g. MultipleReducers' `reducers`).

    A one-entry mapping also reads as a spec whose kwargs are a spec; it is
    taken as named specs only when its key is not a class name.
    """
    if not (isinstance(value, dict) and value and all(is_spec(item) for item in value.values())):
        return False
    if len(value) > 1:
        return True
    try:
        resolve(next(iter(value)))
    except ConfigError:
        return True
    return False


def build_all(mapping: Optional[Mapping[str, Any]], *, where: Where = "", **extra_kwargs: Any) -> dict[str, Any]:
    """``{name: {ClassName: kwargs}}`` -> ``{name: object}`` (e.g. `loss_funcs`)."""
    location = _location(where)
    return {name: _build(spec, location.child(name), (), extra_kwargs) for name, spec in (mapping or {}).items()}


def build_optimizer(spec: Mapping[str, Any], params: Iterable[Any], *, where: Where = "") -> Any:
    """An optimizer from ``{Adam: {lr: ..}}`` over `params`."""
    return _build(spec, _location(where), (list(params),), {})


def build_scheduler(spec: Mapping[str, Any], optimizer: Any, *, where: Where = "") -> Any:
    """An lr scheduler from ``{StepLR: {step_size: ..}}`` driving `optimizer`."""
    return _build(spec, _location(where), (optimizer,), {})


def check_spec(spec: Any, *, where: Where = "") -> Any:
    """Resolve a spec's class and check its keyword names without building
    it (for objects that need run-time arguments: datasets, samplers,
    trainers, testers). Nested specs are built. Returns the class."""
    location = _location(where)
    name, kwargs = split_spec(spec, where=location)
    target = resolve(name, where=location)
    for key, value in kwargs.items():
        _build_nested(key, value, location.child(name, key))
    check_kwargs(target, kwargs, where=location, name=name)
    return target


# --------------------------------------------------------------------------
# Fail fast: everything buildable before training
# --------------------------------------------------------------------------

# Objects that need run-time arguments (data, labels, models): only their
# class and keyword names can be checked before training.
SIGNATURE_ONLY_KEYS: tuple[str, ...] = ("trainer", "tester", "sampler", "dataset")


def check_buildable(cfg: Mapping[str, Any], provenance: Optional[Provenance] = None) -> dict[str, Any]:
    """Build every object a config describes that can exist before training
    (models, losses, miners, transforms, accuracy calculator, optimizers and
    schedulers over a dummy parameter) and check the class and keywords of
    the rest. Raises the first `ConfigError`; returns the built objects by
    dotted key path (``"loss_funcs.metric_loss"``).

    A model whose construction fails because a local file (pretrained
    weights) is missing is checked like the run-time objects: the class and
    keyword names only, since the file may exist on the machine that trains.
    """
    import torch

    root = Location(provenance=provenance)
    built: dict[str, Any] = {}
    for name, spec in (cfg.get("models") or {}).items():
        if spec is not None:
            built[f"models.{name}"] = _build_model(spec, root.child("models", name))
    for group in ("loss_funcs", "mining_funcs"):
        for name, obj in build_all(cfg.get(group), where=root.child(group)).items():
            built[f"{group}.{name}"] = obj
    for name, spec in (cfg.get("transforms") or {}).items():
        if spec is not None:
            built[f"transforms.{name}"] = build(spec, where=root.child("transforms", name))
    if cfg.get("accuracy_calculator") is not None:
        built["accuracy_calculator"] = build(cfg["accuracy_calculator"], where=root.child("accuracy_calculator"))
    dummy = [torch.nn.Parameter(torch.zeros(1))]
    for name, spec in (cfg.get("optimizers") or {}).items():
        built[f"optimizers.{name}"] = build_optimizer(spec, dummy, where=root.child("optimizers", name))
    for name, spec in (cfg.get("lr_schedulers") or {}).items():
        optimizer = torch.optim.SGD(dummy, lr=0.1)
        built[f"lr_schedulers.{name}"] = build_scheduler(spec, optimizer, where=root.child("lr_schedulers", name))
    for key in SIGNATURE_ONLY_KEYS:
        if cfg.get(key) is not None:
            built[key] = check_spec(cfg[key], where=root.child(key))
    return built


def _build_model(spec: Any, where: Location) -> Any:
    try:
        return build(spec, where=where)
    except ConfigError as exc:
        if not _caused_by_missing_file(exc):
            raise
        return check_spec(spec, where=where)


def _caused_by_missing_file(exc: BaseException) -> bool:
    cause = exc.__cause__
    while cause is not None:
        if isinstance(cause, FileNotFoundError):
            return True
        cause = cause.__cause__
    return False


__all__ = [
    "Location",
    "SIGNATURE_ONLY_KEYS",
    "check_buildable",
    "NESTED_KEYS",
    "SEARCH_MODULES",
    "accepted_kwargs",
    "build",
    "build_all",
    "build_optimizer",
    "build_scheduler",
    "check_kwargs",
    "check_spec",
    "is_spec",
    "known_names",
    "register",
    "registered_names",
    "resolve",
    "split_spec",
    "unregister",
]
