"""The tree is true: on a planted hierarchy (children fire only with their parent, and the parent's own
direction is present whenever a child fires, so children can absorb parents), train_ladder + link recover
the planted parent edges."""

import logging

import pytest

from featuretree import edge_scores, link, planted_hierarchy, train_ladder

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
    _, _, _, tree = planted_run
    for u, v, d in tree.graph.edges(data=True):
        assert 0.5 <= d["coverage"] <= 1.0 and -1.0 <= d["cos"] <= 1.0 and d["kind"] in {"same", "split"}
        wu, wv = tree.graph.nodes[u]["width"], tree.graph.nodes[v]["width"]
        assert wu < wv or (d["within"] and wu == wv)
    assert all(tree.graph.in_degree(n) <= 1 for n in tree.graph)  # a forest: one primary parent each


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
