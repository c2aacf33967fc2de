"""Learning-curve plots for benchmark comparisons (matplotlib, no display)."""

from __future__ import annotations

from typing import Dict, List, Mapping, Sequence, Tuple

Curve = Tuple[Sequence[int], Sequence[float]]


def plot_curves(
    curves: Mapping[str, List[Curve]],
    path: str,
    *,
    ylabel: str = "MAP@R",
    title: str = "",
) -> str:
    """One colour per label; one line per run (e.g. per seed) under it.

    `curves` maps a label (a loss) to a list of (epochs, values) runs. LoOp
    variants (labels starting with ``loop_``) are drawn solid and their plain
    counterparts dashed in the same colour, so each pair reads at a glance.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: CI and remote machines have no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = _pair_colours(list(curves))
    for label, runs in curves.items():
        style = "-" if label.startswith("loop_") else "--"
        for i, (epochs, values) in enumerate(runs):
            ax.plot(
                list(epochs), list(values), style, marker="o", markersize=3,
                color=colours[label], alpha=1.0 if len(runs) == 1 else 0.7,
                label=label if i == 0 else None,
            )
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _pair_colours(labels: Sequence[str]) -> Dict[str, str]:
    """`x` and `loop_x` share a colour."""
    palette = [f"C{i}" for i in range(10)]
    bases: List[str] = []
    for label in labels:
        base = label[len("loop_"):] if label.startswith("loop_") else label
        if base not in bases:
            bases.append(base)
    return {
        label: palette[bases.index(label[len("loop_"):] if label.startswith("loop_") else label) % 10]
        for label in labels
    }
