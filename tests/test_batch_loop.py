"""The batch LoOp matrix against a per-quadruple reference on explicit points."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity, LpDistance

from pml_loop import LoOpDistance
from pml_loop.pairs import positive_pair_table
from reference import naive_loop_matrix


def _batch(seed, sizes=(3, 2, 1, 3), d=5):
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(sizes)])
    return torch.randn(len(labels), d, generator=g, dtype=torch.float64), labels


@pytest.mark.parametrize("chunk", [2**18, 5])
@pytest.mark.parametrize("normalize", [False, True])
def test_matches_naive_reference_same_set(normalize, chunk, backend):
    emb, labels = _batch(0)
    dist = LoOpDistance(LpDistance(normalize_embeddings=normalize), chunk_elements=chunk, backend=backend)
    got = dist.loop_mat(emb, labels).numpy()
    x = F.normalize(emb, dim=1) if normalize else emb
    ref = naive_loop_matrix(x.numpy(), labels.numpy(), x.numpy(), labels.numpy(), sphere=normalize)
    assert np.abs(got - ref).max() <= 1e-6


@pytest.mark.parametrize("chunk", [2**18, 5])
@pytest.mark.parametrize("normalize", [False, True])
def test_matches_naive_reference_with_ref_set(normalize, chunk, backend):
    emb, labels = _batch(1, sizes=(2, 1, 2))
    ref_emb, ref_labels = _batch(2, sizes=(3, 2, 2, 1))
    dist = LoOpDistance(LpDistance(normalize_embeddings=normalize), chunk_elements=chunk, backend=backend)
    got = dist.loop_mat(emb, labels, ref_emb, ref_labels).numpy()
    f = (lambda t: F.normalize(t, dim=1)) if normalize else (lambda t: t)
    ref = naive_loop_matrix(f(emb).numpy(), labels.numpy(), f(ref_emb).numpy(), ref_labels.numpy(), sphere=normalize)
    assert np.abs(got - ref).max() <= 1e-6


def test_similarity_forms(backend):
    emb, labels = _batch(3)
    x = F.normalize(emb, dim=1)
    chord = naive_loop_matrix(x.numpy(), labels.numpy(), x.numpy(), labels.numpy(), sphere=True)
    cos = LoOpDistance(CosineSimilarity(), backend=backend).loop_mat(emb, labels).numpy()
    neg = labels.numpy()[:, None] != labels.numpy()[None]
    assert np.abs(cos[neg] - (1 - chord[neg] ** 2 / 2)).max() <= 1e-6
    # Unnormalised dot product: bilinear, so the hardest value is a corner.
    dot = LoOpDistance(DotProductSimilarity(normalize_embeddings=False), backend=backend).loop_mat(emb, labels).numpy()
    e, lab = emb.numpy(), labels.numpy()
    for i in range(len(e)):
        for j in range(len(e)):
            if lab[i] == lab[j]:
                assert dot[i, j] == pytest.approx(e[i] @ e[j])
                continue
            group = lambda k: [m for m in range(len(e)) if lab[m] == lab[k]]  # noqa: E731
            assert dot[i, j] == pytest.approx(max(e[p] @ e[q] for p in group(i) for q in group(j)))


def test_power_does_not_change_values(backend):
    emb, labels = _batch(4, sizes=(4, 4, 3, 1, 2))
    plain = LoOpDistance(LpDistance(normalize_embeddings=False), backend=backend).loop_mat(emb, labels)
    squared = LoOpDistance(LpDistance(normalize_embeddings=False, power=2), backend=backend).loop_mat(emb, labels)
    assert torch.allclose(plain**2, squared, atol=1e-12)


def _record_blocks(monkeypatch):
    """Shapes and classes of every searched block (and every measured chunk)."""
    import pml_loop.batch_loop as bl
    blocks = []
    original = bl._block_values
    def spy(g, row, col, geometry, *rest):
        blocks.append((row.ends.shape[1], col.ends.shape[1]))
        return original(g, row, col, geometry, *rest)
    monkeypatch.setattr(bl, "_block_values", spy)
    return blocks


@pytest.mark.parametrize("normalize", [False, True])
def test_chunked_search_is_bounded_and_exact(normalize, monkeypatch):
    """Every block holds at most ``chunk_elements`` combinations (or one pair
    against one class), and cutting the search changes no value (the torch
    backend's blocks)."""
    emb, labels = _batch(4, sizes=(4, 4, 3, 1, 2, 6))
    ref, ref_labels = _batch(5, sizes=(3, 5, 2, 2))
    base = LpDistance(normalize_embeddings=normalize)
    for args in ((emb, labels), (emb, labels, ref, ref_labels)):
        whole = LoOpDistance(base, backend="torch").loop_mat(*args)  # one block, checked against brute force
        for chunk in (7, 40, 300):
            blocks = _record_blocks(monkeypatch)
            cut = LoOpDistance(base, chunk_elements=chunk, backend="torch").loop_mat(*args)
            monkeypatch.undo()
            assert len(blocks) > 1
            assert all(r * c <= chunk or r == 1 for r, c in blocks), blocks
            assert torch.allclose(whole, cut, atol=1e-12)


@pytest.mark.parametrize("normalize", [False, True])
def test_every_way_of_settling_blocks_is_exact(normalize):
    """Blocks are written as slices (each class's samples together), through
    indices (classes interleaved) or merged (a class split across blocks):
    each way gives the one-block matrix."""
    from pml_loop.batch_loop import search_plan
    emb, labels = _batch(8, sizes=(4, 3, 4, 2, 5, 3))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    base = LpDistance(normalize_embeddings=normalize)
    seen = set()
    for e, lab in ((emb, labels), (emb[order], labels[order])):
        whole = LoOpDistance(base, backend="torch").loop_mat(e, lab)
        table = positive_pair_table(lab)
        for chunk in (12, 60, 200):
            plan = search_plan(table, table, chunk)
            spans = all(g.span is not None for g in plan.rows)
            seen.add("merged" if not plan.disjoint else "sliced" if spans else "indexed")
            cut = LoOpDistance(base, chunk_elements=chunk, backend="torch").loop_mat(e, lab)
            assert torch.allclose(whole, cut, atol=1e-12)
    assert seen == {"merged", "sliced", "indexed"}


def test_same_class_combinations_cost_nothing(monkeypatch):
    """Two big classes: only combinations of a pair of one class with a pair of
    the other are searched, never two pairs of one class; within one set each
    combination once (the matrix is symmetric)."""
    emb, labels = _batch(6, sizes=(12, 10), d=4)
    ref, ref_labels = _batch(7, sizes=(9, 8), d=4)
    blocks = _record_blocks(monkeypatch)
    LoOpDistance(LpDistance(), chunk_elements=500, backend="torch").loop_mat(emb, labels)
    assert sum(r * c for r, c in blocks) == 66 * 45
    blocks.clear()
    LoOpDistance(LpDistance(), chunk_elements=500, backend="torch").loop_mat(emb, labels, ref, ref_labels)
    assert sum(r * c for r, c in blocks) == 66 * 28 + 45 * 36


@pytest.mark.parametrize("base", [LpDistance(), LpDistance(normalize_embeddings=False),
                                  DotProductSimilarity(normalize_embeddings=False), CosineSimilarity()])
@pytest.mark.parametrize("chunk", [10**6, 9])
def test_gradcheck_of_the_batch_matrix(base, chunk, backend):
    """The Danskin gradient of the whole chunked computation, in float64."""
    g = torch.Generator().manual_seed(11)
    emb = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3])
    ref = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    ref_labels = torch.tensor([1, 1, 4, 4, 0, 5])
    dist = LoOpDistance(base, chunk_elements=chunk, backend=backend)
    torch.autograd.gradcheck(lambda e: dist.loop_mat(e, labels), (emb,), atol=1e-6)
    torch.autograd.gradcheck(lambda e, r: dist.loop_mat(e, labels, r, ref_labels), (emb, ref), atol=1e-6)


@pytest.mark.parametrize("geometry", ["segment", "arc", "dot"])
def test_measure_partials_are_the_autograd_ones(geometry):
    from pml_loop.functional import candidate_scores, candidate_weights, measure_at, quad_gram
    from pml_loop.functional.loop import measure_partials
    g = torch.Generator().manual_seed(12)
    x = torch.randn(4, 50, 6, generator=g, dtype=torch.float64)
    if geometry == "arc":
        x = F.normalize(x, dim=-1)
    q = quad_gram(*x)
    w = candidate_weights(q, candidate_scores(q, geometry).argmax(0), geometry)
    fields = [f.clone().requires_grad_() for f in q]
    value = measure_at(type(q)(*fields), w, geometry)
    auto = torch.autograd.grad(value.sum(), fields, allow_unused=True)
    for a, m in zip(auto, measure_partials(q, w, geometry)):
        assert (a is None and m is None) or torch.allclose(a if a is not None else torch.zeros_like(m), m, atol=1e-12)


def test_hardest_partner_only(backend):
    emb, labels = _batch(5, sizes=(3, 3, 2))
    dist = LoOpDistance(LpDistance(normalize_embeddings=False), partners="hardest", backend=backend)
    got = dist.loop_mat(emb, labels).numpy()
    e, lab = emb.numpy(), labels.numpy()
    from reference import segment_distance
    d = np.linalg.norm(e[:, None] - e[None], axis=-1)
    far = {i: max((p for p in range(len(e)) if p != i and lab[p] == lab[i]), key=lambda p: d[i, p]) for i in range(len(e))}
    for i in range(len(e)):
        for j in range(len(e)):
            if lab[i] != lab[j]:
                assert got[i, j] == pytest.approx(segment_distance(e[i], e[far[i]], e[j], e[far[j]]), abs=1e-6)


def test_pair_table_owns_every_partner_once():
    labels = torch.tensor([2, 0, 0, 1, 2, 0])
    t = positive_pair_table(labels)
    ends = t.ends.tolist()
    assert sorted(map(tuple, ends)) == [(0, 4), (1, 2), (1, 5), (2, 5), (3, 3)]
    assert t.labels.tolist() == [2, 0, 0, 0, 1] and t.runs == (1, 3, 1)  # by class, as they first appear
    assert t.labels.tolist() == labels[t.ends[:, 0]].tolist()
    for i, row in enumerate(t.owned.tolist()):
        assert all(0 <= k < t.num_pairs for k in row)  # padding repeats a real pair
        owned = [ends[k] for k in set(row)]
        partners = sorted(b if a == i else a for a, b in owned)
        expected = sorted(j for j in range(6) if j != i and labels[j] == labels[i]) or [i]
        assert partners == expected


def test_never_above_plain_distance_and_symmetric(backend):
    g = torch.Generator().manual_seed(6)
    emb = torch.randn(64, 32, generator=g)
    labels = torch.randint(0, 12, (64,), generator=g)
    for base in (LpDistance(), LpDistance(normalize_embeddings=False)):
        mat = LoOpDistance(base, backend=backend).loop_mat(emb, labels)
        plain = base(emb)
        assert (mat <= plain + 1e-6).all()
        assert torch.allclose(mat, mat.T, atol=1e-5)
    sim = LoOpDistance(CosineSimilarity(), backend=backend).loop_mat(emb, labels)
    assert (sim >= CosineSimilarity()(emb) - 1e-6).all()


def test_structure_cache_follows_the_partition_not_the_label_values():
    emb, labels = _batch(7, sizes=(2, 3, 2))
    dist = LoOpDistance(LpDistance(normalize_embeddings=False))
    first = dist.loop_mat(emb, labels)
    relabelled = torch.tensor([9, 9, 4, 4, 4, 7, 7])  # same partition, other values
    assert torch.equal(dist.loop_mat(emb, relabelled), first)
    other = torch.tensor([0, 0, 0, 1, 1, 2, 2])  # another partition: not the cached one
    fresh = LoOpDistance(LpDistance(normalize_embeddings=False)).loop_mat(emb, other)
    assert torch.equal(dist.loop_mat(emb, other), fresh)


@pytest.mark.parametrize("base", [CosineSimilarity(), DotProductSimilarity(normalize_embeddings=False)])
def test_blocked_search_combinations_agree_with_their_values(base):
    """Classes split across blocks (merged entries): where the corner (i, j) is
    the optimum, the entry's combination must still be one of i's and j's
    pairs, so the gradient lands on them (it once stayed a placeholder)."""
    g = torch.Generator().manual_seed(12)
    labels = torch.arange(12).repeat_interleave(4)[torch.randperm(48, generator=g)]
    emb = torch.randn(48, 16, generator=g, dtype=torch.float64)
    grads = []
    for chunk in (None, 7):
        dist = LoOpDistance(base, chunk_elements=chunk, backend="torch")
        e = emb.clone().requires_grad_(True)
        with dist.sharing():
            mat = dist.loop_mat(e, labels)
            p, q = dist.last_partners()
        neg = labels[:, None] != labels[None, :]
        assert (labels[p] == labels[:, None])[neg].all() and (labels[q] == labels[None, :])[neg].all()
        mat.sum().backward()
        grads.append(e.grad)
    assert torch.allclose(*grads, atol=1e-12)


def test_partition_key_is_the_first_sample_of_each_class():
    from pml_loop.pairs import partition_key
    g = torch.Generator().manual_seed(13)
    for labels in (torch.randint(-5, 40, (300,), generator=g), torch.tensor([7]), torch.tensor([3, 3, 3]),
                   torch.arange(10).flip(0)):
        expected = [next(k for k in range(len(labels)) if labels[k] == labels[i]) for i in range(len(labels))]
        assert partition_key(labels).tolist() == expected
