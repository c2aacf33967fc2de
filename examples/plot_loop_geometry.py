"""Draw what LoOp measures: closest points of two segments and of two arcs.

    python examples/plot_loop_geometry.py [--out loop_geometry.png]

Left: a positive pair (x1, x2) and a negative pair (x3, x4) in the plane; the
LoOp distance joins the closest points of the two segments and is shorter
than every endpoint distance. Right: the same for L2-normalised embeddings,
where the pairs span geodesic arcs of the unit sphere.
"""
from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pml_loop.functional import loop_distance, loop_params  # noqa: E402


def arc_points(a: torch.Tensor, b: torch.Tensor, n: int = 100) -> torch.Tensor:
    """``(n, 3)`` points of the shortest great-circle arc from unit a to unit b."""
    c = (a @ b).clamp(-1, 1)
    e2 = F.normalize(b - c * a, dim=0)
    t = torch.linspace(0, float(torch.arccos(c)), n)[:, None]
    return torch.cos(t) * a + torch.sin(t) * e2


def point_on_arc(a: torch.Tensor, b: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    e2 = F.normalize(b - (a @ b) * a, dim=0)
    return torch.cos(angle) * a + torch.sin(angle) * e2


def draw_segments(ax) -> None:
    x = torch.tensor([[0.0, 0.0], [3.0, 1.5], [0.4, 2.6], [2.4, 1.9]], dtype=torch.float64)
    d = loop_distance(*(x[k:k + 1] for k in range(4)), sphere=False).item()
    s, t = (v.item() for v in loop_params(*(x[k:k + 1] for k in range(4)), sphere=False))
    p, q = (1 - s) * x[0] + s * x[1], (1 - t) * x[2] + t * x[3]
    ax.plot(*x[:2].T, "-o", color="tab:blue", label="positive pair (x1, x2)")
    ax.plot(*x[2:].T, "-o", color="tab:red", label="negative pair (x3, x4)")
    for i in (0, 1):
        for j in (2, 3):
            ax.plot(*torch.stack((x[i], x[j])).T, ":", color="grey", lw=0.8)
    ends = min(float((x[i] - x[j]).norm()) for i in (0, 1) for j in (2, 3))
    ax.plot(*torch.stack((p, q)).T, "-", color="black", lw=2.5,
            label=f"LoOp distance {d:.2f} (closest endpoints {ends:.2f})")
    for k, name in enumerate(("x1", "x2", "x3", "x4")):
        ax.annotate(name, x[k].tolist(), textcoords="offset points", xytext=(5, 5))
    ax.set_title("unnormalised embeddings: segments")
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=8)


def draw_arcs(ax) -> None:
    x = F.normalize(torch.tensor([[1.0, 0.1, 0.2], [0.1, 1.0, 0.3], [0.9, 0.2, 1.1], [0.2, 0.8, 1.0]],
                                 dtype=torch.float64), dim=1)
    d = loop_distance(*(x[k:k + 1] for k in range(4)), sphere=True).item()
    a, b = loop_params(*(x[k:k + 1] for k in range(4)), sphere=True)
    p, q = point_on_arc(x[0], x[1], a[0]), point_on_arc(x[2], x[3], b[0])
    u = torch.linspace(0, 2 * torch.pi, 40)
    v = torch.linspace(0, torch.pi, 20)
    ax.plot_wireframe(torch.outer(torch.cos(u), torch.sin(v)).numpy(), torch.outer(torch.sin(u), torch.sin(v)).numpy(),
                      torch.outer(torch.ones_like(u), torch.cos(v)).numpy(), color="0.85", lw=0.4)
    for (i, j), colour, label in (((0, 1), "tab:blue", "positive arc"), ((2, 3), "tab:red", "negative arc")):
        ax.plot(*arc_points(x[i], x[j]).T.numpy(), color=colour, lw=2, label=label)
        ax.scatter(*x[[i, j]].T.numpy(), color=colour)
    ends = min(float((x[i] - x[j]).norm()) for i in (0, 1) for j in (2, 3))
    ax.plot(*torch.stack((p, q)).T.numpy(), color="black", lw=2.5,
            label=f"LoOp chord {d:.2f} (closest endpoints {ends:.2f})")
    ax.set_title("L2-normalised embeddings: geodesic arcs")
    ax.view_init(elev=25, azim=35)
    ax.legend(loc="lower left", fontsize=8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="loop_geometry.png")
    args = ap.parse_args()
    fig = plt.figure(figsize=(12, 5.5))
    draw_segments(fig.add_subplot(1, 2, 1))
    draw_arcs(fig.add_subplot(1, 2, 2, projection="3d"))
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
