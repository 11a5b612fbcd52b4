"""refine / search: a dictionary trained where one feature fires finds that feature's true children."""

import numpy as np
import pytest
import torch

from featuretree import FeatureTreeError, link, load, refine, save, train_ladder
from featuretree.eval import match_features, planted_hierarchy
from featuretree.firing import fire_rungs, node_mask


@pytest.fixture(scope="module")
def planted_tree():
    """6 planted roots with 3 children each; the ladder (one rung of 6) resolves only the roots."""
    p = planted_hierarchy(n_roots=6, branching=3, depth=2, d_model=32, n_tokens=60_000, p_root=0.08, p_child=0.9,
                          child_cos=0.5, seed=1)
    torch.manual_seed(0)
    saes = train_ladder(p.acts, (6,), k=1, epochs=4, batch_size=512, progress=False)
    return p, link(saes, p.acts)


def root_node(tree, planted, root: int) -> str:
    m = match_features(tree, planted)
    (node,) = [n for n, f in m.items() if f == root]
    return node


def test_refined_children_are_the_planted_children(planted_tree):
    p, tree = planted_tree
    node = root_node(tree, p, 0)
    before = set(tree.graph)
    deep = refine(tree, node, width=6, k=1, acts=p.acts, min_tokens=200, max_tokens=8000, progress=False)
    assert set(tree.graph) == before and not any("/r6" in r for r in tree.saes)  # the input is untouched
    kids = [c for c in deep.graph.successors(node) if deep.graph.nodes[c].get("refined")]
    assert kids and all(c.startswith(f"{node}/r6/") for c in kids)
    m = match_features(deep, p)
    truth = set(np.flatnonzero(p.parent == 0).tolist())
    found = {m[c] for c in deep.graph if c.startswith(f"{node}/r6/") and c in m}
    assert truth <= found, f"planted children {truth}, refined nodes matched {found}"
    assert found <= truth | {0}  # nothing from another root's subtree
    for c in kids:  # gated firing: a refined child fires only where its parent fires; freq follows
        e = deep.graph.edges[node, c]
        assert e["coverage"] == 1.0 and e["refined"] and 0 < e["reverse"] <= 1
        on = node_mask(deep, c, p.acts)
        assert not (on & ~node_mask(deep, node, p.acts)).any()
        assert abs(on.mean() - deep.graph.nodes[c]["freq"]) < 0.02


def test_depth_two_recurses_and_round_trips(planted_tree, tmp_path):
    p, tree = planted_tree
    node = root_node(tree, p, 1)
    deep = refine(tree, node, width=6, k=1, depth=2, acts=p.acts, min_tokens=300, max_tokens=8000, progress=False)
    second = [r for r in deep.saes if r.count("/r") == 2]
    assert second, "depth 2 refined no child"
    assert all(deep.graph.graph["refined"][r]["parent"] in deep.graph for r in second)
    back = load(save(deep, tmp_path / "deep"))
    assert set(back.saes) == set(deep.saes) and back.graph.graph["refined"] == deep.graph.graph["refined"]
    F1 = fire_rungs(deep, p.acts[:5000], second)
    F2 = fire_rungs(back, p.acts[:5000], second)
    assert all((F1[r] != F2[r]).nnz == 0 for r in second)
    again = refine(deep, node, width=6, k=1, acts=p.acts, min_tokens=300, max_tokens=8000, progress=False)
    assert not [r for r in again.saes if r.count("/r") == 2]  # refining again replaces the old subtree


def test_refine_errors(planted_tree):
    p, tree = planted_tree
    node = root_node(tree, p, 2)
    with pytest.raises(FeatureTreeError, match="fires on only"):
        refine(tree, node, acts=p.acts[:500], min_tokens=400, progress=False)
    with pytest.raises(FeatureTreeError, match="unknown node"):
        refine(tree, "w6/99", acts=p.acts, progress=False)
    with pytest.raises(FeatureTreeError, match="k=8"):
        refine(tree, node, width=8, k=8, acts=p.acts, progress=False)
    with pytest.raises(FeatureTreeError, match="depth"):
        refine(tree, node, depth=0, acts=p.acts, progress=False)


def test_refine_checkpoint_of_another_refinement_is_refused(planted_tree, tmp_path):
    """A refinement killed after its region was saved leaves its checkpoint; another node's refinement in the
    same place is refused, and rerunning the killed one finishes it with the tree a run never killed gives."""
    from featuretree.refine import submit_here

    p, tree = planted_tree
    a, b = root_node(tree, p, 0), root_node(tree, p, 1)
    kw = dict(width=6, k=1, depth=2, acts=p.acts, min_tokens=300, max_tokens=8000, progress=False)
    calls = []

    def dies_on_the_second_submit(jobs):
        calls.append(len(jobs))
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if killed while the children's dictionaries train
        return submit_here(jobs)

    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        refine(tree, a, checkpoint=ckpt, submit=dies_on_the_second_submit, **kw)
    assert (ckpt / "region.safetensors").is_file() and calls[0] == 1 and calls[1] >= 2
    with pytest.raises(FeatureTreeError, match=r"ckpt holds an unfinished refinement with other settings \(node"):
        refine(tree, b, checkpoint=ckpt, **kw)
    resumed = refine(tree, a, checkpoint=ckpt, **kw)
    once = refine(tree, a, **kw)
    assert list(resumed.graph.nodes) == list(once.graph.nodes) and not ckpt.exists()
    assert dict(resumed.graph.nodes(data=True)) == dict(once.graph.nodes(data=True))
