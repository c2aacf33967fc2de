"""One progress bar per run, in place of PML's bar per epoch and per split.

PML's trainer opens a tqdm bar every epoch and its tester one per split and
evaluation, with no option to turn them off; redirected to a file they
fill it with carriage-return updates (917 KB for the main job). While a run
trains, `pml_bars_silenced` points the `tqdm` those modules imported at a
disabled stand-in, and `RunProgress` shows one bar over the whole run with
its ETA.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import types
import warnings
from typing import Any, Iterator

import tqdm

# Redirected output (a log file, CI) gets an update at most this often.
NON_TTY_MIN_INTERVAL_S = 30.0


@contextlib.contextmanager
def pml_bars_silenced() -> Iterator[None]:
    """Disable the tqdm bars of every loaded PML module, restored on exit."""
    silent = types.SimpleNamespace(tqdm=functools.partial(tqdm.tqdm, disable=True))
    patched = [
        module
        for name, module in list(sys.modules.items())
        if name.startswith("pytorch_metric_learning.") and getattr(module, "tqdm", None) is tqdm
    ]
    for module in patched:
        module.tqdm = silent
    try:
        with warnings.catch_warnings():
            # PML formats the loss into its (now hidden) bar with "%.5f" % tensor
            warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True")
            yield
    finally:
        for module in patched:
            module.tqdm = tqdm


class RunProgress:
    """A bar over every training iteration of one fold, resumable midway."""

    def __init__(self, description: str, total: int, done: int = 0, enabled: bool = True):
        interactive = sys.stderr.isatty()
        self.bar = tqdm.tqdm(
            total=total, initial=done, desc=description, unit="it", disable=not enabled,
            dynamic_ncols=True, mininterval=0.1 if interactive else NON_TTY_MIN_INTERVAL_S,
            file=sys.stderr,
        )

    def step(self) -> None:
        self.bar.update(1)

    def show(self, **values: Any) -> None:
        """Values shown after the bar (the last evaluation's score)."""
        self.bar.set_postfix(values, refresh=False)

    def close(self) -> None:
        self.bar.close()

