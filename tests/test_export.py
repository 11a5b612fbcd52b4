"""Tests for featuretree.export: save/load round trip, tables, GraphML, and the sunburst figure and page."""

from __future__ import annotations

import json
import logging
import math
import re
import subprocess
import sys

import networkx as nx
import numpy as np
import pytest
import torch

from featuretree.config import Config, FeatureTreeError
from featuretree.explore import icicle, sunburst, write_explorer, write_sunburst
from featuretree.export import from_graphml, load, save, to_frame, to_graphml
from featuretree.sae import TopKSAE
from featuretree.tree import FeatureTree

XSS = "<script>alert(1)</script>"
RUNGS = ["w4", "w8", "w16", "w8/5/r4"]


def make_tree(config: Config | None = None) -> FeatureTree:
    """3 base rungs + one refined rung; a novel feature with a child, a grandchild two rungs down."""
    saes = {r: TopKSAE(d_model=8, width=int(r.rsplit("/", 1)[-1][1:]), k=2, seed=i) for i, r in enumerate(RUNGS)}
    g = nx.DiGraph(rungs=RUNGS[:3], n_tokens=1000, min_coverage=0.5, acts="acts")

    def node(nid, freq, label, **kw):
        rung, idx = nid.rsplit("/", 1)
        g.add_node(nid, rung=rung, width=saes[rung].width, index=int(idx), freq=freq, label=label,
                   top_tokens=[label.split()[0], "x"], top_contexts=[f"a «{label}» b", "c «d» e", "f «g» h", "i «j»"],
                   words=["w"], **kw)

    def edge(p, c, cov, kind="split"):
        g.add_edge(p, c, coverage=cov, reverse=0.4, cos=0.7, kind=kind)

    node("w4/0", 0.30, f"{XSS} café ☕")
    node("w4/1", np.float64(0.20), "animals dog")  # numpy scalars must be stored as plain JSON
    node("w4/3", 0.05, "plants")
    node("w8/0", 0.25, "dog <b>bold</b>")
    node("w8/2", 0.10, "cat & mouse")
    node("w8/5", 0.15, "the", other_parents=[["w4/0", 0.55]])
    node("w8/7", 0.02, "novel one", novel=True)
    node("w16/1", 0.20, "puppy")
    node("w16/4", 0.12, "hound")  # children sum 0.32 > parent's 0.25: value must take the max
    node("w16/9", 0.15, "the again")
    node("w16/12", np.float32(0.04).item(), "fern")  # parent two rungs up
    node("w16/15", 0.01, "under novel")
    node("w8/5/r4/0", 0.09, "the (noun)")
    node("w8/5/r4/1", 0.08, "the (verb)")
    g.nodes["w4/1"]["index"] = np.int64(1)
    edge("w4/0", "w8/0", 0.9)
    edge("w4/0", "w8/2", 0.8)
    edge("w4/1", "w8/5", 0.95, "same")
    edge("w8/0", "w16/1", 0.99)
    edge("w8/0", "w16/4", 0.7)
    edge("w8/5", "w16/9", 0.97, "same")
    edge("w4/3", "w16/12", 0.6)
    edge("w8/7", "w16/15", 0.9)
    edge("w8/5", "w8/5/r4/0", 1.0)
    edge("w8/5", "w8/5/r4/1", 1.0)
    return FeatureTree(g, saes, config)


@pytest.fixture
def tree() -> FeatureTree:
    return make_tree(Config(widths=(4, 8, 16), k=2, n_tokens=1000, extra={"note": "ünïcode"}))


# ---- save / load ------------------------------------------------------------------------------------
def test_save_load_round_trip(tree, tmp_path):
    run = tmp_path / "run"
    (run / "acts").mkdir(parents=True)
    (run / "acts" / "meta.json").write_text('{"keep": true}')
    (run / "notes.txt").write_text("mine")
    assert save(tree, run) == run
    assert (run / "acts" / "meta.json").read_text() == '{"keep": true}' and (run / "notes.txt").read_text() == "mine"
    assert (run / "saes" / "w8" / "5" / "r4" / "sae_weights.safetensors").is_file()  # "/" -> nested dirs
    data = json.loads((run / "tree.json").read_text(encoding="utf-8"), parse_constant=pytest.fail)
    assert "edges" in data and data["saes"] == RUNGS

    back = load(run)
    assert back.config == tree.config
    assert dict(back.graph.nodes(data=True)) == dict(tree.graph.nodes(data=True))
    assert {(p, c): d for p, c, d in back.graph.edges(data=True)} == {
        (p, c): d for p, c, d in tree.graph.edges(data=True)}
    assert back.graph.graph == tree.graph.graph and back.graph.is_directed()
    node = back.graph.nodes["w8/5"]
    assert type(node["top_tokens"]) is list and node["other_parents"] == [["w4/0", 0.55]]
    assert type(back.graph.nodes["w4/1"]["index"]) is int
    assert back.rungs == tree.rungs
    for r, sae in tree.saes.items():
        got = back.saes[r]
        assert (got.d_model, got.width, got.k) == (sae.d_model, sae.width, sae.k)
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert torch.equal(getattr(got, name), getattr(sae, name)), (r, name)

    save(back, run)  # saving over a saved tree works
    assert load(run).graph.number_of_nodes() == tree.graph.number_of_nodes()


def test_save_load_without_config(tmp_path):
    t = make_tree(None)
    save(t, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == {}
    assert load(tmp_path).config is None


def test_load_errors_say_what_is_missing(tree, tmp_path):
    with pytest.raises(FeatureTreeError, match="does not exist.*ft.save"):
        load(tmp_path / "nope")
    with pytest.raises(FeatureTreeError, match="no config.json.*ft.save"):
        load(tmp_path)
    save(tree, tmp_path)
    (tmp_path / "tree.json").write_text("{not json")
    with pytest.raises(FeatureTreeError, match="tree.json is not readable JSON"):
        load(tmp_path)
    save(tree, tmp_path)
    (tmp_path / "saes" / "w16" / "cfg.json").unlink()
    with pytest.raises(FeatureTreeError, match="rung 'w16'.*cfg.json"):
        load(tmp_path)
    (tmp_path / "tree.json").unlink()
    with pytest.raises(FeatureTreeError, match="no tree.json"):
        load(tmp_path)


def test_save_rejects_unsafe_rung_names(tmp_path):
    t = FeatureTree(nx.DiGraph(), {"../evil": TopKSAE(8, 4, 2)})
    with pytest.raises(FeatureTreeError, match="rung name"):
        save(t, tmp_path / "run")
    assert not (tmp_path / "evil").exists()
    good = save(FeatureTree(nx.DiGraph(), {"w4": TopKSAE(8, 4, 2)}), tmp_path / "good")
    (tmp_path / "outside").mkdir()
    TopKSAE(8, 4, 2).save(tmp_path / "outside")  # a dictionary outside the run that a tree.json could point to
    for bad in ("../../outside", "/etc", "w4\\..\\..", "w4/../../outside"):
        data = json.loads((good / "tree.json").read_text())
        data["saes"] = [bad]
        (good / "tree.json").write_text(json.dumps(data))
        with pytest.raises(FeatureTreeError, match="rung name"):  # load stays inside the run directory
            load(good)


# ---- tables -----------------------------------------------------------------------------------------
def test_to_frame(tree):
    df = to_frame(tree)
    assert list(df.columns)[:14] == ["node", "rung", "width", "index", "freq", "label", "parent", "coverage", "cos",
                                     "kind", "depth", "n_children", "top_tokens", "top_contexts"]
    extra = {k for _, d in tree.graph.nodes(data=True) for k in d} - set(df.columns[:14])
    assert list(df.columns[14:]) == sorted(extra)  # every other node attribute follows
    assert list(df.index) == list(tree.graph.nodes) and (df.index == df.node).all()
    assert df.loc["w4/0", "parent"] is None and df.loc["w8/7", "parent"] is None
    assert df.loc["w16/1", "parent"] == "w8/0" and df.loc["w16/1", "coverage"] == 0.99
    assert df.loc["w8/5", "kind"] == "same" and df.loc["w4/0", "kind"] is None
    assert math.isnan(df.loc["w4/0", "coverage"])
    depth = df.depth.to_dict()
    assert depth["w4/0"] == 0 and depth["w8/0"] == 1 and depth["w16/4"] == 2
    assert depth["w16/12"] == 1 and depth["w8/5/r4/1"] == 2 and depth["w16/15"] == 1
    assert df.loc["w4/0", "n_children"] == 2 and df.loc["w16/1", "n_children"] == 0
    assert df.loc["w8/5/r4/0", "rung"] == "w8/5/r4" and df.loc["w8/5/r4/0", "width"] == 4
    assert df.loc["w8/0", "top_tokens"] == ["dog", "x"] and len(df.loc["w8/0", "top_contexts"]) == 4

    e = to_frame(tree, edges=True)
    assert list(e.columns)[:6] == ["parent", "child", "coverage", "reverse", "cos", "kind"]
    assert len(e) == tree.graph.number_of_edges()
    assert e.set_index("child").loc["w16/9", "parent"] == "w8/5"
    assert to_frame(nx.DiGraph()).empty and to_frame(nx.DiGraph(), edges=True).empty


def test_graphml_round_trip(tree, tmp_path):
    p = to_graphml(tree, tmp_path / "tree.graphml")
    text = p.read_text(encoding="utf-8")
    assert "<graphml" in text and 'edgedefault="directed"' in text
    g = from_graphml(p)
    assert isinstance(g, nx.DiGraph)
    assert dict(g.nodes(data=True)) == dict(tree.graph.nodes(data=True))
    assert {(a, b): d for a, b, d in g.edges(data=True)} == {(a, b): d for a, b, d in tree.graph.edges(data=True)}
    assert g.graph == tree.graph.graph
    assert g.nodes["w8/5"]["other_parents"] == [["w4/0", 0.55]] and g.nodes["w8/7"]["novel"] is True
    assert nx.read_graphml(p).nodes["w4/0"]["top_tokens"] == json.dumps([XSS.split()[0], "x"])  # scalars on disk
    with pytest.raises(FeatureTreeError, match="no GraphML file"):
        from_graphml(tmp_path / "missing.graphml")


# ---- sunburst ---------------------------------------------------------------------------------------
def _trace(fig):
    (t,) = fig.data
    return t, list(t.ids), list(t.parents), dict(zip(t.ids, t.values, strict=True))


def test_sunburst_structure_rings_and_values(tree, caplog):
    with caplog.at_level(logging.INFO, logger="featuretree"):
        fig = sunburst(tree, prefer_refined=False)
    t, ids, parents, value = _trace(fig)
    assert t.type == "sunburst" and t.branchvalues == "total"
    assert len(ids) == len(set(ids)) and set(parents) - {""} <= set(ids)
    assert set(ids) == set(tree.graph) - {"w8/7", "w16/15"}  # the novel feature and its subtree are left out
    assert "2 left out" in caplog.text
    parent = dict(zip(ids, parents, strict=True))
    assert {n for n, p in parent.items() if p == ""} == {"w4/0", "w4/1", "w4/3"}
    for n, p in parent.items():
        if p:
            assert tree.graph.has_edge(p, n)

    def ring(n):
        return 1 if parent[n] == "" else 1 + ring(parent[n])

    order = tree.rungs
    for n in ids:
        rung = tree.graph.nodes[n]["rung"]
        if n == "w16/12":  # its parent is two rungs up: it sits one ring in
            assert ring(n) == 2
        elif "/r" not in rung:
            assert ring(n) == order.index(rung) + 1, n
        else:
            assert ring(n) == ring(parent[n]) + 1
    kids: dict[str, list[float]] = {}
    for n, p in parent.items():
        kids.setdefault(p, []).append(value[n])
    for n in ids:
        assert value[n] >= math.fsum(kids.get(n, [])) and value[n] >= tree.graph.nodes[n]["freq"]
        assert value[n] >= sum(kids.get(n, [])) * (1 - 1e-9)  # plotly's own check (tolerance 1e-6)
    assert value["w8/0"] == pytest.approx(0.32) and value["w16/4"] == 0.12
    assert value["w4/0"] == pytest.approx(0.42)
    assert fig.layout.title.text == "12 features in 4 rungs"
    key = fig.layout.title.subtitle.text  # the colour key: ladder rungs, then refinement levels
    assert all(r in key for r in tree.rungs if "/r" not in r) and "refined ×1 (1 local dictionary)" in key


def test_sunburst_root_and_errors(tree):
    t, ids, parents, value = _trace(sunburst(tree, root="w8/5", prefer_refined=False))
    assert ids[0] == "w8/5" and parents[0] == ""
    assert set(ids) == {"w8/5", "w16/9", "w8/5/r4/0", "w8/5/r4/1"}
    assert "subtree of w8/5" in sunburst(tree, root="w8/5").layout.title.text
    assert list(sunburst(tree, root="w8/7").data[0].ids) == ["w8/7", "w16/15"]  # asked for explicitly
    with pytest.raises(FeatureTreeError, match="unknown node 'w8/99'"):
        sunburst(tree, root="w8/99")
    with pytest.raises(FeatureTreeError, match="color"):
        sunburst(tree, color="rainbow")
    with pytest.raises(FeatureTreeError, match="max_depth"):
        sunburst(tree, max_depth=0)
    assert sunburst(tree, max_depth=2).data[0].maxdepth == 2


def test_sunburst_escapes_corpus_text(tree):
    fig = sunburst(tree)
    t, ids, _, _ = _trace(fig)
    texts = list(t.labels) + list(t.hovertext) + [fig.layout.title.text, fig.layout.title.subtitle.text]
    assert not any("<script" in s.lower() for s in texts)
    assert "<b>bold</b>" not in " ".join(t.labels)
    label = dict(zip(ids, t.labels, strict=True))
    assert label["w4/0"] == "&lt;script&gt;alert(1)&lt;/script&gt; café ☕" and label["w8/2"] == "cat &amp; mouse"
    hover = dict(zip(ids, t.hovertext, strict=True))["w8/0"]
    assert "w8/0" in hover and "width 8" in hover and "25% of tokens" in hover
    assert "coverage 0.90" in hover and "cos 0.70" in hover
    assert hover.count("•") == 3 and "<b>«dog &lt;b&gt;bold&lt;/b&gt;»</b>" in hover  # 3 contexts, token bolded
    assert "<script" not in json.dumps(fig.to_plotly_json(), default=str).lower()


def test_sunburst_colours(tree):
    t, ids, _, _ = _trace(sunburst(tree))
    colour = dict(zip(ids, t.marker.colors, strict=True))
    assert colour["w8/0"] == colour["w8/2"] != colour["w4/0"] != colour["w16/1"]
    t, ids, _, _ = _trace(sunburst(tree, color="coverage"))
    cov = dict(zip(ids, t.marker.colors, strict=True))
    assert cov["w16/1"] == 0.99 and cov["w4/0"] == 1.0 and t.marker.showscale


def test_write_sunburst_is_self_contained(tree, tmp_path):
    from plotly.offline import get_plotlyjs

    p = write_sunburst(tree, tmp_path / "sunburst.html", color="coverage", prefer_refined=False)
    page = p.read_text(encoding="utf-8")
    assert p.stat().st_size > 1_000_000
    assert get_plotlyjs()[:2000] in page  # the bundle is inlined ...
    assert not re.search(r"<script[^>]*\bsrc=", page)  # ... nothing is fetched (no CDN script tag)
    assert "<title>featuretree · 12 features in 4 rungs</title>" in page and XSS not in page
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temp file


# ---- icicle and the explorer page -------------------------------------------------------------------
def refined_graph() -> nx.DiGraph:
    """w4 -> w8 -> w16, plus refined nodes: w8/1/r4/* and w4/0/r2/* (first level), w8/1/r4/0/r2/* (second)."""
    g = nx.DiGraph(rungs=["w4", "w8", "w16"])
    for n, freq in [("w4/0", 0.3), ("w4/1", 0.2), ("w8/0", 0.1), ("w8/1", 0.15), ("w8/2", 0.12), ("w16/3", 0.06)]:
        g.add_node(n, rung=n.split("/")[0], freq=freq, label=f"label {n}", top_contexts=[f"a «{n}» b"])
    g.add_edges_from([("w4/0", "w8/0"), ("w4/0", "w8/1"), ("w4/1", "w8/2"), ("w8/1", "w16/3")], coverage=0.8,
                     cos=0.5, kind="split")
    refined = [("w8/1", "w8/1/r4", [0.09, 0.07, 0.001]), ("w4/0", "w4/0/r2", [0.2, 0.2]),
               ("w8/1/r4/0", "w8/1/r4/0/r2", [0.05, 0.06])]  # children sum over their parents: values take the max
    for parent, rung, freqs in refined:
        for i, freq in enumerate(freqs):
            g.add_node(f"{rung}/{i}", rung=rung, refined=True, freq=freq, label=f"refined {i}", top_contexts=[])
            g.add_edge(parent, f"{rung}/{i}", coverage=1.0, cos=0.3, kind="split", refined=True)
    return g


def test_icicle_matches_the_sunburst_and_values_are_total_with_refined_nodes():
    g = refined_graph()
    sun, ice = sunburst(g, prefer_refined=False), icicle(g, prefer_refined=False)
    s, i = sun.data[0], ice.data[0]
    assert s.type == "sunburst" and i.type == "icicle" and i.branchvalues == "total"
    for attr in ("ids", "parents", "values", "labels", "hovertext"):
        assert list(getattr(s, attr)) == list(getattr(i, attr)), attr
    assert list(s.marker.colors) == list(i.marker.colors)
    assert ice.layout.title.text == sun.layout.title.text
    _, ids, parents, value = _trace(ice)
    assert set(ids) == set(g)
    kids: dict[str, list[float]] = {}
    for n, p in zip(ids, parents, strict=True):
        kids.setdefault(p, []).append(value[n])
    for n in ids:
        assert value[n] >= math.fsum(kids.get(n, [])) and value[n] >= g.nodes[n]["freq"], n
        assert value[n] >= sum(kids.get(n, [])) * (1 - 1e-9)  # plotly's own check
    assert value["w8/1/r4/0"] == pytest.approx(0.11) and value["w8/1"] == pytest.approx(0.241)
    assert value["w4/0"] == pytest.approx(value["w8/0"] + value["w8/1"] + 0.4)  # refined children count too
    assert list(icicle(g, root="w8/1/r4/0").data[0].ids) == ["w8/1/r4/0", "w8/1/r4/0/r2/0", "w8/1/r4/0/r2/1"]


def test_refined_nodes_show_their_local_children_only_by_default():
    g = refined_graph()
    t = sunburst(g).data[0]
    kids = {n: [c for c, p in zip(t.ids, t.parents, strict=True) if p == n] for n in t.ids}
    assert kids["w4/0"] == ["w4/0/r2/0", "w4/0/r2/1"]  # not w8/0, w8/1: w4/0 was refined
    assert "w8/1" not in kids  # gone with them (it hung under w4/0)
    assert kids["w4/1"] == ["w8/2"]  # an unrefined node keeps its ladder children
    assert set(t.ids) == {"w4/0", "w4/1", "w8/2", "w4/0/r2/0", "w4/0/r2/1"}
    sub = sunburst(g, root="w8/1").data[0]  # drawn from w8/1: its refined children, not w16/3
    assert sorted(sub.ids) == ["w8/1", "w8/1/r4/0", "w8/1/r4/0/r2/0", "w8/1/r4/0/r2/1", "w8/1/r4/1", "w8/1/r4/2"]
    assert "w16/3" in sunburst(g, root="w8/1", prefer_refined=False).data[0].ids


def test_rung_colours_group_refined_nodes_by_level():
    g = refined_graph()
    fig = icicle(g, prefer_refined=False)
    colour = dict(zip(fig.data[0].ids, fig.data[0].marker.colors, strict=True))
    ladder = {colour["w4/0"], colour["w8/0"], colour["w16/3"]}
    level1 = {colour[n] for n in ("w8/1/r4/0", "w8/1/r4/2", "w4/0/r2/0", "w4/0/r2/1")}
    level2 = {colour["w8/1/r4/0/r2/0"], colour["w8/1/r4/0/r2/1"]}
    assert len(ladder) == 3 and len(level1) == 1 and len(level2) == 1  # one colour per level, not per refined rung
    assert not (level1 | level2) & ladder and level1 != level2
    key = fig.layout.title.subtitle.text
    assert "refined ×1 (2 local dictionaries)" in key and "refined ×2 (1 local dictionary)" in key
    assert "w8/1/r4" not in key and key.index("w16") < key.index("refined ×1") < key.index("refined ×2")
    cov = dict(zip(*(lambda t: (t.ids, t.marker.colors))(sunburst(g, color="coverage", prefer_refined=False).data[0]), strict=True))
    assert cov["w8/1/r4/1"] == 1.0 and cov["w8/0"] == 0.8


def test_write_explorer_is_one_safe_self_contained_page(tree, tmp_path):
    from featuretree.explore import read_explorer_data

    p = write_explorer(tree, tmp_path / "explorer.html", prefer_refined=False, run="runs/r")
    page = p.read_text(encoding="utf-8")
    blocks = re.findall(r'<script type="application/octet-stream" id="(ft-[a-z]+)">([A-Za-z0-9+/=]+)</script>', page)
    assert [b[0] for b in blocks] == ["ft-plotlyjs", "ft-data"]  # plotly.js and data inlined, packed, once ...
    assert not re.search(r"<script[^>]*\bsrc=", page) and "http" not in page.split("<script>", 1)[0]  # nothing fetched
    assert XSS not in page and "<b>bold" not in page  # corpus text only inside the base64 block
    script = re.search(r"<script>\s*(function featuretreeInflate.*?)</script>", page, re.S).group(1)
    assert "innerHTML" not in script and "textContent" in script  # the card is filled as text only
    assert "<title>featuretree explorer · 14 features in 4 rungs</title>" in page  # the sunburst's 12, a novel one + its child
    assert 'id="ft-panel"' in page and 'id="ft-search"' in page and "plotly_sunburstclick" not in page
    data = read_explorer_data(p)
    ids = list(sunburst(tree, prefer_refined=False).data[0].ids)
    novel = sorted(n for n, d in tree.graph.nodes(data=True) if d.get("novel"))
    assert data["kind"] == "sunburst" and data["ids"][:len(ids)] == ids and data["run"] == "runs/r"
    assert novel == ["w8/7"] and data["ids"][len(ids)] == "w8/7" and len(data["ids"]) == len(ids) + 2
    assert data["parents"][len(ids)] == -1 and data["parents"][len(ids) + 1] == len(ids)  # a top, with its child
    at = {n: i for i, n in enumerate(ids)}
    n = data["nodes"][at["w8/0"]]
    assert n["label"] == "dog <b>bold</b>" and ids[data["parents"][at["w8/0"]]] == "w4/0" and n["coverage"] == 0.9
    assert n["marked"] == tree.graph.nodes["w8/0"]["top_contexts"][:3]  # no activations in this tree: marked text
    assert n["words"] == ["w"] and n["top_words"] == ["dog", "x"]
    assert data["parents"][at["w4/0"]] == -1 and data["nodes"][at["w4/1"]]["freq"] == 0.2  # numpy scalars as JSON
    assert data["counts"][at["w4/0"]] == 1 + sum(1 for d in nx.descendants(nx.DiGraph([(data["ids"][q], data["ids"][i])
                                                  for i, q in enumerate(data["parents"]) if q >= 0]), "w4/0"))
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temp file

    p = write_explorer(tree, tmp_path / "icicle.html", kind="icicle", root="w8/5", max_depth=None, prefer_refined=False)
    data = read_explorer_data(p)
    assert data["kind"] == "icicle" and set(data["ids"]) == {"w8/5", "w16/9", "w8/5/r4/0", "w8/5/r4/1"}
    assert data["select"] == "w8/5"
    # a search path: its sectors filled gold and starred, the page opened on its end
    p = write_explorer(tree, tmp_path / "path.html", max_depth=None, prefer_refined=False, highlight=["w4/0", "w8/0"])
    data = read_explorer_data(p)
    colour = {n: data["palette"][c] for n, c in zip(data["ids"], data["colors"])}
    assert colour["w4/0"] == colour["w8/0"] == "#FFD700" and colour["w4/1"] != "#FFD700"
    assert sorted(data["ids"][i] for i in data["marked"]) == ["w4/0", "w8/0"] and data["select"] == "w8/0"
    with pytest.raises(FeatureTreeError, match="highlight names nodes"):
        write_explorer(tree, tmp_path / "x.html", highlight=["w8/99"])
    with pytest.raises(FeatureTreeError, match="kind='sunburst' or kind='icicle'"):
        write_explorer(tree, tmp_path / "x.html", kind="pie")
    with pytest.raises(FeatureTreeError, match="unknown node 'w8/99'"):
        write_explorer(tree, tmp_path / "x.html", root="w8/99")
    with pytest.raises(FeatureTreeError, match="max_sectors=0"):
        write_explorer(tree, tmp_path / "x.html", max_sectors=0)
    assert not (tmp_path / "x.html").exists()
    with pytest.raises(FeatureTreeError, match="not an explorer page"):
        read_explorer_data(write_sunburst(tree, tmp_path / "s.html"))


def test_export_does_not_import_training_code():
    code = "import sys, featuretree.export; assert 'featuretree.train' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
