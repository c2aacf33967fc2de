"""Helpers shared by the example notebooks (``examples/*.ipynb``).

All plotting code of the notebooks lives here, so the notebooks and
``examples/make_pictures.py`` draw the README's pictures the same way.

Environment variables read here:

- ``PML_LOOP_NOTEBOOK_SMALL=1``: the notebooks run a tiny configuration (the
  tests use it; a notebook then runs in well under a minute on 2 CPU cores).
- ``PML_LOOP_NOTEBOOK_IMAGES=DIR``: :func:`show` also writes each named
  figure to ``DIR/<name>.png`` (``make_pictures.py`` points it at
  ``examples/images``).
"""

from __future__ import annotations

import io
import math
import os
import sqlite3
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

SMALL = os.environ.get("PML_LOOP_NOTEBOOK_SMALL", "0") not in ("", "0")
IMAGE_DIR = os.environ.get("PML_LOOP_NOTEBOOK_IMAGES") or None
DISPLAY_DPI = 72  # what the notebook stores (keeps the .ipynb small)
SAVE_DPI = 100  # the PNG files under examples/images

PLAIN_COLOUR = "tab:blue"
LOOP_COLOUR = "tab:red"


# ------------------------------------------------------------------ setup
def setup(seed: int = 0) -> None:
    """Seed everything and set matplotlib defaults readable at README width."""
    import matplotlib.pyplot as plt

    torch.manual_seed(seed)
    np.random.seed(seed)
    plt.rcParams.update({
        "font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10,
        "legend.fontsize": 9, "figure.titlesize": 12, "axes.grid": False,
    })


def show(fig, name: Optional[str] = None, dpi: int = SAVE_DPI) -> None:
    """Display ``fig`` in the notebook as a modest-dpi PNG and close it; with
    ``name`` and ``PML_LOOP_NOTEBOOK_IMAGES`` set, also write
    ``<that folder>/<name>.png`` at ``dpi``. Works whatever the matplotlib backend is
    (the benchmark runner switches to Agg)."""
    import matplotlib.pyplot as plt

    if name and IMAGE_DIR:
        os.makedirs(IMAGE_DIR, exist_ok=True)
        fig.savefig(os.path.join(IMAGE_DIR, f"{name}.png"), dpi=dpi, bbox_inches="tight")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DISPLAY_DPI, bbox_inches="tight")
    plt.close(fig)
    try:
        from IPython.display import Image, display

        display(Image(buffer.getvalue()))
    except ImportError:  # plain Python: the file (if any) is the output
        pass


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------ data
def glyph_data(test_classes: Optional[int] = None, seed: int = 0):
    """The benchmark's glyph splits as tensors: 100 train ideographs in the
    training fonts, and the unseen test ideographs in held-out font families.

    Returns ``(x_train, y_train, x_test, y_test)``: float ``[N, 1, 16, 16]``
    in [0, 1] and int64 labels. ``test_classes`` keeps only that many test
    classes (chosen at random with ``seed``), for quick runs.
    """
    from pml_loop.data import KanjiGlyphs

    kwargs = dict(size=16, num_train_classes=100, holdout_faces=0.25, seed=0)
    x_train, y_train = KanjiGlyphs(split="train", **kwargs).as_tensors()
    x_test, y_test = KanjiGlyphs(split="test", **kwargs).as_tensors()
    if test_classes is not None:
        x_test, y_test = keep_classes(x_test, y_test, test_classes, seed)
    return x_train, y_train, x_test, y_test


def keep_classes(x: torch.Tensor, y: torch.Tensor, num_classes: int, seed: int = 0):
    """Only ``num_classes`` randomly chosen classes of ``(x, y)``."""
    classes = torch.unique(y)
    generator = torch.Generator().manual_seed(seed)
    chosen = classes[torch.randperm(len(classes), generator=generator)[:num_classes]]
    keep = torch.isin(y, chosen)
    return x[keep], y[keep]


def dataset_to_tensors(dataset, batch_size: int = 256) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every (transformed) sample of a map-style dataset, stacked."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


# ------------------------------------------------------------------ training
def train(
    model: torch.nn.Module,
    loss_fn: Callable,
    x,
    y: Optional[torch.Tensor] = None,
    *,
    iterations: int,
    batch_size: int = 128,
    m: int = 4,
    lr: float = 1e-3,
    miner: Optional[Callable] = None,
    seed: int = 0,
    callback: Optional[Callable[[int, torch.nn.Module], None]] = None,
    callback_every: int = 0,
) -> List[float]:
    """A plain PyTorch metric-learning loop: m-per-class batches, Adam.

    ``x`` is either a tensor of images (``y`` its labels) or a map-style
    dataset with a ``labels`` attribute (read through a DataLoader, so its
    transform runs per sample). ``miner(embeddings, labels)`` gives the
    loss an ``indices_tuple`` (a plain PML miner; a LoOpMiner goes inside
    ``LoOpLoss(..., miner=...)`` instead). ``callback(iteration, model)`` runs
    before the first step and every ``callback_every`` steps.

    Returns the loss of every iteration.
    """
    from pytorch_metric_learning.samplers import MPerClassSampler

    torch.manual_seed(seed)
    labels = y if y is not None else torch.as_tensor(np.asarray(x.labels))
    sampler = MPerClassSampler(labels, m, batch_size=batch_size, length_before_new_iter=batch_size * iterations)
    order = torch.tensor(list(iter(sampler)))
    if y is None:
        loader = iter(torch.utils.data.DataLoader(x, batch_size=batch_size, sampler=order.tolist(), drop_last=True))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    history = []
    for it in range(iterations):
        if callback is not None and callback_every and it % callback_every == 0:
            callback(it, model)
            model.train()
        if y is None:
            images, batch_labels = next(loader)
        else:
            index = order[it * batch_size:(it + 1) * batch_size]
            images, batch_labels = x[index], y[index]
        embeddings = model(images)
        if miner is not None:
            loss = loss_fn(embeddings, batch_labels, miner(embeddings, batch_labels))
        else:
            loss = loss_fn(embeddings, batch_labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
    if callback is not None and callback_every:
        callback(iterations, model)
    model.eval()
    return history


@torch.no_grad()
def embed(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Embeddings of ``x`` in eval mode (not normalised)."""
    model.eval()
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def evaluate(embeddings: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """PML's AccuracyCalculator, the test set queried against itself (every
    test sample is a query, the others are the gallery): precision@1 (=
    Recall@1 as DML papers report it), R-precision and MAP@R."""
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calculator = AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
        k="max_bin_count",
    )
    embeddings = F.normalize(embeddings, dim=1)  # the losses compare normalised embeddings
    return calculator.get_accuracy(embeddings, labels)


def nearest_neighbours(embeddings: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[len(queries), k]`` of each query's k nearest other samples
    (cosine, i.e. Euclidean on normalised embeddings)."""
    e = F.normalize(embeddings, dim=1)
    sim = e[queries] @ e.T
    sim[torch.arange(len(queries)), queries] = -float("inf")  # not itself
    return sim.topk(k, dim=1).indices


# ------------------------------------------------------------------ quickstart pictures
def plot_metric_bars(results: Mapping[str, Mapping[str, float]], pairs: Sequence[Tuple[str, str]],
                     metrics: Sequence[Tuple[str, str]] = (("precision_at_1", "R@1"),
                                                          ("mean_average_precision_at_r", "MAP@R")),
                     title: str = ""):
    """Grouped bars: one group per (plain, LoOp) pair, one panel per metric."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6))
    axes = np.atleast_1d(axes)
    width = 0.38
    positions = np.arange(len(pairs))
    for ax, (key, label) in zip(axes, metrics):
        plain = [results[p][key] for p, _ in pairs]
        loop = [results[q][key] for _, q in pairs]
        bars_p = ax.bar(positions - width / 2, plain, width, color=PLAIN_COLOUR, label="plain")
        bars_l = ax.bar(positions + width / 2, loop, width, color=LOOP_COLOUR, label="LoOp")
        for bars in (bars_p, bars_l):
            for bar in bars:
                ax.annotate(f"{bar.get_height():.3f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
        ax.set_xticks(positions, [p for p, _ in pairs], fontsize=9)
        ax.set_ylabel(f"test {label}")
        ax.set_title(f"{label} on unseen classes")
        ax.set_ylim(0, max(plain + loop) * 1.3)
        ax.legend(loc="upper center", ncol=2)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_retrieval(images: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor,
                   neighbours: Mapping[str, torch.Tensor], title: str = "", cmap: str = "gray_r"):
    """Each row: a query, then its top-k neighbours under each model.
    Correct neighbours get a green frame, wrong ones a thick red frame and a
    red cross. ``images`` is ``[N, C, H, W]`` in [0, 1]."""
    import matplotlib.pyplot as plt
    from matplotlib.gridspec import GridSpec

    names = list(neighbours)
    k = neighbours[names[0]].shape[1]
    rows = len(queries)
    cols = 1 + len(names) * (k + 1)  # query | gap + k per model
    fig = plt.figure(figsize=(0.62 * cols + 0.3, 0.72 * rows + 0.9))
    ratios = [1.0] + sum([[0.35] + [1.0] * k for _ in names], [])
    grid = GridSpec(rows, cols, figure=fig, width_ratios=ratios, wspace=0.08, hspace=0.12)

    def draw(ax, index, colour=None, wrong=False):
        image = images[index]
        if image.shape[0] == 1:
            ax.imshow(image[0].numpy(), cmap=cmap, vmin=0, vmax=1)
        else:
            ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor(colour or "black")
            spine.set_linewidth(3.5 if wrong else (1.5 if colour else 0.8))
        if wrong:
            h, w = image.shape[-2:]
            ax.plot([0, w - 1], [0, h - 1], color="red", lw=1.2, alpha=0.7)
            ax.plot([0, w - 1], [h - 1, 0], color="red", lw=1.2, alpha=0.7)

    block_edges: Dict[str, list] = {}
    for r, q in enumerate(queries.tolist()):
        ax = fig.add_subplot(grid[r, 0])
        draw(ax, q)
        if r == 0:
            ax.set_title("query", fontsize=9)
        for b, name in enumerate(names):
            idx = neighbours[name][r].tolist()
            wrong_count = 0
            for j, n in enumerate(idx):
                ax = fig.add_subplot(grid[r, 1 + b * (k + 1) + 1 + j])
                wrong = int(labels[n]) != int(labels[q])
                wrong_count += wrong
                draw(ax, n, "red" if wrong else "tab:green", wrong)
                if r == 0 and j in (0, k - 1):
                    block_edges.setdefault(name, []).append(ax.get_position())
    inch = 1.0 / fig.get_figheight()  # one inch in figure coordinates
    top = 0.0
    for name, (first, last) in block_edges.items():
        fig.text((first.x0 + last.x1) / 2, first.y1 + 0.05 * inch, f"{name}: top-{k} neighbours",
                 ha="center", va="bottom", fontsize=10)
        top = max(top, first.y1)
    totals = {name: int((labels[neighbours[name]] != labels[queries][:, None]).sum()) for name in names}
    summary = ", ".join(f"{name}: {totals[name]} of {rows * k} wrong" for name in names)
    fig.suptitle((title + "\n" if title else "") + f"red frame and cross = wrong class ({summary})",
                 fontsize=11, y=top + 0.3 * inch, va="bottom")
    return fig


def plot_image_grid(images: torch.Tensor, labels: torch.Tensor, classes: int = 6, per_class: int = 8,
                    title: str = "", cmap: str = "gray_r"):
    """``per_class`` samples of each of the first ``classes`` classes, one row per class."""
    import matplotlib.pyplot as plt

    chosen = torch.unique(labels)[:classes]
    fig, axes = plt.subplots(classes, per_class, figsize=(0.7 * per_class, 0.72 * classes + 0.4))
    for r, c in enumerate(chosen.tolist()):
        idx = torch.nonzero(labels == c).flatten()[:per_class]
        for j in range(per_class):
            ax = axes[r, j]
            ax.set_axis_off()
            if j < len(idx):
                image = images[idx[j]]
                if image.shape[0] == 1:
                    ax.imshow(image[0].numpy(), cmap=cmap, vmin=0, vmax=1)
                else:
                    ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_loss_curves(histories: Mapping[str, Sequence[float]], title: str = "training loss", smooth: int = 20):
    """Moving average of each run's loss; LoOp runs solid, plain runs dashed."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, values) in enumerate(histories.items()):
        v = np.asarray(values, dtype=float)
        w = max(1, min(smooth, len(v) // 5 or 1))
        avg = np.convolve(v, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(len(avg)) + w, avg, "-" if "LoOp" in name else "--",
                color=colours[(i // 2) % len(colours)], label=name)
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"loss (moving average of {smooth})")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------ geometry
def optimum_kind(u: float, v: float, u_max: float = 1.0, v_max: float = 1.0, tol: float = 1e-6) -> str:
    """'corner', 'edge' or 'interior' for an optimum at (u, v) of the box
    ``[0, u_max] x [0, v_max]`` (s, t for segments; arc angles for arcs)."""
    on_end = [min(abs(u), abs(u - u_max)) <= tol * max(1.0, u_max),
              min(abs(v), abs(v - v_max)) <= tol * max(1.0, v_max)]
    return {2: "corner", 1: "edge", 0: "interior"}[sum(on_end)]


def kinds_of_optima(x1, x2, x3, x4, sphere: bool, tol: float = 1e-5) -> List[str]:
    """The kind of optimum of each quadruple (rows of ``(N, d)`` tensors)."""
    from pml_loop.functional import loop_params

    u, v = loop_params(x1, x2, x3, x4, sphere=sphere)
    if sphere:
        u_max = torch.arccos((x1 * x2).sum(1).clamp(-1, 1))
        v_max = torch.arccos((x3 * x4).sum(1).clamp(-1, 1))
    else:
        u_max = v_max = torch.ones_like(u)
    return [optimum_kind(float(a), float(b), float(am), float(bm), tol)
            for a, b, am, bm in zip(u, v, u_max, v_max)]


def solve_case(points: torch.Tensor, sphere: bool) -> dict:
    """Everything the geometry pictures show about one quadruple ``points``
    ``[4, d]`` (rows x1, x2, x3, x4; unit vectors when ``sphere``).

    Keys: ``d`` (LoOp distance), ``p``, ``q`` (the closest points), ``u``,
    ``v`` (s, t or arc angles), ``kind``, ``ends`` (the 4 endpoint
    distances x1-x3, x1-x4, x2-x3, x2-x4), ``hardest_end`` (index pair of the
    endpoint hardest negative), ``grad`` ``[4, d]`` (gradient of the LoOp
    distance with respect to each endpoint, by autograd; for the sphere the
    endpoints are parametrised as normalize(v), so it is the gradient a
    network with an L2-normalised output sees).
    """
    from pml_loop.functional import loop_distance, loop_params

    x = points.detach().to(torch.float64)
    free = x.clone().requires_grad_(True)
    ends = F.normalize(free, dim=1) if sphere else free
    d = loop_distance(*(ends[k:k + 1] for k in range(4)), sphere=sphere)
    (grad,) = torch.autograd.grad(d.sum(), free)
    u, v = (float(a) for a in loop_params(*(x[k:k + 1] for k in range(4)), sphere=sphere))
    if sphere:
        p, q = point_on_arc(x[0], x[1], u), point_on_arc(x[2], x[3], v)
        u_max, v_max = float(torch.arccos(x[0] @ x[1])), float(torch.arccos(x[2] @ x[3]))
    else:
        p, q = (1 - u) * x[0] + u * x[1], (1 - v) * x[2] + v * x[3]
        u_max = v_max = 1.0
    pairs = [(0, 2), (0, 3), (1, 2), (1, 3)]
    end_d = [float((x[i] - x[j]).norm()) for i, j in pairs]
    return dict(x=x, d=float(d.detach()), p=p, q=q, u=u, v=v, u_max=u_max, v_max=v_max,
                kind=optimum_kind(u, v, u_max, v_max), ends=end_d,
                hardest_end=pairs[int(np.argmin(end_d))], grad=grad.detach())


def danskin_segment_gradients(case: dict) -> torch.Tensor:
    """Danskin's formula for segments: with p = (1-s)x1 + s x2, q = (1-t)x3 + t x4
    and u = (p - q)/|p - q|, the gradient of |p - q| at the fixed optimum
    (s, t) is (1-s)u, s u, -(1-t)u, -t u for x1..x4."""
    s, t = case["u"], case["v"]
    diff = case["p"] - case["q"]
    unit = diff / diff.norm().clamp_min(1e-12)
    return torch.stack([(1 - s) * unit, s * unit, -(1 - t) * unit, -t * unit])


def point_on_arc(a: torch.Tensor, b: torch.Tensor, angle: float) -> torch.Tensor:
    e2 = F.normalize(b - (a @ b) * a, dim=0)
    return math.cos(angle) * a + math.sin(angle) * e2


def arc_points(a: torch.Tensor, b: torch.Tensor, n: int = 60) -> torch.Tensor:
    """``(n, 3)`` points of the shorter great-circle arc from unit a to unit b."""
    angle = float(torch.arccos((a @ b).clamp(-1, 1)))
    return torch.stack([point_on_arc(a, b, t) for t in np.linspace(0, angle, n)])


NAMES = ("x1", "x2", "x3", "x4")


def _describe(case: dict, sphere: bool) -> str:
    what = "chord" if sphere else "distance"
    i, j = case["hardest_end"]
    return (f"LoOp {what} {case['d']:.2f}  vs  endpoint hardest "
            f"{min(case['ends']):.2f} ({NAMES[i]}-{NAMES[j]})")


def draw_segment_case(ax, case: dict, title: str, arrow_scale: float = 0.8) -> None:
    """2-D picture of one segment quadruple: the pairs, the endpoint hardest
    negative (dashed orange), the LoOp closest points (black) and the push
    on each endpoint (+gradient of the LoOp distance, green arrows)."""
    x = case["x"].numpy()
    ax.plot(*x[:2].T, "-o", color=PLAIN_COLOUR, lw=2, label="positive pair x1-x2")
    ax.plot(*x[2:].T, "-o", color=LOOP_COLOUR, lw=2, label="negative pair x3-x4")
    i, j = case["hardest_end"]
    ax.plot(*x[[i, j]].T, "--", color="tab:orange", lw=1.8, label="endpoint hardest negative")
    p, q = case["p"].numpy(), case["q"].numpy()
    if case["d"] > 1e-9:
        ax.plot(*np.stack([p, q]).T, "-", color="black", lw=2.5, label="LoOp distance")
    ax.plot(*np.stack([p, q]).T, "s", color="black", ms=6, label="LoOp optimal points")
    grad = case["grad"].numpy()
    for k in range(4):
        if np.linalg.norm(grad[k]) > 1e-9:
            ax.annotate("", xy=x[k] + arrow_scale * grad[k], xytext=x[k],
                        arrowprops=dict(arrowstyle="->", color="tab:green", lw=1.8))
    ax.plot([], [], color="tab:green", lw=1.8, label="push: +grad of LoOp distance")
    for k, name in enumerate(NAMES):
        ax.annotate(name, x[k], textcoords="offset points", xytext=(-14, 6), fontsize=9)
    ax.set_title(f"{title}\n(s, t) = ({case['u']:.2f}, {case['v']:.2f}); {_describe(case, False)}", fontsize=9)
    ax.set_aspect("equal")
    ax.set_xlabel("embedding dim 1")
    ax.set_ylabel("embedding dim 2")
    lo, hi = x.min(0) - 0.6, x.max(0) + 0.6
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])


def draw_arc_case(ax, case: dict, title: str, arrow_scale: float = 0.35) -> None:
    """The same on the unit sphere: geodesic arcs, chord of the optimum,
    tangent pushes."""
    x = case["x"]
    u = np.linspace(0, 2 * np.pi, 36)
    v = np.linspace(0, np.pi, 18)
    ax.plot_wireframe(np.outer(np.cos(u), np.sin(v)), np.outer(np.sin(u), np.sin(v)),
                      np.outer(np.ones_like(u), np.cos(v)), color="0.88", lw=0.4)
    for (i, j), colour, label in (((0, 1), PLAIN_COLOUR, "positive arc x1-x2"),
                                  ((2, 3), LOOP_COLOUR, "negative arc x3-x4")):
        ax.plot(*arc_points(x[i], x[j]).T.numpy(), color=colour, lw=2.2, label=label)
        ax.scatter(*x[[i, j]].T.numpy(), color=colour, s=18)
    i, j = case["hardest_end"]
    ax.plot(*x[[i, j]].T.numpy(), "--", color="tab:orange", lw=1.8, label="endpoint hardest chord")
    pq = torch.stack([case["p"], case["q"]]).numpy()
    ax.plot(*pq.T, "-", color="black", lw=2.5, label="LoOp chord")
    ax.scatter(*pq.T, color="black", marker="s", s=22)
    grad = case["grad"].numpy()
    for k in range(4):
        if np.linalg.norm(grad[k]) > 1e-9:
            ax.quiver(*x[k].numpy(), *(arrow_scale * grad[k]), color="tab:green", lw=1.6, arrow_length_ratio=0.3)
    ax.plot([], [], color="tab:green", lw=1.6, label="push: +grad (tangent)")
    for k, name in enumerate(NAMES):
        ax.text(*(x[k].numpy() * 1.08), name, fontsize=8)
    ax.set_title(f"{title}\n{_describe(case, True)}", fontsize=9)
    ax.set_box_aspect((1, 1, 1))
    ax.set_xticks([-1, 0, 1])
    ax.set_yticks([-1, 0, 1])
    ax.set_zticks([-1, 0, 1])
    ax.tick_params(labelsize=7)


def plot_geometry_cases(segment_cases: Mapping[str, dict], arc_cases: Mapping[str, dict],
                        views: Optional[Mapping[str, Tuple[float, float]]] = None):
    """Top row: segments in the plane, one per kind of optimum; bottom row: arcs."""
    import matplotlib.pyplot as plt

    n = max(len(segment_cases), len(arc_cases))
    fig = plt.figure(figsize=(4.6 * n, 9.4))
    for c, (kind, case) in enumerate(segment_cases.items()):
        draw_segment_case(fig.add_subplot(2, n, c + 1), case, f"segments, {kind} optimum")
    for c, (kind, case) in enumerate(arc_cases.items()):
        ax = fig.add_subplot(2, n, n + c + 1, projection="3d")
        draw_arc_case(ax, case, f"arcs on the sphere, {kind} optimum")
        elev, azim = (views or {}).get(kind, (20, 30))
        ax.view_init(elev=elev, azim=azim)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=4, bbox_to_anchor=(0.5, 1.0), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


# ------------------------------------------------------------------ negative distances
@torch.no_grad()
def negative_distances(embeddings: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """For every negative entry (i, j), i < j, of a batch: the plain distance
    between the normalised embeddings, and the LoOp distance (the closest
    points of the arc through i's positive pair and the arc through j's)."""
    from pytorch_metric_learning.distances import LpDistance

    from pml_loop import LoOpDistance

    plain = LpDistance(normalize_embeddings=True)(embeddings)
    loop = LoOpDistance(LpDistance(normalize_embeddings=True)).loop_mat(embeddings, labels)
    negative = (labels[:, None] != labels[None, :]).triu(1)
    return plain[negative], loop[negative]


def batch_optimum_kinds(embeddings: torch.Tensor, labels: torch.Tensor, max_quads: int = 4000,
                        seed: int = 0) -> Dict[str, float]:
    """Fraction of corner / edge / interior optima among the negative entries
    of a batch (each entry with the partners that realise its LoOp value,
    from ``LoOpMiner(output="quadruplets")``)."""
    from pml_loop import LoOpMiner

    e = F.normalize(embeddings.detach(), dim=1)
    miner = LoOpMiner(margin=float("inf"), type_of_tuples="all", output="quadruplets")
    a, p, n, q = miner(e, labels)
    if len(a) > max_quads:
        keep = torch.randperm(len(a), generator=torch.Generator().manual_seed(seed))[:max_quads]
        a, p, n, q = a[keep], p[keep], n[keep], q[keep]
    kinds = kinds_of_optima(e[a].double(), e[p].double(), e[n].double(), e[q].double(), sphere=True)
    return {k: kinds.count(k) / max(1, len(kinds)) for k in ("corner", "edge", "interior")}


def plot_negative_histograms(snapshots: Sequence[dict], bins: int = 40):
    """One panel per snapshot (``{"iteration", "plain", "loop"}``): histogram of
    the plain and the LoOp negative distances of the same batch, means marked."""
    import matplotlib.pyplot as plt

    n = len(snapshots)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.3), sharey=False)
    axes = np.atleast_1d(axes)
    top = max(float(torch.cat([s["plain"], s["loop"]]).max()) for s in snapshots)
    edges = np.linspace(0, max(top, 1e-3) * 1.02, bins + 1)
    for ax, snap in zip(axes, snapshots):
        for values, colour, label in ((snap["plain"], PLAIN_COLOUR, "plain"), (snap["loop"], LOOP_COLOUR, "LoOp")):
            v = values.numpy()
            ax.hist(v, bins=edges, color=colour, alpha=0.5, label=f"{label} (mean {v.mean():.2f})")
            ax.axvline(v.mean(), color=colour, lw=1.5)
        ax.set_title(f"iteration {snap['iteration']}")
        ax.set_xlabel("negative distance (chord, normalised)")
        ax.legend(fontsize=8, loc="upper left")
    axes[0].set_ylabel("negative entries")
    fig.suptitle("Negative distances of one fixed batch: plain vs LoOp, during training")
    fig.tight_layout()
    return fig


def plot_negative_trends(snapshots: Sequence[dict]):
    """Left: mean plain and LoOp negative distance (and their gap) over
    training; right: kinds of optimum over training, when recorded."""
    import matplotlib.pyplot as plt

    its = [s["iteration"] for s in snapshots]
    has_kinds = all("kinds" in s for s in snapshots)
    fig, axes = plt.subplots(1, 2 if has_kinds else 1, figsize=(10.5 if has_kinds else 5.5, 3.5))
    axes = np.atleast_1d(axes)
    ax = axes[0]
    mean_plain = [float(s["plain"].mean()) for s in snapshots]
    mean_loop = [float(s["loop"].mean()) for s in snapshots]
    ax.plot(its, mean_plain, "-o", color=PLAIN_COLOUR, ms=4, label="plain: mean negative distance")
    ax.plot(its, mean_loop, "-o", color=LOOP_COLOUR, ms=4, label="LoOp: mean negative distance")
    ax.plot(its, np.subtract(mean_plain, mean_loop), "-o", color="black", ms=4, label="gap (plain - LoOp)")
    ax.set_xlabel("training iteration")
    ax.set_ylabel("distance")
    ax.set_title("How far LoOp moves the negatives")
    ax.legend(fontsize=8)
    if has_kinds:
        ax = axes[1]
        for kind, colour in (("corner", "tab:gray"), ("edge", "tab:purple"), ("interior", "tab:green")):
            ax.plot(its, [100 * s["kinds"][kind] for s in snapshots], "-o", ms=4, color=colour, label=kind)
        ax.set_xlabel("training iteration")
        ax.set_ylabel("% of negative entries")
        ax.set_ylim(0, 100)
        ax.set_title("Where the LoOp optimum lies (128-d arcs)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------ benchmark runs
def read_accuracy_log(fold_folder: os.PathLike, split: str = "test") -> Dict[str, np.ndarray]:
    """record-keeper's accuracy table of one split from ``fold_folder/saved_csvs/logs.db``:
    ``{"epoch": ..., "mean_average_precision_at_r": ..., "recall_at_1": ...}``
    (the ``_level0`` suffix dropped), rows ordered by epoch."""
    db = Path(fold_folder) / "saved_csvs" / "logs.db"
    with sqlite3.connect(db) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        table = next(t for t in tables if t.startswith("accuracies") and t.endswith(f"_{split.upper()}_vs_self"))
        cursor = conn.execute(f"SELECT * FROM [{table}] ORDER BY epoch")
        columns = [c[0] for c in cursor.description]
        rows = cursor.fetchall()
    out = {}
    for k, name in enumerate(columns):
        if name in ("id", "~iteration~"):
            continue
        values = [r[k] for r in rows]
        if all(isinstance(v, (int, float)) for v in values):
            out[name.replace("_level0", "")] = np.asarray(values, dtype=float)
    return out


def read_table(fold_folder: os.PathLike, table: str) -> Dict[str, np.ndarray]:
    """Any numeric record-keeper table of ``logs.db`` (e.g. ``timing``,
    ``metric_loss_LoOpLoss``) as columns; empty if it is not there."""
    db = Path(fold_folder) / "saved_csvs" / "logs.db"
    with sqlite3.connect(db) as conn:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name=?", (table,)).fetchone():
            return {}
        cursor = conn.execute(f"SELECT * FROM [{table}] ORDER BY [~iteration~]")
        columns = [c[0] for c in cursor.description]
        rows = cursor.fetchall()
    return {name: np.asarray([np.nan if r[k] is None else r[k] for r in rows], dtype=float)
            for k, name in enumerate(columns)
            if rows and all(isinstance(r[k], (int, float, type(None))) for r in rows)}


def plot_benchmark_curves(logs: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]],
                          metrics: Sequence[Tuple[str, str]] = (("mean_average_precision_at_r", "MAP@R"),
                                                               ("recall_at_1", "R@1"))):
    """``logs[run][split]`` = :func:`read_accuracy_log`; one panel per metric,
    test solid and val dotted, plain blue and LoOp red."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 3.8))
    axes = np.atleast_1d(axes)
    for ax, (key, label) in zip(axes, metrics):
        for run, splits in logs.items():
            colour = LOOP_COLOUR if run.startswith("loop") else PLAIN_COLOUR
            for split, style in (("test", "-o"), ("val", ":s")):
                if split in splits and key in splits[split]:
                    ax.plot(splits[split]["epoch"], splits[split][key], style, color=colour, ms=4,
                            alpha=1.0 if split == "test" else 0.7, label=f"{run} ({split})")
        ax.set_xlabel("epoch (0 = untrained)")
        ax.set_ylabel(label)
        ax.set_title(f"{label} per epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def load_run_model(experiment_dir: os.PathLike, sample: torch.Tensor, which: str = "best", fold: int = 0):
    """The trunk + embedder of a runner experiment, from its saved config and
    ``checkpoint_<which>.pth``, as one ``nn.Sequential`` in eval mode."""
    from pml_loop.bench import checkpoint, config, runner

    cfg, _ = config.load_saved_config(experiment_dir)
    models = runner.build_models(cfg, sample, torch.device("cpu"))
    folder = os.path.join(runner.fold_dir(str(experiment_dir), fold), "saved_models")
    saved = checkpoint.load_checkpoint(folder, which)
    for name, module in models.items():
        module.load_state_dict(saved["models"][name])
    return torch.nn.Sequential(models["trunk"], models["embedder"]).eval()


def pca_2d(embeddings: torch.Tensor) -> torch.Tensor:
    """The first two principal components of the normalised embeddings."""
    e = F.normalize(embeddings, dim=1).double()
    e = e - e.mean(0)
    _, _, v = torch.linalg.svd(e, full_matrices=False)
    return (e @ v[:2].T).float()


def plot_projections(projections: Mapping[str, Tuple[torch.Tensor, torch.Tensor]], title: str = ""):
    """One panel per model: 2-D points coloured by class."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(projections), figsize=(4.6 * len(projections), 4.4))
    axes = np.atleast_1d(axes)
    cmap = plt.get_cmap("tab10")
    for ax, (name, (points, labels)) in zip(axes, projections.items()):
        classes = torch.unique(labels).tolist()
        for c, cls in enumerate(classes):
            mask = labels == cls
            ax.scatter(points[mask, 0], points[mask, 1], s=18, color=cmap(c % 10), alpha=0.85,
                       edgecolors="none")
        ax.set_title(name)
        ax.set_xlabel("principal component 1")
        ax.set_ylabel("principal component 2")
    fig.suptitle(title or "Test embeddings (unseen classes), 2-D PCA, one colour per class")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------ a fake CUB-200 tree
SHAPES = ("disc", "square", "triangle", "cross", "ring")
COLOURS = ((200, 40, 40), (40, 140, 40), (40, 70, 200), (210, 160, 20))


def make_fake_cub(root: os.PathLike, train_classes: int = 10, test_classes: int = 10,
                  per_class: int = 16, size: int = 48, seed: int = 0) -> Path:
    """Write a tiny dataset in CUB-200-2011's layout under ``root``::

        root/CUB_200_2011/images.txt              "<image id> <relative path>"
        root/CUB_200_2011/image_class_labels.txt  "<image id> <class id>"
        root/CUB_200_2011/images/<NNN.Name>/<file>.jpg

    Class ids 1.. are train classes and 101.. test classes (CUB's split:
    1-100 train, 101-200 test). Each class is a (shape, colour) pair drawn at
    a random place, size and rotation on a noisy background, so classes are
    learnable but not trivially separable. Returns ``root``.
    """
    from PIL import Image, ImageDraw

    root = Path(root)
    base = root / "CUB_200_2011"
    combos = [(s, c) for c in range(len(COLOURS)) for s in range(len(SHAPES))]
    if train_classes + test_classes > len(combos):
        raise ValueError(f"at most {len(combos)} classes")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(combos))
    ids = list(range(1, train_classes + 1)) + list(range(101, 101 + test_classes))
    lines, labels = [], []
    image_id = 1
    for class_id, combo in zip(ids, order):
        shape, colour = combos[combo]
        folder = f"{class_id:03d}.{SHAPES[shape].title()}_{class_id}"
        for k in range(per_class):
            background = tuple(int(v) for v in rng.integers(150, 256, size=3))
            image = Image.new("RGB", (size, size), background)
            draw = ImageDraw.Draw(image)
            r = size * rng.uniform(0.18, 0.32)
            cx, cy = rng.uniform(r + 2, size - r - 2, size=2)
            tint = tuple(int(np.clip(c + rng.integers(-40, 41), 0, 255)) for c in COLOURS[colour])
            angle = rng.uniform(0, 2 * np.pi)
            corners = lambda n: [(cx + r * np.cos(angle + 2 * np.pi * i / n),  # noqa: E731
                                  cy + r * np.sin(angle + 2 * np.pi * i / n)) for i in range(n)]
            if SHAPES[shape] == "disc":
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tint)
            elif SHAPES[shape] == "ring":
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=tint, width=max(2, int(r / 3)))
            elif SHAPES[shape] == "square":
                draw.polygon(corners(4), fill=tint)
            elif SHAPES[shape] == "triangle":
                draw.polygon(corners(3), fill=tint)
            else:  # cross
                for a in (angle, angle + np.pi / 2):
                    dx, dy = r * np.cos(a), r * np.sin(a)
                    draw.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=tint, width=max(2, int(r / 2.5)))
            pixels = np.asarray(image, dtype=np.int16) + rng.integers(-6, 7, size=(size, size, 3))
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            relative = f"{folder}/{folder.split('.')[1]}_{k:04d}.jpg"
            (base / "images" / folder).mkdir(parents=True, exist_ok=True)
            image.save(base / "images" / relative, quality=90)
            lines.append(f"{image_id} {relative}")
            labels.append(f"{image_id} {class_id}")
            image_id += 1
    (base / "images.txt").write_text("\n".join(lines) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    return root
