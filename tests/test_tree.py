"""Blocked co-activation (candidates, coactivation_blocks, thresholds) gives exactly what the full products
gave: the reference implementations below are the code linking used before co-activation was blocked."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import featuretree.firing as firing
import featuretree.tree as tree_mod
from featuretree import FeatureTreeError, TopKSAE, link, train_ladder
from featuretree.eval import planted_hierarchy
from featuretree.firing import encode_all, thresholds
from featuretree.tree import attach, candidates, coactivation_blocks, link_codes

# ---- the implementations before blocking, kept verbatim as references ----

def ref_coverage_matrix(child, parent):
    co = (child.T @ parent).tocsr()  # (w_child, w_parent) joint firing counts
    n_child = np.asarray(child.sum(0)).ravel()
    n_parent = np.asarray(parent.sum(0)).ravel()
    inv = sp.diags(1.0 / np.maximum(n_child, 1))
    return (inv @ co).tocsr(), n_child, n_parent


def ref_candidates(above, r, fires, min_coverage, within_coverage):
    out = {}
    n_live = np.asarray(fires[r].sum(0)).ravel()
    todo = set(np.flatnonzero(n_live > 0).tolist())
    for pr in reversed(above):
        if not todo:
            break
        cov, _, n_p = ref_coverage_matrix(fires[r], fires[pr])
        for c in sorted(todo):
            row = cov.getrow(c)
            keep = row.data >= min_coverage
            if keep.any():
                ps, cs = row.indices[keep], row.data[keep]
                out[c] = [(pr, int(p), float(v), float(v * n_live[c] / max(n_p[p], 1))) for p, v in zip(ps, cs)]
                todo.discard(c)
    cov, n_c, _ = ref_coverage_matrix(fires[r], fires[r])
    cov.setdiag(0)
    cov.eliminate_zeros()
    for c in np.flatnonzero(n_live > 0):
        row = cov.getrow(c)
        for p, v in zip(row.indices, row.data):
            rev = float(v * n_c[c] / max(n_c[p], 1))
            if v >= within_coverage and rev < within_coverage and n_c[p] > n_c[c]:
                out.setdefault(int(c), []).append((r, int(p), float(v), rev))
    return out


def ref_thresholds(values, indices, width, rel=0.25):
    flat_i, flat_v = indices.reshape(-1), values.reshape(-1)
    on = flat_v > 0
    q90 = np.zeros(width, dtype=np.float64)
    if on.any():
        df = pd.DataFrame({"f": flat_i[on], "v": flat_v[on]})
        qs = df.groupby("f")["v"].quantile(0.9)
        q90[qs.index.to_numpy()] = qs.to_numpy()
    return rel * q90


# ---- data ----

def random_fires(rng, n, widths, density):
    """Firing matrices with many ties: few tokens (coverages like 2/3 repeat), duplicated and nested columns."""
    fires = {}
    for w in widths:
        F = rng.random((n, w)) < density
        dup = rng.integers(0, w, size=w // 4)
        F[:, dup[: len(dup) // 2]] = F[:, dup[len(dup) // 2: 2 * (len(dup) // 2)]]  # identical columns
        sub = rng.integers(0, w, size=w // 4)
        F[:, sub] &= F[:, rng.integers(0, w, size=len(sub))] | (rng.random((n, len(sub))) < 0.5)
        F[:, rng.integers(0, w, size=2)] = False  # dead features
        fires[f"w{w}"] = sp.csr_matrix(F.astype(np.float32))
    return fires


def dump(g: nx.DiGraph):
    return dict(g.graph), list(g.nodes(data=True)), list(g.edges(data=True))


def assert_same_candidates(new, ref):
    assert list(new) == list(ref)  # the same children, in the same order
    for c in ref:
        assert new[c] == ref[c], c  # the same parents, coverages and reverses to the bit, in pool order


CASES = [(0, 30, (6, 12, 24), 0.3), (1, 60, (8, 40), 0.15), (2, 200, (16, 64, 128), 0.05), (3, 12, (5, 9), 0.5),
         (4, 500, (32, 300), 0.02)]
THRESHOLDS = [(0.5, 0.9), (0.9, 0.5), (2 / 3, 2 / 3), (0.75, 0.75), (0.1, 0.3), (1.0, 1.0), (0.0, 2.0)]


@pytest.mark.parametrize("seed,n,widths,density", CASES)
@pytest.mark.parametrize("min_cov,within", THRESHOLDS)
def test_candidates_match_the_full_products(seed, n, widths, density, min_cov, within):
    fires = random_fires(np.random.default_rng(seed), n, widths, density)
    rungs = list(fires)
    for i, r in enumerate(rungs):
        ref = ref_candidates(rungs[:i], r, fires, min_cov, within)
        assert_same_candidates(candidates(rungs[:i], r, fires, min_cov, within), ref)
        for block, max_pairs in ((1, 1), (3, 10), (7, 1 << 30)):  # blocks of one feature / tiny budgets
            assert_same_candidates(candidates(rungs[:i], r, fires, min_cov, within, block=block, max_pairs=max_pairs),
                                   ref)


@pytest.mark.parametrize("seed,n,widths,density", CASES)
def test_max_parents_keeps_attach_the_same(seed, n, widths, density):
    fires = random_fires(np.random.default_rng(seed), n, widths, density)
    rungs = list(fires)
    saes = {r: TopKSAE(8, F.shape[1], 1) for r, F in fires.items()}
    for i, r in enumerate(rungs):
        full = candidates(rungs[:i], r, fires, 0.3, 0.5)
        for max_parents in (9, 12):
            cut = candidates(rungs[:i], r, fires, 0.3, 0.5, max_parents=max_parents, block=5)
            assert list(cut) == list(full)
            g_full, g_cut = nx.DiGraph(), nx.DiGraph()
            for c in full:
                assert all(t in full[c] for t in cut[c])
                assert [t for t in full[c] if t in cut[c]] == cut[c]  # a sub-pool, in pool order
                best = max(t[2] for t in full[c])
                assert len(cut[c]) <= max_parents + sum(t[2] >= best - 0.05 for t in full[c])
                attach(g_full, saes, r, c, full[c])
                attach(g_cut, saes, r, c, cut[c])
            assert dump(g_cut) == dump(g_full)


def test_coactivation_blocks_bound_the_pairs_and_cover_every_child():
    fires = random_fires(np.random.default_rng(5), 300, (40, 90), 0.1)
    C, P = fires["w90"], fires["w40"]
    full = (C.T @ P).toarray()
    rows = np.flatnonzero(np.asarray(C.sum(0)).ravel() > 0)
    seen = []
    for feats, co in coactivation_blocks(C.T.tocsr(), P, rows, block=6, max_pairs=50):
        assert len(feats) <= 6 and (co.nnz <= 50 or len(feats) == 1)
        assert co.shape == (len(feats), 40)
        np.testing.assert_array_equal(co.toarray(), full[feats])
        seen += feats.tolist()
    assert seen == rows.tolist()
    assert list(coactivation_blocks(C.T.tocsr(), P, np.array([], dtype=int))) == []


@pytest.mark.parametrize("seed", range(6))
def test_thresholds_match_pandas_quantiles(seed):
    rng = np.random.default_rng(seed)
    n, k, w = int(rng.integers(1, 4000)), int(rng.integers(1, 9)), int(rng.integers(1, 400))
    i = rng.integers(0, w, (n, k))
    for v in ((rng.exponential(1, (n, k)) * (rng.random((n, k)) > 0.3)),  # continuous, some zeros
              rng.choice([0.0, 0.25, 1.0, 2.0, 3.3], (n, k))):  # heavy ties
        for dtype in (np.float32, np.float64):
            vv = v.astype(dtype)
            np.testing.assert_array_equal(thresholds(vv, i, w, 0.3), ref_thresholds(vv, i, w, 0.3))
    assert thresholds(np.zeros((3, 2), np.float32), np.zeros((3, 2), int), 4).tolist() == [0.0] * 4


@pytest.fixture(scope="module")
def planted_ladder():
    p = planted_hierarchy(n_roots=6, branching=3, depth=3, d_model=32, n_tokens=24_000, seed=2)
    train, held = p.split(16_000)
    saes = train_ladder(train.acts, (8, 32, 128), k=4, epochs=2, batch_size=512, seed=0, progress=False)
    return saes, held.acts


def test_link_matches_the_pipeline_before_blocking(planted_ladder, monkeypatch):
    saes, x = planted_ladder
    new = [link(saes, x, labels=False, max_parents=m) for m in (None, 16, 9)]
    monkeypatch.setattr(firing, "thresholds", ref_thresholds)  # fire -> fire_codes looks it up at call time
    monkeypatch.setattr(tree_mod, "candidates", lambda above, r, fires, mc, wc, **_: ref_candidates(above, r, fires, mc, wc))
    old = link(saes, x, labels=False)
    assert any(d.get("other_parents") for _, d in old.graph.nodes(data=True))
    assert any(d["within"] for _, _, d in old.graph.edges(data=True))
    for t in new:
        assert dump(t.graph) == dump(old.graph)


def test_link_codes_is_link_after_encoding(planted_ladder):
    saes, x = planted_ladder
    codes = {f"w{w}": encode_all(s, [x]) for w, s in saes.items()}
    assert dump(link_codes(saes, codes).graph) == dump(link(saes, x, labels=False).graph)
    with pytest.raises(FeatureTreeError, match="no codes"):
        link_codes(saes, {"w8": codes["w8"]})


def test_wide_sparse_rung_links_without_a_width_squared_matrix():
    """65,536 features: every block holds at most max_pairs counts; the result equals the reference."""
    rng = np.random.default_rng(0)
    n, k = 3000, 8
    idx = {w: rng.integers(0, w, (n, k)) for w in (4096, 65536)}
    idx[65536][:, 0] = idx[4096][:, 0] * 16 + rng.integers(0, 16, n)  # children of the narrow features
    fires = {f"w{w}": firing.firing_matrix(np.ones((n, k), np.float32), i, w) for w, i in idx.items()}
    ref = ref_candidates(["w4096"], "w65536", fires, 0.5, 0.9)
    assert_same_candidates(candidates(["w4096"], "w65536", fires, 0.5, 0.9, max_pairs=20_000), ref)
    saes = {r: TopKSAE(4, F.shape[1], 1) for r, F in fires.items()}
    tree = link_codes(saes, {f"w{w}": (np.ones((n, k), np.float32), i) for w, i in idx.items()}, fire_rel=0.0)
    assert tree.graph.number_of_nodes() > 20_000
    assert torch.is_tensor(saes["w65536"].W_dec)
