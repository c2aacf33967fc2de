"""The grid search and the per-entry optimum (``functional/grid.py``) against
brute force on explicit points, and the backward's shortcuts against the
plain computation."""
import pytest
import torch
import torch.nn.functional as F

from pml_loop.functional import QuadGram, arc_cosine, best_candidate
from pml_loop.functional.gram import first_max
from pml_loop.functional.grid import arc_entry_optimum, arc_grid_values, dot_grid_values, segment_grid_values
from reference import arc_distance, segment_distance


def _pairs(seed, n, d, sphere, degenerate=True):
    """``(2, n, d)`` ends of n pairs, some coincident, antipodal or nearly flat."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, d, generator=g, dtype=torch.float64)
    if sphere:
        x = F.normalize(x, dim=-1)
    if degenerate:
        x[1, 0] = x[0, 0]  # a point
        x[1, 1] = -x[0, 1]  # antipodal (a segment through the origin)
        x[1, 2] = x[0, 2] + 1e-9 * torch.randn(d, generator=g, dtype=torch.float64)
        if sphere:
            x[1, 2] = F.normalize(x[1, 2], dim=0)
    return x


def _cross(a, b):
    ends_a, ends_b = torch.cat((a[0], a[1])), torch.cat((b[0], b[1]))
    return ends_a @ ends_b.T  # (2R, 2C)


@pytest.mark.parametrize("d", [2, 3, 7])
def test_arc_grid_matches_brute_force(d):
    a, b = _pairs(0, 9, d, True), _pairs(1, 8, d, True)
    got = arc_grid_values(_cross(a, b), (a[0] * a[1]).sum(1), (b[0] * b[1]).sum(1))
    ref = torch.tensor([[1 - arc_distance(*(t.numpy() for t in (a[0, i], a[1, i], b[0, j], b[1, j]))) ** 2 / 2
                         for j in range(8)] for i in range(9)], dtype=torch.float64)
    assert (got - ref).abs().max() < 1e-7


@pytest.mark.parametrize("d", [2, 3, 7])
def test_symmetric_grid_is_the_plain_one(d):
    a = _pairs(2, 10, d, True)
    cross, c = _cross(a, a), (a[0] * a[1]).sum(1)
    plain = arc_grid_values(cross, c, c)
    assert (plain - plain.T).abs().max() < 1e-12  # LoOp is symmetric in the two pairs
    assert (arc_grid_values(cross, c, c, symmetric=True) - plain).abs().max() < 1e-12


@pytest.mark.parametrize("sphere", [True, False])
@pytest.mark.parametrize("symmetric", [False, True])
def test_grid_per_sample_is_the_per_end_one(symmetric, sphere):
    """Pairs sharing samples, as a class's pairs do (and points): the grid from
    the samples' inner products and the pairs' ends as positions in them is
    the grid from the ends' inner products, to the bit (arcs and segments)."""
    g = torch.Generator().manual_seed(7)
    xa = torch.randn(6, 5, generator=g, dtype=torch.float64)
    xb = xa if symmetric else torch.randn(5, 5, generator=g, dtype=torch.float64)
    if sphere:
        xa, xb = F.normalize(xa, dim=1), F.normalize(xb, dim=1)
    ends_a = torch.tensor([[0, 1], [0, 2], [1, 2], [3, 4], [5, 5], [3, 3]])
    ends_b = ends_a if symmetric else torch.tensor([[0, 1], [2, 3], [1, 3], [4, 4]])
    cross = xa @ xb.T
    per_end = cross[ends_a.T.reshape(-1)][:, ends_b.T.reshape(-1)]  # (2R, 2C)
    def own(x, ends, k, l):  # x_k . x_l of each pair
        return (x[ends[:, k]] * x[ends[:, l]]).sum(1)

    if sphere:
        c_a, c_b = own(xa, ends_a, 0, 1), own(xb, ends_b, 0, 1)
        want = arc_grid_values(per_end, c_a, c_b, symmetric)
        got = arc_grid_values(cross, c_a, c_b, symmetric, ends_a.T.contiguous(), None if symmetric else ends_b.T.contiguous())
    else:
        own_a, own_b = (torch.stack([own(x, ends, k, l) for k, l in ((0, 0), (0, 1), (1, 1))])
                        for x, ends in ((xa, ends_a), (xb, ends_b)))
        want = segment_grid_values(per_end, own_a, own_b, symmetric)
        got = segment_grid_values(cross, own_a, own_b, symmetric, ends_a.T.contiguous(), ends_b.T.contiguous(),
                                  (xa * xa).sum(1), (xb * xb).sum(1))
    assert torch.equal(got, want)
    assert got.shape == (len(ends_a), len(ends_b))


@pytest.mark.parametrize("d", [1, 2, 3, 7])
def test_segment_grid_matches_brute_force(d):
    a, b = _pairs(3, 8, d, False), _pairs(4, 7, d, False)
    own = lambda x: torch.stack(((x[0] * x[0]).sum(1), (x[0] * x[1]).sum(1), (x[1] * x[1]).sum(1)))  # noqa: E731
    got = segment_grid_values(_cross(a, b), own(a), own(b))
    ref = torch.tensor([[segment_distance(*(t.numpy() for t in (a[0, i], a[1, i], b[0, j], b[1, j]))) ** 2
                         for j in range(7)] for i in range(8)], dtype=torch.float64)
    assert (got - ref).abs().max() < 1e-6


def test_dot_grid_is_the_best_corner():
    a, b = _pairs(5, 6, 4, False), _pairs(6, 5, 4, False)
    corners = torch.stack([a[k] @ b[l].T for k in (0, 1) for l in (0, 1)])
    assert torch.allclose(dot_grid_values(_cross(a, b)), corners.amax(0), atol=1e-12)


@pytest.mark.parametrize("d", [2, 3, 16])
def test_entry_optimum_points_and_partials(d):
    """The value is the brute-force optimum, the weights give unit points whose
    cosine is that value, and the partials the backward uses are autograd's
    partials of the cosine at those fixed weights."""
    a, b = _pairs(7, 40, d, True), _pairs(8, 40, d, True)
    cross = torch.einsum("knd,lnd->kln", a, b)
    c_q, c_r = (a[0] * a[1]).sum(1), (b[0] * b[1]).sum(1)
    cos, w = arc_entry_optimum(torch.cat((torch.stack((c_r, c_q)), cross.reshape(4, -1))))
    wb, wa = w[:, 0], w[:, 1]
    q = QuadGram(c_q.new_ones(()), c_q, c_q.new_ones(()), c_r.new_ones(()), c_r, c_r.new_ones(()),
                 cross[0, 0], cross[0, 1], cross[1, 0], cross[1, 1])
    assert (cos - best_candidate(q, "arc")[0]).abs().max() < 1e-7  # the older closed form: 1e-8 in the plane
    p, r = torch.einsum("kn,knd->nd", wa, a), torch.einsum("kn,knd->nd", wb, b)
    assert (p.norm(dim=1) - 1).abs().max() < 1e-9 and (r.norm(dim=1) - 1).abs().max() < 1e-9
    assert ((p * r).sum(1) - cos).abs().max() < 1e-9
    fields = [f.clone().requires_grad_() for f in q]
    auto = torch.autograd.grad(arc_cosine(QuadGram(*fields), (wa[0], wa[1], wb[0], wb[1])).sum(),
                               [fields[1], fields[4], *fields[6:]])
    ours = [-cos * wa[0] * wa[1], -cos * wb[0] * wb[1], *(wa.unsqueeze(1) * wb.unsqueeze(0)).reshape(4, -1)]
    apart = cos < 1 - 1e-9  # crossing arcs (cosine 1) sit on arc_cosine's clamp
    assert apart.sum() > 10
    for x, y in zip(auto, ours):
        assert torch.allclose(x[apart], y[apart], atol=1e-9)


def test_first_max_takes_the_first_of_ties():
    v = torch.tensor([[1.0, 5.0, 2.0, -1.0], [3.0, 5.0, 2.0, -2.0], [3.0, 0.0, 7.0, -1.0]])
    best, which = first_max(v)
    assert best.tolist() == [3.0, 5.0, 7.0, -1.0] and which.tolist() == [1, 0, 2, 0]


@pytest.mark.parametrize("k", range(1, 10))
def test_first_max_is_the_first_maximum(k):
    """Every number of rows (1 - 3 take their own path): the maximum and the
    first row holding it, ties included, in the index type asked for."""
    g = torch.Generator().manual_seed(k)
    v = torch.randint(0, 4, (k, 5, 40), generator=g).float()  # many ties
    for dtype in (torch.int64, torch.int32):
        best, which = first_max(v, dtype)
        want = [[next(r for r in range(k) if v[r, i, j] == v[:, i, j].max()) for j in range(40)] for i in range(5)]
        assert torch.equal(best, v.amax(0)) and which.dtype == dtype and which.tolist() == want
        best.add_(1)  # the result is not a view of the input
        assert torch.equal(v.amax(0) + 1, best)


def test_gradient_per_combination_equals_the_per_entry_one(monkeypatch):
    """Summing the entries' gradients per winning combination and visiting
    only combinations with a non-zero sum (the CPU default) gives the gradient
    of visiting every entry (a GPU's way), and visits fewer combinations than
    there are entries with a gradient: entries share winning combinations.
    With too many combinations for the table it visits the entries with a
    gradient, one by one."""
    import pml_loop.batch_loop as bl
    from pml_loop.pairs import positive_pair_table
    g = torch.Generator().manual_seed(9)
    x = F.normalize(torch.randn(24, 5, generator=g, dtype=torch.float64), dim=1)
    labels = torch.arange(6).repeat_interleave(4)
    table = positive_pair_table(labels)
    visited = []
    original = bl._add_combos
    monkeypatch.setattr(bl, "_add_combos", lambda g, d, ends, grad, *a: visited.append(len(grad)) or original(g, d, ends, grad, *a))
    # a search in one block or in many; a table of combinations, or none (a
    # chunk too small for one, or more than 4 combinations per entry)
    for search_chunk, chunk, table_weight in ((2**18, 2**18, 4), (37, 2**18, 4), (37, 37, 4), (37, 2**18, 0)):
        monkeypatch.setattr(bl, "_COMBOS_PER_ENTRY", table_weight)
        per_combination = chunk == 2**18 and table_weight > 0
        blocks = bl.gram_blocks(x, x, True)
        winners = bl.search_winners(blocks, table, table, "arc", bl.search_plan(table, table, search_chunk))
        grad = torch.randn(24, 24, generator=g, dtype=torch.float64)
        grad[torch.rand(24, 24, generator=g) < 0.5] = 0
        grad *= labels[:, None] != labels[None, :]  # as the loss hands it over: negative entries only
        live = int(torch.count_nonzero(torch.triu(grad + grad.T)))
        results = []
        for sparse in (False, True):
            visited.clear()
            d = bl._winners_grad(x @ x.T, x @ x.T, x @ x.T, True, winners, "arc", chunk, False, grad, sparse)
            results.append((d.qr + d.qr.T, sum(visited)))
        (dense, n_dense), (sparse, n_sparse) = results
        assert torch.allclose(dense, sparse, rtol=0, atol=1e-12) and dense.abs().sum() > 0
        assert n_dense == 24 * 23 // 2
        assert n_sparse < live if per_combination else live <= n_sparse < n_dense  # chunks of 9: a 90 % live one is whole


@pytest.mark.parametrize("geometry", ["arc", "segment"])
@pytest.mark.parametrize("same_set", [True, False])
def test_int64_positions_give_the_int32_gradient(monkeypatch, geometry, same_set):
    """Batches too large for int32 positions (46,341 rows and more, or 2**31
    pair combinations) take the int64 path: forced here on a small batch, it
    must give the same winners (search) and the same gradient."""
    import pml_loop.batch_loop as bl
    from pml_loop.pairs import positive_pair_table
    g = torch.Generator().manual_seed(10)
    x = torch.randn(20, 5, generator=g, dtype=torch.float64)
    if geometry == "arc":
        x = F.normalize(x, dim=1)
    y = x if same_set else x[:16] + 0.1
    lq, lr = torch.arange(5).repeat_interleave(4), torch.arange(4).repeat_interleave(4)
    tq = positive_pair_table(lq)
    tr = tq if same_set else positive_pair_table(lr)
    blocks = bl.gram_blocks(x, y, same_set)
    winners = bl.search_winners(blocks, tq, tr, geometry, bl.search_plan(tq, tr, 2**18))
    grad = torch.randn(*blocks.qr.shape, generator=g, dtype=torch.float64)
    grad *= lq[:, None] != (lq if same_set else lr)[None, :]  # as the loss hands it over: negative entries only
    # chunk 37: per entry (too many combinations for a table), 2**18: per combination
    run = lambda: [bl._winners_grad(*blocks, same_set, winners, geometry, chunk, False, grad)  # noqa: E731
                   for chunk in (37, 2**18)]
    assert winners.combos.count > bl._COMBO_WEIGHT * 37
    assert bl._index_dtype(20, 20) == torch.int32
    narrow, per_combination = run()
    sym = (lambda d: d + d.T) if same_set else (lambda d: d)
    for a, b in zip(narrow, per_combination):
        assert torch.allclose(sym(a), sym(b), atol=1e-12)
    monkeypatch.setattr(bl, "_index_dtype", lambda n_q, n_r: torch.int64)
    monkeypatch.setattr(bl.Combos, "dtype", property(lambda self: torch.int64))  # 2**31 combinations and more
    wide_winners = bl.search_winners(blocks, tq, tr, geometry, bl.search_plan(tq, tr, 2**18))
    assert wide_winners.combo.dtype == torch.int64 and torch.equal(winners.combo.long(), wide_winners.combo)
    assert torch.equal(winners.value, wide_winners.value)
    for wide in run():
        for a, b in zip(narrow, wide):
            assert torch.allclose(sym(a), sym(b), atol=1e-12)
    assert narrow.qr.abs().sum() > 0


@pytest.mark.parametrize("same_set", [True, False])
def test_winners_name_the_partners_that_realise_each_entry(same_set):
    """A winner is a combination of pairs; ``partners()`` reads off, for each
    negative entry (i, j), the partners p of i and q of j whose arcs give
    the entry's value (checked with the per-quadruple functional)."""
    import pml_loop.batch_loop as bl
    from pml_loop.functional import loop_distance
    from pml_loop.pairs import positive_pair_table
    g = torch.Generator().manual_seed(11)
    x = F.normalize(torch.randn(18, 6, generator=g, dtype=torch.float64), dim=1)
    y = x if same_set else F.normalize(torch.randn(12, 6, generator=g, dtype=torch.float64), dim=1)
    lq = torch.randperm(18, generator=g) % 5  # shuffled classes of 3 - 4
    lr = lq if same_set else torch.arange(12) % 4
    tq = positive_pair_table(lq)
    tr = tq if same_set else positive_pair_table(lr)
    for chunk in (2**18, 37):
        winners = bl.search_winners(bl.gram_blocks(x, y, same_set), tq, tr, "arc", bl.search_plan(tq, tr, chunk))
        p, q = winners.partners()
        i, j = (lq[:, None] != lr[None, :]).nonzero(as_tuple=True)
        p, q = p[i, j], q[i, j]
        assert (lq[p] == lq[i]).all() and (lr[q] == lr[j]).all()
        chord = loop_distance(x[i], x[p], y[j], y[q], sphere=True)
        assert torch.allclose(1 - chord**2 / 2, winners.value[i, j], atol=1e-12)
