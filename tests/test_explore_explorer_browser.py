"""The explorer page and the sunburst in a real headless Chromium, driven over the DevTools protocol (tests/_cdp.py):
the page loads with no console error, draws (a screenshot that is not blank), a real mouse click on a sector
zooms into it and fills the panel, and hostile corpus text stays text (no dialog, no element, no title change)."""

from __future__ import annotations

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
def test_explorer_loads_draws_and_a_click_zooms_and_fills_the_panel(browser, tmp_path, kind):
    cr, g = browser, forest()
    page = write_explorer(g, tmp_path / f"{kind}.html", kind=kind, max_depth=None)
    n_errors = len(cr.errors)
    tab = _open(cr, page, "ft-plot")
    assert sorted(cr.evaluate(tab, _DRAWN % "ft-plot")) == sorted(g)  # every feature is a sector
    assert cr.evaluate(tab, "document.getElementById('ft-plot').data[0].type") == kind
    before = _screenshot_is_drawn(cr, tab, tmp_path / "before.png")
    assert cr.evaluate(tab, "document.getElementById('ft-panel').dataset.node || null") is None

    _click_sector(cr, tab, "ft-plot", "w4/1")
    cr.wait_until(tab, "document.getElementById('ft-panel').dataset.node === 'w4/1'")
    level = cr.wait_until(tab, "document.getElementById('ft-plot')._fullData[0].level")
    assert level == "w4/1"  # plotly zoomed into the clicked sector ...
    cr.wait_until(tab, f"{_DRAWN % 'ft-plot'}.length === 3")  # ... and draws only its subtree
    assert sorted(cr.evaluate(tab, _DRAWN % "ft-plot")) == ["w4/1", "w8/2", "w8/3"], kind
    panel = cr.evaluate(tab, "document.getElementById('ft-panel').innerText")
    assert "plants · leaf" in panel and "30.0% of tokens" in panel and "a green «leaf»" in panel
    cr.pause(1.0)  # let the zoom transition finish before the second screenshot
    after = _screenshot_is_drawn(cr, tab, tmp_path / "after.png")
    assert (np.abs(after.astype(int) - before.astype(int)).max(axis=2) > 30).mean() > 0.05, "the view did not change"
    assert cr.errors[n_errors:] == [] and cr.dialogs == []


def test_hostile_corpus_text_stays_text_in_the_explorer(browser, tmp_path):
    cr = browser
    page = write_explorer(forest(), tmp_path / "explorer.html", max_depth=None)
    n_errors = len(cr.errors)
    tab = _open(cr, page, "ft-plot")
    title = cr.evaluate(tab, "document.title")
    cr.evaluate(tab, "document.querySelector('#ft-plot path.surface').dispatchEvent(new MouseEvent('mouseover', "
                     "{bubbles: true}))")  # the hover label holds the text too
    _click_sector(cr, tab, "ft-plot", "w4/0")
    cr.wait_until(tab, "document.getElementById('ft-panel').dataset.node === 'w4/0'")
    cr.pause(1.0)  # an onerror handler would have fired by now
    assert cr.dialogs == [], f"a dialog fired: {cr.dialogs}"
    assert cr.evaluate(tab, "document.title") == title
    assert cr.evaluate(tab, "document.querySelectorAll('img, #ft-panel script, svg script').length") == 0
    panel = cr.evaluate(tab, "document.getElementById('ft-panel').innerText")
    assert panel.count(XSS) >= 3  # heading, chips and the context, all as literal text
    assert cr.evaluate(tab, "document.querySelector('#ft-panel mark').textContent") == f"«{XSS}»"
    assert cr.errors[n_errors:] == []


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
