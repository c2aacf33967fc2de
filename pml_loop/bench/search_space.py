"""Search dimensions in a merged config (powerful-benchmarker's suffixes).

A key ending in ``~BAYESIAN~`` (float), ``~LOG_BAYESIAN~`` (float searched
on a log scale) or ``~INT_BAYESIAN~`` (integer) with a ``[low, high]`` value
is a search dimension, at any depth: inside object kwargs
(``loss_funcs: {metric_loss: {LoOpLoss: {loss: {TripletMarginLoss:
{margin~BAYESIAN~: [0.01, 0.5]}}}}}``), at the top level
(``num_epochs_train~INT_BAYESIAN~: [2, 6]``) or in a mapping inside a list
(``Compose: {transforms: [{RandomShift: {max_shift~INT_BAYESIAN~: [0, 2]}}]}``).

This module only reads and rewrites config dicts (no optuna): finding and
checking the dimensions, and substituting a trial's values with the suffix
stripped. `search.py` runs the search.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

from .config import SEARCH_SUFFIXES, ConfigError, Provenance, split_search_key, where_of

# An element of a key path: a dict key, or an index into a list.
PathElement = Union[str, int]
Number = Union[int, float]


@dataclass(frozen=True)
class Dimension:
    """One searched setting.

    `path` leads to the search key in the merged config (list indices are
    ints; the last element is the key with its suffix); `name` is the dotted
    path without the suffix, which is the optuna parameter name and what the
    reports show; `kind` is "float", "log" or "int"; `where` is the
    ``"<file>: <dotted key>"`` that set it, for error messages.
    """

    path: tuple[PathElement, ...]
    name: str
    kind: str
    low: Number
    high: Number
    where: str

    @property
    def key(self) -> str:
        """The key the runner sees once the suffix is stripped."""
        return self.name.rsplit(".", 1)[-1]

    def midpoint(self) -> Number:
        """A value inside the bounds (geometric mean on a log scale), used
        to check the config before anything trains."""
        if self.kind == "log":
            return math.sqrt(self.low * self.high)
        if self.kind == "int":
            return (int(self.low) + int(self.high)) // 2
        return (self.low + self.high) / 2

    def describe(self) -> dict[str, Any]:
        """JSON-friendly description (stored with the study, so a resumed
        search can tell whether the search space changed)."""
        return {"kind": self.kind, "low": self.low, "high": self.high}


def iter_search_keys(node: Any, path: tuple[PathElement, ...] = ()) -> Iterator[tuple[tuple[PathElement, ...], Any]]:
    """Every ``(path, value)`` of a search key under `node`, in config order,
    through dicts and lists."""
    if isinstance(node, dict):
        for key, value in node.items():
            if split_search_key(key):
                yield path + (key,), value
            else:
                yield from iter_search_keys(value, path + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from iter_search_keys(value, path + (index,))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _bounds_problem(kind: str, value: Any) -> Optional[str]:
    suffix = next(s for s, k in SEARCH_SUFFIXES.items() if k == kind)
    example = {"float": "[0.01, 0.5]", "log": "[1.0e-5, 1.0e-2]", "int": "[2, 8]"}[kind]
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(_is_number(v) for v in value):
        return f"~{suffix}~ needs a list of two numbers [low, high] such as {example}, got {value!r}"
    low, high = value
    if kind == "int" and not all(isinstance(v, int) for v in value):
        return f"~INT_BAYESIAN~ bounds must be integers, got {value!r}; use ~BAYESIAN~ for a float"
    if low >= high:
        return f"low must be below high, got [{low}, {high}]"
    if kind == "log" and low <= 0:
        return f"~LOG_BAYESIAN~ bounds must be positive (a log scale), got [{low}, {high}]"
    return None


def _dotted(path: Sequence[PathElement]) -> str:
    return ".".join(str(p) for p in path)


def search_dimensions(cfg: Mapping[str, Any], provenance: Optional[Provenance] = None) -> list[Dimension]:
    """The checked search dimensions of a merged config, in config order.

    Raises one `ConfigError` listing every bad dimension, each naming the
    file and the key: bounds that are not two numbers (``margin~BAYESIAN~:
    abc``), low >= high, a log range reaching 0, non-integer bounds of an
    ``~INT_BAYESIAN~`` key.
    """
    dims: list[Dimension] = []
    problems: list[str] = []
    for path, value in iter_search_keys(dict(cfg)):
        base, suffix = split_search_key(path[-1])
        kind = SEARCH_SUFFIXES[suffix]
        where = where_of(provenance, [str(p) for p in path])
        problem = _bounds_problem(kind, value)
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        low, high = value
        if kind != "int":
            low, high = float(low), float(high)
        dims.append(Dimension(tuple(path), _dotted(path[:-1] + (base,)), kind, low, high, where))
    if problems:
        raise ConfigError("bad search dimension(s):\n  " + "\n  ".join(problems))
    return dims


def _container(cfg: Any, path: Sequence[PathElement]) -> Any:
    node = cfg
    for element in path:
        node = node[element]
    return node


def substitute(cfg: Mapping[str, Any], dims: Sequence[Dimension], values: Mapping[str, Number]) -> dict:
    """A copy of `cfg` with each search key replaced by its plain key holding
    ``values[dim.name]`` (an int for ``~INT_BAYESIAN~``), in the same place
    among its siblings so the saved config reads like the original."""
    out = copy.deepcopy(dict(cfg))
    for dim in dims:
        parent = _container(out, dim.path[:-1])
        value = values[dim.name]
        value = int(value) if dim.kind == "int" else float(value)
        items = list(parent.items())
        parent.clear()
        for key, old in items:
            if key == dim.path[-1]:
                parent[dim.key] = value
            else:
                parent[key] = old
    return out


def substitute_provenance(provenance: Provenance, dims: Sequence[Dimension]) -> Provenance:
    """A copy of `provenance` whose search-key paths point at the plain keys
    `substitute` writes (so errors and saved folders still find their file)."""
    out = copy.deepcopy(provenance)
    for dim in dims:
        old = tuple(str(p) for p in dim.path)
        out.rename(old, old[:-1] + (dim.key,))
    return out


def midpoint_values(dims: Sequence[Dimension]) -> dict[str, Number]:
    return {d.name: d.midpoint() for d in dims}


def bound_values(dims: Sequence[Dimension], which: str) -> dict[str, Number]:
    """Every dimension at its "low" or "high" bound."""
    return {d.name: d.low if which == "low" else d.high for d in dims}


def describe_space(dims: Sequence[Dimension]) -> dict[str, dict[str, Any]]:
    return {d.name: d.describe() for d in dims}


__all__ = [
    "Dimension",
    "bound_values",
    "describe_space",
    "iter_search_keys",
    "midpoint_values",
    "search_dimensions",
    "substitute",
    "substitute_provenance",
]
