"""Optional ``torch.compile`` of the search kernels.

The search is ~100 elementwise operations on small tensors: eager PyTorch
spends most of its time launching them, a fused kernel does not. Compiling
costs ~20 s once per process and geometry (cached on disk afterwards), so it
is opt-in; where it cannot work (no C++ compiler, unsupported platform) the
eager function is used after one warning.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

_compiled: dict[Callable, Callable] = {}
_failed: set[Callable] = set()


def maybe_compiled(fn: Callable, enabled: bool) -> Callable:
    """``fn`` compiled with dynamic shapes when ``enabled``, falling back to ``fn``."""
    if not enabled or fn in _failed:
        return fn
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True)

    def call(*args, **kwargs):
        try:
            return _compiled[fn](*args, **kwargs)
        except Exception as exc:  # a missing compiler surfaces at the first call
            _failed.add(fn)
            warnings.warn(f"torch.compile of {fn.__name__} failed ({type(exc).__name__}: {exc}); "
                          "using eager PyTorch", RuntimeWarning, stacklevel=2)
            return fn(*args, **kwargs)

    return call
