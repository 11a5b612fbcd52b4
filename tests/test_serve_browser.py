"""`featuretree serve` in a real headless Chromium (tests/_cdp.py): the served page draws from nodes it loads on
demand, searches through the server, opens a node by URL fragment (loading its ancestors), shows the card's
shaded contexts, runs find and search jobs from the browser with progress, keeps hostile corpus text inert,
and a 100k-node run is navigated within a time bound, with no console error."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

import networkx as nx
import pytest
from _cdp import Chromium

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from featuretree.export import save  # noqa: E402
from featuretree.serve import make_app  # noqa: E402
from featuretree.tree import FeatureTree  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="needs /usr/bin/chromium for the headless browser (apt-get install -y chromium)")]
SLOW = float(os.environ.get("FEATURETREE_SLOW_MACHINE", "1"))
XSS = "<script>alert(1)</script><img src=x onerror=alert(2)>"
DRAWN = "document.getElementById('ft-plot').data ? document.getElementById('ft-plot').data[0].ids : []"
PANEL = "(document.getElementById('ft-panel').dataset || {}).node"


@contextlib.contextmanager
def served(app):
    """Run `app` with uvicorn on a free 127.0.0.1 port in a thread; yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    end = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < end and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def hostile_run(path: Path) -> Path:
    """20 top features with 12 children each; contexts shaded by activation; one node's text is hostile."""
    g = nx.DiGraph(rungs=["w32", "w512"])
    for t in range(20):
        g.add_node(f"w32/{t}", rung="w32", width=32, index=t, freq=0.5 / (t + 1), label=f"topic {t}",
                   top_words=[f"word{t}"], act_hist=[3.0, [5, 9, 4, 1]],
                   context_acts=[[["a ", 0.0], ["bird", 3.0], [" sang ", 0.0], ["loud", 1.0]]])
        for c in range(12):
            n = f"w512/{t * 12 + c}"
            g.add_node(n, rung="w512", width=512, index=t * 12 + c, freq=0.4 / (t + 1) / (c + 2),
                       label=f"topic {t} part {c}", context_acts=[[["x ", 0.0], [f"tok{c}", 1.0]]],
                       parent_context_acts=[[0.5, 2.0]])  # the parent fires on both pieces, more on the second
            g.add_edge(f"w32/{t}", n, coverage=0.95, reverse=0.2, cos=0.5, kind="split")
    g.nodes["w512/3"]["label"] = "<b onmouseover=alert(3)>bold</b>"
    g.nodes["w512/3"]["context_acts"] = [[["x ", 0.0], [XSS, 2.0], [" y", 0.0]]]
    return save(FeatureTree(g), path)


STUB = r'''
import json, sys, time
args = sys.argv[1:]
kind, rest = args[0], args[1:]
dash = rest.index("--")
opts, (run, what) = rest[:dash], rest[dash + 1:]
for i in range(4):
    sys.stderr.write(f"\r{kind} {what}: step {i + 1}/4"); sys.stderr.flush(); time.sleep(0.3)
if kind == "find":
    json.dump({"hits": [{"node": "w512/14", "score": 2.5, "label": "topic 1 part 2"}]}, open(opts[1], "w"))
else:
    from featuretree.export import load, save
    tree = load(run); g = tree.graph
    g.add_node("w512/14/r4/0", rung="w512/14/r4", width=4, index=0, freq=0.001, refined=True, label="found it")
    g.add_edge("w512/14", "w512/14/r4/0", coverage=1.0, reverse=0.2, cos=0.1, kind="split", refined=True)
    save(tree, run)
    json.dump({"path": [{"node": n} for n in ("w32/1", "w512/14", "w512/14/r4/0")], "saved": run}, open(opts[1], "w"))
'''


@pytest.fixture(scope="module")
def browser():
    with Chromium(CHROMIUM, width=1200, height=800, timeout=240) as cr:
        yield cr


def test_served_page_loads_on_demand_searches_and_runs_jobs(browser, tmp_path):
    cr, run = browser, hostile_run(tmp_path / "run")
    stub = tmp_path / "stub.py"
    stub.write_text(STUB)
    app = make_app(run, command=lambda args: [sys.executable, str(stub), *args])
    n_errors = len(cr.errors)
    with served(app) as url:
        tab = cr.open(url)
        cr.wait_until(tab, f"{DRAWN}.length > 0", timeout=30)
        drawn = cr.evaluate(tab, DRAWN)
        # the first view: 20 tops and 8 children each (per_parent), the others as "smaller features" sectors
        assert len([i for i in drawn if i.startswith("w512/")]) == 20 * 8, drawn
        assert any(i.startswith("\u2026more:") for i in drawn)
        # search through the server, then open the first hit with Enter
        cr.evaluate(tab, "var b = document.getElementById('ft-search'); b.value = 'topic 7 part 1'; "
                         "b.dispatchEvent(new Event('input'))")
        cr.wait_until(tab, "document.querySelectorAll('#ft-results li[data-node]').length > 0")
        hits = cr.evaluate(tab, "[...document.querySelectorAll('#ft-results li')].map(l => l.dataset.node)")
        assert hits[0] == "w512/85", hits  # topic 7 part 1: the phrase in its label, and it fires most of those
        cr.evaluate(tab, "document.getElementById('ft-search').dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter'}))")
        cr.wait_until(tab, f"{PANEL} === 'w512/85'")
        assert cr.evaluate(tab, "document.getElementById('ft-plot').dataset.view") == "w32/7"
        assert "Siblings (11)" in cr.evaluate(tab, "document.getElementById('ft-panel').innerText")
        side = cr.evaluate(tab, "[...document.querySelectorAll('#ft-contexts .ft-pair .ft-ptok')].map(s => "
                                "[s.textContent, s.style.background])")  # the parent's shading beside its own
        assert [t for t, _ in side] == ["x ", "tok1"] and side[1][1] == "rgb(60, 120, 230)", side
        assert cr.evaluate(tab, "[...document.querySelectorAll('#ft-contexts .ft-pair .ft-tok')].map(s => s.textContent)") == ["tok1"]
        cr.evaluate(tab, "document.dispatchEvent(new KeyboardEvent('keydown', {key: 'ArrowUp'}))")
        cr.wait_until(tab, f"{PANEL} === 'w32/7'")
        shades = cr.evaluate(tab, "[...document.querySelectorAll('#ft-contexts .ft-tok')].map(s => s.textContent)")
        assert shades == ["bird", "loud"] and cr.evaluate(tab, "document.querySelectorAll('#ft-hist rect').length") == 4
        # the selected node is drawn even when it is not among its parent's 8 largest children
        cr.evaluate(tab, "location.hash = '#w512%2F95'")  # topic 7 part 11: the 12th child of w32/7
        cr.wait_until(tab, f"{PANEL} === 'w512/95'")
        cr.wait_until(tab, f"{DRAWN}.includes('w512/95')")
        # a fragment opens a node the page has not loaded: its ancestors come first; hostile text stays text
        tab2 = cr.open(url + "#w512%2F3")
        cr.wait_until(tab2, f"{PANEL} === 'w512/3'", timeout=30)
        assert cr.evaluate(tab2, "document.querySelector('#ft-panel h2').textContent") == "<b onmouseover=alert(3)>bold</b>"
        assert cr.evaluate(tab2, "document.querySelector('#ft-contexts .ft-tok').textContent") == XSS
        assert cr.evaluate(tab2, "document.querySelectorAll('img, #ft-panel b, #ft-panel script').length") == 0
        # find from the bar: progress on the job line, then the ranking in the panel
        cr.evaluate(tab2, "document.getElementById('ft-query').value = 'birds'; document.getElementById('ft-find').click()")
        cr.wait_until(tab2, "/step [1-4]\\/4/.test(document.getElementById('ft-job').textContent)", timeout=20)
        cr.wait_until(tab2, "!!document.getElementById('ft-found')", timeout=20)
        assert "w512/14" in cr.evaluate(tab2, "document.getElementById('ft-found').innerText")
        # search under a node from its card: the run is saved and reloaded, the page opens on the path's end
        cr.evaluate(tab2, "location.hash = '#w32%2F1'")
        cr.wait_until(tab2, f"{PANEL} === 'w32/1'")
        cr.evaluate(tab2, "document.getElementById('ft-search-under').click()")
        cr.wait_until(tab2, f"{PANEL} === 'w512/14/r4/0'", timeout=30)
        assert cr.evaluate(tab2, "document.querySelector('#ft-panel h2').textContent") == "found it"
        labels = cr.wait_until(tab2, "document.getElementById('ft-plot').data && document.getElementById('ft-plot').data[0].labels")
        assert "\u2605 found it" in labels  # the path is starred
    assert cr.dialogs == [] and cr.errors[n_errors:] == []


def big_run(path: Path) -> Path:
    """111,110 synthetic nodes: five rungs, each node with ten children in the next."""
    g = nx.DiGraph(rungs=[f"w{10 ** r}" for r in range(1, 6)])
    for r in range(1, 6):
        w = 10 ** r
        for i in range(w):
            g.add_node(f"w{w}/{i}", rung=f"w{w}", width=w, index=i, freq=(1.0 + (i % 7)) / (4 * w),
                       label=f"level {r} feature {i}", top_words=[f"tok{i}"],
                       context_acts=[[["some words ", 0.0], [f"tok{i}", 1.0 + i % 3], [" after", 0.0]]])
            if r > 1:
                g.add_edge(f"w{w // 10}/{i // 10}", f"w{w}/{i}", coverage=0.9, reverse=0.1, cos=0.3, kind="split")
    return save(FeatureTree(g), path)


def test_a_100k_node_run_is_served_and_navigated_quickly(browser, tmp_path):
    cr = browser
    t0 = time.perf_counter()
    app = make_app(big_run(tmp_path / "big"))
    setup_s = time.perf_counter() - t0
    assert len(app.state.featuretree.index) == 111_110
    n_errors = len(cr.errors)
    with served(app) as url:
        t = time.perf_counter()
        tab = cr.open(url)
        cr.wait_until(tab, "window.featuretreeDrawnAt", timeout=30)
        first_s = time.perf_counter() - t
        assert first_s < 4.0 * SLOW, first_s
        assert 0 < len(cr.evaluate(tab, DRAWN)) <= 300 + 100  # the budget, plus "smaller features" sectors
        t = time.perf_counter()
        cr.evaluate(tab, "location.hash = '#w100000%2F54321'")  # five levels down: chain, children, card
        cr.wait_until(tab, f"{PANEL} === 'w100000/54321'", timeout=30)
        deep_s = time.perf_counter() - t
        assert deep_s < 2.0 * SLOW, deep_s
        crumbs = cr.evaluate(tab, "document.getElementById('ft-crumbs').innerText")
        assert crumbs == "all features › w10/5 › w100/54 › w1000/543 › w10000/5432 › w100000/54321", crumbs
        t = time.perf_counter()
        cr.evaluate(tab, "var b = document.getElementById('ft-search'); b.value = 'feature 99999'; "
                         "b.dispatchEvent(new Event('input'))")
        cr.wait_until(tab, "!!document.querySelector('#ft-results li[data-node]')", timeout=30)
        search_s = time.perf_counter() - t
        assert cr.evaluate(tab, "document.querySelector('#ft-results li').dataset.node") == "w100000/99999"
        assert search_s < 5.0 * SLOW, search_s  # the first search builds the server's index of every node
        logging.getLogger(__name__).warning("100k nodes: server ready %.1f s, first view %.2f s, deep node %.2f s, "
                                            "first search %.2f s", setup_s, first_s, deep_s, search_s)
    assert cr.errors[n_errors:] == [] and cr.dialogs == []
