"""The explorer page and the sunburst in a real headless Chromium, driven over the DevTools protocol (tests/_cdp.py):
the page loads with no console error, draws (a screenshot that is not blank), a real mouse click on a sector
zooms into it and fills the panel, and hostile corpus text stays text (no dialog, no element, no title change)."""

from __future__ import annotations

import os
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
from _cdp import Chromium, read_png

from featuretree.explore import write_explorer, write_sunburst

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="needs /usr/bin/chromium for the headless browser (apt-get install -y chromium)")]

XSS = "<script>alert(1)</script><img src=x onerror=alert(2)>"  # a corpus line, verbatim
SLOW = float(os.environ.get("FEATURETREE_SLOW_MACHINE", "1"))  # scales the time bounds on a loaded machine

# the centre of a sector, found by asking the page which element is under each point of the sector's box
_POINT_IN = """((id) => {
  const gd = document.getElementById(%r);
  for (const p of gd.querySelectorAll("path.surface")) {
    const d = p.__data__;
    if (!(d && d.data && d.data.data && d.data.data.id === id)) continue;
    const r = p.getBoundingClientRect();
    for (let i = 1; i < 24; i++) for (let j = 1; j < 24; j++) {
      const x = r.x + r.width * i / 24, y = r.y + r.height * j / 24;
      if (document.elementFromPoint(x, y) === p) return [x, y];
    }
  }
  return null;
})"""
# ids of the drawn sectors (the icicle also draws plotly's implicit root, whose generated id has no "/")
_DRAWN = "[...document.querySelectorAll('#%s path.surface')].map(p => p.__data__.data.data.id).filter(i => i.includes('/'))"


def forest() -> nx.DiGraph:
    """Two roots (w4/0 holds the hostile text) with children in w8 and grandchildren in a refined rung."""
    g = nx.DiGraph(rungs=["w4", "w8"])
    g.add_node("w4/0", rung="w4", width=4, index=0, freq=0.4, label=XSS, top_tokens=[XSS], words=[XSS],
               top_contexts=[f"before «{XSS}» after", "plain «text» here"])
    g.add_node("w4/1", rung="w4", width=4, index=1, freq=0.3, label="plants · leaf", top_tokens=["leaf"],
               top_contexts=["a green «leaf»"])
    for i, (p, freq) in enumerate([("w4/0", 0.2), ("w4/0", 0.15), ("w4/1", 0.2), ("w4/1", 0.05)]):
        g.add_node(f"w8/{i}", rung="w8", width=8, index=i, freq=freq, label=f"child {i}", top_contexts=[])
        g.add_edge(p, f"w8/{i}", coverage=0.9, reverse=0.4, cos=0.6, kind="split")
    for i, freq in enumerate([0.1, 0.08]):
        n = f"w8/0/r4/{i}"
        g.add_node(n, rung="w8/0/r4", width=4, index=i, freq=freq, refined=True, label=f"refined {i}", top_contexts=[])
        g.add_edge("w8/0", n, coverage=1.0, reverse=0.5, cos=0.3, kind="split", refined=True)
    return g


@pytest.fixture(scope="module")
def browser():
    with Chromium(CHROMIUM, width=1200, height=800, timeout=120) as cr:
        yield cr


def _open(cr: Chromium, page: Path, plot: str) -> str:
    tab = cr.open(page.as_uri())
    cr.wait_until(tab, f"document.querySelectorAll('#{plot} path.surface').length > 0")
    return tab


def _click_sector(cr: Chromium, tab: str, plot: str, node: str) -> None:
    xy = cr.evaluate(tab, (_POINT_IN % plot) + f"({node!r})")
    assert xy, f"sector {node} is not visible"
    cr.click(tab, *xy)


def _screenshot_is_drawn(cr: Chromium, tab: str, path: Path) -> np.ndarray:
    rgb = read_png(cr.screenshot(tab, path))[:, :, :3]
    pixels = rgb.reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 100, "the screenshot is (nearly) blank"
    assert (pixels != 255).any(axis=1).mean() > 0.15, "under 15% of the page is drawn"
    return rgb


@pytest.mark.parametrize("kind", ["sunburst", "icicle"])
def test_explorer_loads_draws_and_a_click_centres_and_fills_the_card(browser, tmp_path, kind):
    cr, g = browser, forest()
    page = write_explorer(g, tmp_path / f"{kind}.html", kind=kind, max_depth=None, run="runs/x")
    n_errors = len(cr.errors)
    tab = _open(cr, page, "ft-plot")
    assert sorted(cr.evaluate(tab, _DRAWN % "ft-plot")) == sorted(g)  # every feature is a sector
    assert cr.evaluate(tab, "document.getElementById('ft-plot').data[0].type") == kind
    before = _screenshot_is_drawn(cr, tab, tmp_path / "before.png")
    assert cr.evaluate(tab, "document.getElementById('ft-panel').dataset.node || null") is None

    _click_sector(cr, tab, "ft-plot", "w4/1")
    cr.wait_until(tab, "document.getElementById('ft-panel').dataset.node === 'w4/1'")
    assert cr.wait_until(tab, "document.getElementById('ft-plot').dataset.view") == "w4/1"  # centred on it ...
    cr.wait_until(tab, f"{_DRAWN % 'ft-plot'}.length === 3")  # ... drawing only its subtree
    assert sorted(cr.evaluate(tab, _DRAWN % "ft-plot")) == ["w4/1", "w8/2", "w8/3"], kind
    panel = cr.evaluate(tab, "document.getElementById('ft-panel').innerText")
    assert "plants · leaf" in panel and "30.0% of tokens" in panel and "a green «leaf»" in panel
    assert "featuretree refine runs/x w4/1" in panel and "Children (2)" in panel and "Siblings (1)" in panel
    assert cr.evaluate(tab, "location.hash") == "#w4%2F1"
    assert cr.evaluate(tab, "document.getElementById('ft-crumbs').innerText") == "all features › w4/1"
    cr.pause(1.0)
    after = _screenshot_is_drawn(cr, tab, tmp_path / "after.png")
    assert (np.abs(after.astype(int) - before.astype(int)).max(axis=2) > 30).mean() > 0.05, "the view did not change"
    _click_sector(cr, tab, "ft-plot", "w4/1")  # the centre: back up to everything
    cr.wait_until(tab, "document.getElementById('ft-plot').dataset.view === ''")
    cr.wait_until(tab, f"{_DRAWN % 'ft-plot'}.length === {g.number_of_nodes()}")
    assert cr.errors[n_errors:] == [] and cr.dialogs == []


def shaded_forest(n_top: int = 30, n_kids: int = 20) -> nx.DiGraph:
    """Many top-level features with many children each, contexts shaded by activation, one of them hostile."""
    g = nx.DiGraph(rungs=["w32", "w1024"])
    for t in range(n_top):
        g.add_node(f"w32/{t}", rung="w32", width=32, index=t, freq=0.5 / (t + 1), label=f"topic {t}",
                   top_words=[f"word{t}"], words=[], act_hist=[3.0, [5, 9, 4, 1, 0, 0, 0, 0, 0, 0, 0, 1]],
                   context_acts=[[["a ", 0.0], ["bird", 3.0], [" sang ", 0.0], ["loud", 1.0]]], label_score=0.7)
        for c in range(n_kids):
            n = f"w1024/{t * n_kids + c}"
            g.add_node(n, rung="w1024", width=1024, index=t * n_kids + c, freq=0.4 / (t + 1) / (c + 2),
                       label=f"topic {t} part {c}", top_words=[], words=[], context_acts=[])
            g.add_edge(f"w32/{t}", n, coverage=0.95, reverse=0.2, cos=0.5, kind="split")
    g.nodes["w1024/3"]["label"] = "<b onmouseover=alert(3)>bold</b>"
    g.nodes["w1024/3"]["context_acts"] = [[["x ", 0.0], [XSS, 2.0], [" y", 0.0]]]
    return g


def test_explorer_groups_small_features_searches_and_shades_contexts(browser, tmp_path):
    import json

    cr, g = browser, shaded_forest()
    (tmp_path / "run" / "effects").mkdir(parents=True)  # what `featuretree effects RUN w32/7` saves
    (tmp_path / "run" / "effects" / "w32_7.json").write_text(json.dumps({
        "node": "w32/7", "summary": {"loss_change": 0.0391, "loss_change_after": 0.002, "n_firing": 49},
        "logits": [{"by": "measured", "direction": "promoted", "rank": 1, "token": " violin"},
                   {"by": "measured", "direction": "suppressed", "rank": 1, "token": XSS},
                   {"by": "lens", "direction": "promoted", "rank": 1, "token": " music"}],
        "steering": [{"prompt": "She played the", "scale": 4.0, "rank": 1, "token": " piano", "p_clean": 0.1,
                      "p_steered": 0.3}]}))
    page = write_explorer(g, tmp_path / "big.html", per_parent=5, top_shown=10, run=tmp_path / "run")
    n_errors = len(cr.errors)
    tab = _open(cr, page, "ft-plot")
    drawn = cr.evaluate(tab, "document.getElementById('ft-plot').data[0].ids")
    assert len([i for i in drawn if "smaller" not in i and "\u2026more" not in i and "more:" not in i]) == 10 + 10 * 5
    labels = cr.evaluate(tab, "document.getElementById('ft-plot').data[0].labels")
    assert "20 smaller features" in labels and "15 smaller features" in labels  # grouped, not drawn
    _click_sector(cr, tab, "ft-plot", "\u2026more:w32/0")  # the lazy expansion: w32/0's 15 others now drawn
    cr.wait_until(tab, "document.getElementById('ft-plot').data[0].ids.filter(i => i.startsWith('w1024/')).length === 20 + 9 * 5")
    # search by label, open the first hit: card, shaded tokens, fragment, histogram
    cr.evaluate(tab, "var b = document.getElementById('ft-search'); b.value = 'topic 7 part 1'; "
                     "b.dispatchEvent(new Event('input'))")
    hits = cr.evaluate(tab, "[...document.querySelectorAll('#ft-results li')].map(l => l.dataset.node)")
    assert hits[0] == "w1024/141"  # the phrase in the label first, the most frequent of those first
    assert set(hits[:11]) == {"w1024/141"} | {f"w1024/{140 + c}" for c in range(10, 20)}
    cr.evaluate(tab, "document.getElementById('ft-search').dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter'}))")
    cr.wait_until(tab, "document.getElementById('ft-panel').dataset.node === 'w1024/141'")
    assert cr.evaluate(tab, "location.hash") == "#w1024%2F141"
    assert cr.evaluate(tab, "document.getElementById('ft-plot').dataset.view") == "w32/7"  # a leaf: its parent centred
    cr.evaluate(tab, "document.dispatchEvent(new KeyboardEvent('keydown', {key: 'ArrowUp'}))")  # to the parent
    cr.wait_until(tab, "document.getElementById('ft-panel').dataset.node === 'w32/7'")
    shades = cr.evaluate(tab, "[...document.querySelectorAll('#ft-contexts .ft-tok')].map(s => [s.textContent, "
                              "s.style.background])")
    assert [t for t, _ in shades] == ["bird", "loud"]
    alpha = [float(b.rsplit(",", 1)[1].rstrip(")")) if b.startswith("rgba") else 1.0 for _, b in shades]
    assert alpha[0] == 1.0 and 0.3 < alpha[1] < 0.5  # 0.15 + 0.85 x activation / max
    assert cr.evaluate(tab, "document.querySelectorAll('#ft-hist rect').length") == 12
    effects = cr.evaluate(tab, "document.getElementById('ft-effects').innerText")
    assert "0.04 nats when ablated" in effects and "violin" in effects and XSS in effects  # hostile token as text
    assert "piano 0.10→0.30" in effects and "She played the" in effects
    # a URL fragment opens a node directly; hostile text in its label and context stays text
    tab2 = cr.open(page.as_uri() + "#w1024%2F3")
    cr.wait_until(tab2, "(document.getElementById('ft-panel').dataset || {}).node === 'w1024/3'", timeout=30)
    assert "<b onmouseover=alert(3)>bold</b>" in cr.evaluate(tab2, "document.querySelector('#ft-panel h2').textContent")
    assert cr.evaluate(tab2, "document.querySelector('#ft-contexts .ft-tok').textContent") == XSS
    cr.pause(0.5)
    assert cr.evaluate(tab2, "document.querySelectorAll('img, #ft-panel b, #ft-panel script').length") == 0
    assert cr.dialogs == [] and cr.errors[n_errors:] == []


def test_explorer_of_the_whole_default_sized_tree_opens_quickly(browser, tmp_path):
    """10,000 features (a default run's size): the page is a few MB and draws its first view in under 2 s."""
    g = nx.DiGraph(rungs=["w100", "w10000"])
    rng = np.random.default_rng(0)
    for t in range(100):
        g.add_node(f"w100/{t}", rung="w100", width=100, index=t, freq=0.01, label=f"topic {t} · word · word",
                   context_acts=[[["some context words ", 0.0], ["fire", 2.0], [" here and there", 0.0]]] * 3)
    for c in range(9900):
        n = f"w10000/{c}"
        g.add_node(n, rung="w10000", width=10000, index=c, freq=float(rng.uniform(1e-5, 1e-3)), label=f"feature {c}",
                   context_acts=[[["another short context ", 0.0], [f"tok{c}", 1.5], [" around it", 0.0]]] * 3,
                   act_hist=[2.0, [int(v) for v in rng.integers(0, 50, 12)]])
        g.add_edge(f"w100/{c % 100}", n, coverage=0.9, reverse=0.1, cos=0.4, kind="split")
    page = write_explorer(g, tmp_path / "10k.html")
    assert page.stat().st_size < 6e6, page.stat().st_size
    n_errors = len(browser.errors)
    tab = _open(browser, page, "ft-plot")
    drawn_ms = browser.wait_until(tab, "window.featuretreeDrawnAt")
    assert drawn_ms < 2000 * SLOW, drawn_ms
    assert browser.errors[n_errors:] == []


def test_sunburst_page_click_zooms(browser, tmp_path):
    cr, g = browser, forest()
    page = write_sunburst(g, tmp_path / "sunburst.html")
    n_errors = len(cr.errors)
    tab = cr.open(page.as_uri())
    plot = cr.wait_until(tab, "(document.querySelector('.js-plotly-plot') || {}).id")
    cr.wait_until(tab, f"document.querySelectorAll('#{plot} path.surface').length === {g.number_of_nodes()}")
    xy = cr.evaluate(tab, (_POINT_IN % plot) + "('w4/0')")  # hover the sector whose label is the payload
    cr.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": xy[0], "y": xy[1]}, tab)
    cr.wait_until(tab, "document.querySelector('.hoverlayer .hovertext') !== null")
    assert XSS in cr.evaluate(tab, "document.querySelector('.hoverlayer').textContent")  # shown as text
    cr.pause(0.5)
    assert cr.dialogs == [] and cr.evaluate(tab, "document.querySelectorAll('img').length") == 0
    _click_sector(cr, tab, plot, "w4/0")
    assert cr.wait_until(tab, f"document.getElementById('{plot}')._fullData[0].level") == "w4/0"
    cr.wait_until(tab, f"{_DRAWN % plot}.length === 5")
    assert sorted(cr.evaluate(tab, _DRAWN % plot)) == ["w4/0", "w8/0", "w8/0/r4/0", "w8/0/r4/1", "w8/1"]
    assert cr.errors[n_errors:] == [] and cr.dialogs == []
