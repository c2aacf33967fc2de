"""The ten inner products that describe a quadruple (x1, x2 | x3, x4).

Every LoOp quantity is a function of these numbers only, so a batch needs one
matrix product and then scalar work per quadruple: nothing of size ``d`` is
built per quadruple.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor


class QuadGram(NamedTuple):
    """Inner products of a first pair (x1, x2) and a second pair (x3, x4).

    All fields broadcast against each other; any common shape ``S`` works, so
    the same maths serves ``(N,)`` quadruples and ``(K_q, K_r)`` grids.
    """

    g11: Tensor
    g12: Tensor
    g22: Tensor
    g33: Tensor
    g34: Tensor
    g44: Tensor
    g13: Tensor
    g14: Tensor
    g23: Tensor
    g24: Tensor

    def detach(self) -> "QuadGram":
        return QuadGram(*(g.detach() for g in self))


class PairWeights(NamedTuple):
    """Weights of the optimal point of each pair on its two endpoints.

    Segments: ``p = w1 * x1 + w2 * x2`` with ``w1 + w2 = 1`` (affine).
    Arcs: ``p = normalize(w1 * x1 + w2 * x2)`` with ``w1, w2 >= 0`` (conic).
    Each field has the broadcast shape ``S`` of the :class:`QuadGram`.
    """

    a1: Tensor  # weight of x1
    a2: Tensor  # weight of x2
    b1: Tensor  # weight of x3
    b2: Tensor  # weight of x4


def quad_gram(x1: Tensor, x2: Tensor, x3: Tensor, x4: Tensor) -> QuadGram:
    """Row-wise inner products of four ``(N, d)`` tensors -> ten ``(N,)`` tensors."""

    def dot(u: Tensor, v: Tensor) -> Tensor:
        return (u * v).sum(-1)

    return QuadGram(
        dot(x1, x1), dot(x1, x2), dot(x2, x2),
        dot(x3, x3), dot(x3, x4), dot(x4, x4),
        dot(x1, x3), dot(x1, x4), dot(x2, x3), dot(x2, x4),
    )


def constant(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small constant table, made once per device and dtype: building it per
    call would copy from the host, which waits for the GPU. Inside
    ``torch.compile`` it is a plain graph constant (no cache to trace)."""
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=dtype, device=device)
    return _cached_constant(values, dtype, device)


@functools.lru_cache(maxsize=64)
def _cached_constant(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def first_max(values: Tensor, index_dtype: torch.dtype = torch.int64) -> tuple[Tensor, Tensor]:
    """The largest of ``values`` ``(k, *S)`` along dim 0 and the first index
    holding it (of ``index_dtype``), each ``S`` (on a GPU any of tied ones:
    tied candidates are equally optimal points).

    On the CPU the maximum, then the first row equal to it found with a float
    comparison: there ``max(0)`` with indices costs two to five times this,
    and comparisons into boolean tensors several times float ones (torch
    2.13, measured). On a GPU, where each pass is a kernel launch, one
    ``max(0)``. Callers that compute positions from the index ask for int32:
    on the CPU, int64 arithmetic and float-to-int64 casts take two to three
    times as long as their int32 forms (``benchmarks/cpu_facts.py``).
    """
    if values.device.type != "cpu":
        best, index = values.max(0)
        return best, index.to(index_dtype)
    k = values.shape[0]
    if k <= 3:  # the pair slots of m <= 4 per class: fewer passes slice by slice
        return _first_max_of_few(values, index_dtype)
    best = values.amax(0)
    hit = torch.eq(values, best, out=torch.empty_like(values))
    rank = constant(tuple(_nested(r, best.ndim) for r in range(k, 0, -1)), values.dtype, values.device)  # (k, 1, ...)
    return best, torch.sub(scalar(float(k), best), hit.mul_(rank).amax(0)).to(index_dtype)


def _nested(value: float, depth: int):
    """``value`` inside ``depth`` one-element tuples: a constant of shape (1, ...)."""
    for _ in range(depth):
        value = (value,)
    return value


def _first_max_of_few(values: Tensor, index_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """:func:`first_max` of 1 - 3 rows: the index is the number of leading
    rows below the maximum, 0 / 1 values multiplied along."""
    if values.shape[0] == 1:
        return values[0].clone(), torch.zeros(values.shape[1:], dtype=index_dtype, device=values.device)
    first, second = values[0], values[1]
    best = torch.maximum(first, second)
    if values.shape[0] == 3:
        torch.maximum(best, values[2], out=best)
    index = torch.lt(first, best, out=torch.empty_like(best))
    if values.shape[0] == 3:
        index.addcmul_(index, torch.lt(second, best, out=torch.empty_like(best)))
    return best, index.to(index_dtype)


def steps(n: int, step: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``0, step, ..., (n - 1) step`` (positions in flattened tables), kept for
    the next call of the same shape; as :func:`constant`, made afresh inside
    ``torch.compile``."""
    if torch.compiler.is_compiling():
        return torch.arange(0, n * step, step, dtype=dtype, device=device)
    return _cached_steps(n, step, dtype, device)


@functools.lru_cache(maxsize=16)
def _cached_steps(n: int, step: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.arange(0, n * step, step, dtype=dtype, device=device)


def scalar(value: float, like: Tensor) -> Tensor:
    """``value`` as a 0-dim tensor of ``like``'s dtype and device (cached, see
    :func:`constant`): a Python number in a tensor operation such as
    ``x.mul_(0.5)`` is made into a tensor at every call, four ATen calls and
    about 1.5 us on the CPU (torch 2.13, ``benchmarks/cpu_facts.py``)."""
    return constant(value, like.dtype, like.device)


def flat_positions(row: Tensor, col: Tensor, width: int) -> Tensor:
    """Flat positions ``row * width + col`` in one operation (a Python number
    as a factor would cost a conversion to a tensor, see :func:`scalar`)."""
    return torch.add(col, row, alpha=width)


def take(x: Tensor, index: Tensor) -> Tensor:
    """``torch.take``: the entries of ``x`` (flattened) at ``index``, shaped
    like ``index``. Through ``index_select``, about twice as fast on the CPU
    for 10^4 - 10^6 indices (torch 2.13, measured); flat operands are used as
    they are (a reshape is two ATen calls even when it changes nothing)."""
    out = _flat_view(x).index_select(0, _flat_view(index))
    return out if index.dim() == 1 else out.view(index.shape)


def scatter_add(x: Tensor, index: Tensor, values: Tensor) -> None:
    """Add ``values`` to the entries of ``x`` (flattened, contiguous) at
    ``index`` (any integer dtype), in place: ``scatter_add_`` on the flat
    view, about 1.5 times as fast on the CPU as ``index_add_``."""
    x.view(-1).scatter_add_(0, _flat_view(index).long(), _flat_view(values))


def _flat_view(x: Tensor) -> Tensor:
    """``x.reshape(-1)``, as a view where it can be one (one ATen call, not two)."""
    return x if x.dim() == 1 else x.view(-1) if x.is_contiguous() else x.reshape(-1)
