"""pml_loop.functional against brute force, gradcheck and properties."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pml_loop.functional import loop_distance, loop_params
from reference import arc_distance, segment_distance


def _quadruples(n, d, rng, sphere):
    """Random quadruples with a share of near-degenerate cases, float64 (n, 4, d)."""
    x = rng.standard_normal((n, 4, d))
    k = n // 8
    x[0:k, 1] = x[0:k, 0]                                             # x1 = x2
    x[k:2 * k, 3] = x[k:2 * k, 2]                                     # x3 = x4
    x[2 * k:3 * k, 3] = x[2 * k:3 * k, 2] + (x[2 * k:3 * k, 1] - x[2 * k:3 * k, 0]) * 0.7 \
        + 1e-9 * rng.standard_normal((k, d))                          # (nearly) parallel
    x[3 * k:4 * k, 1] = x[3 * k:4 * k, 0] + 1e-6 * rng.standard_normal((k, d))  # tiny pair
    x[4 * k:5 * k, :, 2:] = 0                                          # coplanar (crossing possible)
    if sphere:
        # near-antipodal: from Gram entries alone the arc's plane is known to
        # eps / sin^2(angle), so sin(angle) ~ 1e-2 is as close as 1e-5 allows.
        x[5 * k:6 * k, 1] = -x[5 * k:6 * k, 0] + 1e-2 * rng.standard_normal((k, d))
        x[6 * k:6 * k + 4, 1] = -x[6 * k:6 * k + 4, 0]                 # exactly antipodal
        x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return x


@pytest.mark.parametrize("sphere", [False, True])
def test_matches_brute_force_minimiser(sphere):
    rng = np.random.default_rng(1 if sphere else 0)
    errs = []
    for d in (3, 7):  # 1,200 quadruples in all
        x = _quadruples(600, d, rng, sphere)
        xt = torch.from_numpy(x)
        got = loop_distance(xt[:, 0], xt[:, 1], xt[:, 2], xt[:, 3], sphere=sphere).numpy()
        ref = np.array([(arc_distance if sphere else segment_distance)(*q) for q in x])
        errs.append(np.abs(got - ref))
    err = np.concatenate(errs)
    assert err.max() <= 1e-5, (err.max(), int(err.argmax()))


@pytest.mark.parametrize("sphere", [False, True])
def test_parameters_are_feasible_and_attain_the_distance(sphere):
    rng = np.random.default_rng(2)
    x = torch.from_numpy(_quadruples(400, 5, rng, sphere))
    x1, x2, x3, x4 = x.unbind(1)
    d = loop_distance(x1, x2, x3, x4, sphere=sphere)
    u, v = loop_params(x1, x2, x3, x4, sphere=sphere)
    if not sphere:
        assert (u >= 0).all() and (u <= 1).all() and (v >= 0).all() and (v <= 1).all()
        p = (1 - u[:, None]) * x1 + u[:, None] * x2
        q = (1 - v[:, None]) * x3 + v[:, None] * x4
    else:
        def point(a, b, ang):
            c = (a * b).sum(1, keepdim=True)
            e2 = F.normalize(b - c * a, dim=1)
            return torch.cos(ang)[:, None] * a + torch.sin(ang)[:, None] * e2, torch.arccos(c.clamp(-1, 1)).squeeze(1)
        p, th1 = point(x1, x2, u)
        q, th2 = point(x3, x4, v)
        assert (u >= 0).all() and (u <= th1 + 1e-7).all()
        assert (v >= 0).all() and (v <= th2 + 1e-7).all()
    assert torch.allclose((p - q).norm(dim=1), d, atol=1e-6)


@pytest.mark.parametrize("sphere", [False, True])
def test_never_above_endpoint_distances_and_symmetric(sphere):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 2000, 16, generator=g, dtype=torch.float64)
    if sphere:
        x = F.normalize(x, dim=-1)
    x1, x2, x3, x4 = x
    d = loop_distance(x1, x2, x3, x4, sphere=sphere)
    ends = torch.stack([(a - b).norm(dim=1) for a in (x1, x2) for b in (x3, x4)], 1)
    assert (d <= ends.min(1).values + 1e-12).all()
    for perm in ((x3, x4, x1, x2), (x2, x1, x3, x4), (x1, x2, x4, x3), (x4, x3, x2, x1)):
        assert torch.allclose(loop_distance(*perm, sphere=sphere), d, atol=1e-10)


def test_gradcheck_segments():
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    assert torch.autograd.gradcheck(lambda *a: loop_distance(*a, sphere=False), xs)


def test_gradcheck_arcs():
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    f = lambda *a: loop_distance(*(F.normalize(t, dim=1) for t in a), sphere=True)  # noqa: E731
    assert torch.autograd.gradcheck(f, xs)


def test_danskin_gradient_matches_autograd_through_explicit_points():
    """The envelope gradient equals the gradient of |p - q| at the fixed optimum."""
    g = torch.Generator().manual_seed(6)
    xs = [torch.randn(50, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    loop_distance(*xs, sphere=False).sum().backward()
    got = [x.grad.clone() for x in xs]
    s, t = loop_params(*xs, sphere=False)
    ys = [x.detach().requires_grad_() for x in xs]
    p = (1 - s[:, None]) * ys[0] + s[:, None] * ys[1]
    q = (1 - t[:, None]) * ys[2] + t[:, None] * ys[3]
    (p - q).norm(dim=1).sum().backward()
    for a, b in zip(got, ys):
        assert torch.allclose(a, b.grad, atol=1e-8)


@pytest.mark.parametrize("sphere", [False, True])
def test_degenerate_inputs_give_finite_values_and_gradients_float32(sphere):
    v = F.normalize(torch.randn(3, 6), dim=1)
    a, b, c = v
    cases = [
        (a, a, b, b),          # two points
        (a, a, a, a),          # all equal: distance 0
        (a, b, a, b),          # identical pairs
        (a, b, b, a),
        (a, -a, b, c),         # antipodal pair
        (a, -a, b, -b),
        (a, b, a + 0.5 * (b - a), b),  # overlapping / parallel
    ]
    if not sphere:
        z = torch.zeros(6)
        cases += [(z, z, z, z), (z, a, z, b), (a, b, 2 * a, 2 * b)]
    x = torch.stack([torch.stack(q) for q in cases])
    if sphere:
        x = F.normalize(x, dim=-1)
    x.requires_grad_()
    d = loop_distance(x[:, 0], x[:, 1], x[:, 2], x[:, 3], sphere=sphere)
    d.sum().backward()
    assert torch.isfinite(d).all() and torch.isfinite(x.grad).all()
    assert d[1].item() < 1e-3


def test_input_errors_are_clear():
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="shape"):
        loop_distance(x, x, x, x[:4], sphere=False)
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        loop_distance(x[0], x[0], x[0], x[0], sphere=False)
    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        loop_distance(x, bad, x, x, sphere=False)
    with pytest.raises(ValueError, match="unit vectors"):
        loop_distance(x, x, x, x, sphere=True)
    with pytest.raises(TypeError, match="floating"):
        loop_distance(*(torch.ones(2, 2, dtype=torch.long),) * 4, sphere=False)


def test_arc_weights_are_normalised_so_gradients_stay_finite():
    """Projection weights can be ~1e-20 (a point almost orthogonal to an arc's
    plane); unnormalised, the cosine's gradient overflowed in float32 during a
    real training run (NaN embeddings after ~1,400 iterations)."""
    from pml_loop.functional import closest_arc_weights, quad_gram
    e = torch.eye(4)
    x1, x2 = e[0:1], e[1:2]
    x3 = F.normalize(e[2:3] + 1e-20 * e[0:1], dim=1)
    x4 = F.normalize(e[2:3] + e[3:4] + 1e-20 * e[1:2], dim=1)
    g = torch.Generator().manual_seed(7)
    rand = F.normalize(torch.randn(4, 500, 4, generator=g), dim=-1)
    xs = [torch.cat((a, r)) for a, r in zip((x1, x2, x3, x4), rand)]
    w = closest_arc_weights(quad_gram(*xs))
    assert torch.allclose(w.a1 + w.a2, torch.ones(501)) and torch.allclose(w.b1 + w.b2, torch.ones(501))
    leaves = [x.clone().requires_grad_() for x in xs]
    loop_distance(*leaves, sphere=True).sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in leaves)
