"""The tree is true: on a planted hierarchy (children fire only with their parent, and the parent's own
direction is present whenever a child fires, so children can absorb parents), train_ladder + link recover
the planted parent edges."""

import logging

import networkx as nx
import pytest

from featuretree import FeatureTreeError, link, train_ladder
from featuretree.eval import edge_scores, planted_hierarchy

log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def planted_run():
    p = planted_hierarchy(n_roots=12, branching=3, depth=3, d_model=64, n_tokens=80_000, seed=0)
    train, held = p.split(60_000)
    saes = train_ladder(train.acts, (16, 64, 256), k=6, epochs=6, batch_size=512, seed=0, progress=False,
                        eval_acts=held.acts)
    return p, held, saes, link(saes, held.acts)


def test_generator_plants_the_hard_case():
    p = planted_hierarchy(n_roots=4, branching=2, depth=3, d_model=16, n_tokens=5000, seed=1)
    active = p.active.toarray()
    for child, parent in enumerate(p.parent):
        if parent >= 0:  # a child never fires without its parent, whose direction is then present too
            assert not (active[:, child] & ~active[:, parent]).any()
            assert active[:, child].any()
    kids = p.parent[p.parent >= 0]
    assert len(kids) == 4 * 2 + 4 * 2 * 2


def test_ladder_and_link_recover_planted_parent_edges(planted_run, record_property):
    p, held, saes, tree = planted_run
    s = edge_scores(tree, held)
    record_property("planted_scores", s)
    log.warning("planted 12x3x3 ladder 16/64/256: %s", {k: round(v, 3) for k, v in s.items()})
    assert s["recovered"] >= 0.75, s
    assert s["precision"] >= 0.9, s
    assert s["recall"] >= 0.8, s


def test_decoder_cosine_alone_links_worse(planted_run):
    """Re-linking every child to its argmax-cosine parent in the narrower rung loses precision."""
    import networkx as nx
    import torch

    p, held, saes, tree = planted_run
    cos_tree = type(tree)(nx.DiGraph(), tree.saes, None)
    cos_tree.graph.add_nodes_from(tree.graph.nodes(data=True))
    widths = sorted(saes)
    for narrow, wide in zip(widths, widths[1:]):
        sim = torch.nn.functional.normalize(saes[wide].W_dec, dim=1) @ torch.nn.functional.normalize(
            saes[narrow].W_dec, dim=1).T
        for c, par in enumerate(sim.argmax(1).tolist()):
            if f"w{wide}/{c}" in tree.graph and f"w{narrow}/{par}" in tree.graph:
                cos_tree.graph.add_edge(f"w{narrow}/{par}", f"w{wide}/{c}")
    ours, cos_only = edge_scores(tree, held), edge_scores(cos_tree, held)
    assert ours["precision"] > cos_only["precision"] + 0.1, (ours, cos_only)


def test_edges_carry_coverage_cos_and_kind(planted_run):
    from featuretree.tree import ROOT

    _, _, _, tree = planted_run
    g = tree.graph
    for u, v, d in g.edges(data=True):
        if u == ROOT:  # the virtual root holds the narrowest rung ("top") and the features nothing covers
            assert d["kind"] == ("top" if g.nodes[v]["rung"] == tree.rungs[0] else "novel")
            assert bool(g.nodes[v].get("novel")) == (d["kind"] == "novel")
            continue
        assert 0.5 <= d["coverage"] <= 1.0 and -1.0 <= d["cos"] <= 1.0 and d["kind"] in {"same", "split"}
        wu, wv = g.nodes[u]["width"], g.nodes[v]["width"]
        assert wu < wv or (d["within"] and wu == wv)
    assert g.in_degree(ROOT) == 0 and all(g.in_degree(n) == 1 for n in g if n != ROOT)  # one primary parent each
    assert nx.is_arborescence(g)  # one tree under the virtual root
    assert set(tree.roots()) == {n for n in g if g.nodes[n].get("rung") == tree.rungs[0]}


@pytest.mark.slow
def test_compare_rules_and_eval_cli(capsys):
    from featuretree.__main__ import main
    from featuretree.eval import compare_rules

    df = compare_rules(["wide-8x5x2"], seeds=[0])
    by = df.set_index("rule")
    assert by.loc["combined", "precision"] >= 0.95 and by.loc["combined", "recall"] >= 0.9
    assert by.loc["cos", "recall"] < by.loc["combined", "recall"]
    assert main(["-q", "eval", "planted", "--configs", "wide-8x5x2", "--seeds", "1"]) == 0
    assert "combined" in capsys.readouterr().out
    assert main(["-q", "eval", "planted", "--configs", "nope"]) == 2


@pytest.mark.slow
def test_threshold_sweep_scores_each_setting_like_a_direct_link():
    from featuretree.eval import planted_ladders, sweep_thresholds

    grid = {"min_coverage": (0.5, 0.97), "within_coverage": (2.0,)}
    df = sweep_thresholds(["wide-8x5x2"], seeds=[0], grid=grid)
    by = df.set_index(["threshold", "value"])
    default = by.loc[("min_coverage", 0.5)]
    assert bool(default.is_default) and not bool(by.loc[("within_coverage", 2.0)].is_default)
    assert default.precision >= 0.95 and default.recall >= 0.9
    (_, _, saes, _, held), = planted_ladders(["wide-8x5x2"], [0], 60_000, 20_000, 6, False)  # the same ladder
    for (threshold, value), row in by.iterrows():
        direct = edge_scores(link(saes, held.acts, labels=False, **{threshold: value}), held)
        assert (row.precision, row.recall) == (direct["precision"], direct["recall"])
    with pytest.raises(FeatureTreeError, match="cannot sweep"):
        sweep_thresholds(["wide-8x5x2"], seeds=[0], grid={"k": (1,)})


def test_generator_per_level_probabilities_and_correlated_siblings():
    p = planted_hierarchy(n_roots=4, branching=3, depth=3, d_model=16, n_tokens=40_000, p_root=0.25,
                          p_child=(0.9, 0.4), p_sibling=0.5, seed=1)
    A = p.active.tocsc()
    for f in range(len(p.parent)):
        kids = [c for c in range(len(p.parent)) if p.parent[c] == f]
        if not kids:
            continue
        on_parent = A[:, f].toarray().ravel()
        on_kids = (A[:, kids].toarray() > 0)
        assert not (on_kids.any(1) & ~on_parent).any()  # children fire only with their parent
        rate = on_kids.any(1)[on_parent].mean()
        assert abs(rate - (0.9 if p.level[f] == 0 else 0.4)) < 0.03  # the level's p_child
        two = (on_kids.sum(1) >= 2)[on_kids.any(1)].mean()
        assert abs(two - 0.5) < 0.05  # p_sibling: a second sibling co-fires half the time
    with pytest.raises(FeatureTreeError, match="per level"):
        planted_hierarchy(depth=3, p_child=(0.5,), n_tokens=10)


def test_generator_cosine_range_and_zipfian_firing():
    p = planted_hierarchy(n_roots=8, branching=3, depth=2, d_model=32, n_tokens=60_000, p_root=0.1,
                          child_cos=(0.4, 0.75), zipf=1.0, seed=3)
    d = p.directions
    cos = [(d[c] @ d[q]).item() for c, q in enumerate(p.parent) if q >= 0]
    assert min(cos) >= 0.4 - 1e-5 and max(cos) <= 0.75 + 1e-5 and max(cos) - min(cos) > 0.15
    rates = p.active[:, :8].mean(0).A.ravel()
    assert (rates[:-1] > rates[1:]).all()  # Zipf: root r fires ~ 1 / (r + 1)
    assert abs(rates.mean() - 0.1) < 0.01 and abs(rates[0] / rates[3] - 4.0) < 0.5
    A = p.active.tocsc()
    kids = [c for c in range(len(p.parent)) if p.parent[c] == 0]
    n = [A[:, c].nnz for c in kids]
    assert n[0] > n[1] > n[2] and abs(n[0] / n[2] - 3.0) < 0.5  # the i-th child picked with weight 1 / (i + 1)
    with pytest.raises(FeatureTreeError, match="child_cos"):
        planted_hierarchy(child_cos=(0.8, 0.4), n_tokens=10)


def test_edge_misses_names_what_is_wrong(planted_run):
    """Each reason of edge_misses appears exactly where a fault is planted into a right tree."""
    from featuretree.eval import edge_misses, match_features
    from featuretree.tree import ROOT, FeatureTree

    _, held, _, tree = planted_run
    base = edge_misses(tree, held)
    s = edge_scores(tree, held)
    assert (base.reason == "found").sum() == round(s["recall"] * s["n_reachable"])
    m = match_features(tree, held)
    assert (base.reason == "child unrecovered").sum() + (base.reason == "parent unrecovered").sum() == \
        s["n_true"] - s["n_reachable"]
    # pick found grandchild edges P -> C whose child latent's tree parent matches P
    g = tree.graph
    found = base[(base.reason == "found") & (base.level == 2)]
    picks = []
    for row in found.itertuples():
        cn = [n for n, f in m.items() if f == row.child]
        if len(cn) == 1 and m.get(next(g.predecessors(cn[0]))) == row.parent:
            gp = [n for n, f in m.items() if f == held.parent[row.parent] and g.nodes[n]["width"] < g.nodes[cn[0]]["width"]]
            if gp:
                picks.append((row.parent, row.child, cn[0], gp[0]))
    assert len(picks) >= 2, picks
    broken = FeatureTree(g.copy(), tree.saes, None)
    (p1, c1, n1, _), (p2, c2, n2, g2) = picks[:2]
    broken.graph.remove_edge(next(g.predecessors(n1)), n1)
    broken.graph.add_edge(ROOT, n1, kind="novel")
    broken.graph.remove_edge(next(g.predecessors(n2)), n2)
    broken.graph.add_edge(g2, n2, kind="split")
    why = edge_misses(broken, held).set_index(["parent", "child"]).reason
    assert why[(p1, c1)] == "no parent (novel)" and why[(p2, c2)] == "linked to an ancestor"
    assert (why == "found").sum() == (base.reason == "found").sum() - 2
