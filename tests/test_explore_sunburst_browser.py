"""Render write_sunburst's page in headless Chromium: it draws, is not blank, logs no JS error, runs no label."""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
from _cdp import read_png

from featuretree.explore import write_sunburst

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="needs /usr/bin/chromium for the headless render (apt-get install -y chromium)")]

PAYLOADS = ["<script>document.title='pwned'</script>", "<img src=x onerror=\"document.title='pwned'\">",
            "<script>alert(1)</script>"]
RUNG_COLOURS = {"w4": (0x63, 0x6E, 0xFA), "w8": (0xEF, 0x55, 0x3B), "w16": (0x00, 0xCC, 0x96)}  # plotly's first three


def make_graph() -> nx.DiGraph:
    """w4 -> w8 -> w16, two children per parent, every label and context an injection attempt or unicode."""
    g = nx.DiGraph(rungs=list(RUNG_COLOURS))
    for r, width in (("w4", 4), ("w8", 8), ("w16", 16)):
        for i in range(width // 2 if r != "w4" else 3):
            n = f"{r}/{i}"
            label = PAYLOADS[i % 3] if r == "w4" else f"{r} feature {i} · ünï"
            g.add_node(n, rung=r, width=width, index=i, freq=0.3 / width * (1 + i % 3), label=label,
                       top_tokens=["a"], top_contexts=[f"x «{PAYLOADS[i % 3]}» y"])
    for r, pr in (("w8", "w4"), ("w16", "w8")):
        for n in [n for n in g if g.nodes[n]["rung"] == r]:
            g.add_edge(f"{pr}/{g.nodes[n]['index'] // 2 % (3 if pr == 'w4' else 4)}", n, coverage=0.8, reverse=0.3,
                       cos=0.6, kind="split")
    return g


def chromium(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="featuretree-chromium-") as profile:  # a fresh profile per run
        return subprocess.run(
            [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--window-size=1000,800", "--virtual-time-budget=5000", *args],
            capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    return write_sunburst(make_graph(), tmp_path_factory.mktemp("browser") / "sunburst.html")


def test_screenshot_is_a_coloured_sunburst(page, tmp_path):
    png = tmp_path / "sunburst.png"
    chromium(f"--screenshot={png}", page.as_uri())
    assert png.is_file() and png.stat().st_size > 10_000, "Chromium wrote no screenshot"
    rgb = read_png(png)[:, :, :3]
    assert rgb.shape == (800, 1000, 3)
    pixels = rgb.reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 100, "the screenshot is (nearly) blank"
    assert (pixels != 255).any(axis=1).mean() > 0.1, "under a tenth of the page is drawn"
    for rung, colour in RUNG_COLOURS.items():  # every ring is drawn in its rung's colour
        share = (np.abs(pixels.astype(int) - colour).max(axis=1) <= 3).mean()
        assert share > 0.01, f"rung {rung}'s colour {colour} covers only {share:.2%} of the screenshot"


def test_dom_has_the_sunburst_no_js_error_and_no_injected_code(page):
    run = chromium("--dump-dom", "--enable-logging=stderr", "--v=0", page.as_uri())
    dom = run.stdout
    assert "sunburstlayer" in dom, f"plotly drew no sunburst; stderr tail: {run.stderr[-2000:]}"
    n_nodes = make_graph().number_of_nodes()
    assert len(re.findall(r'<path[^>]*class="surface"', dom)) == n_nodes  # one sector per feature
    console = [ln for ln in run.stderr.splitlines() if "CONSOLE" in ln]
    assert not [ln for ln in console if re.search(r"uncaught|error|warn|smaller than", ln, re.I)], console
    title = re.search(r"<title>(.*?)</title>", dom, re.S).group(1)
    assert title.startswith("featuretree ·") and "pwned" not in title  # neither payload ran
    assert "<img" not in dom and "<script>alert" not in dom and "<script>document" not in dom
    assert "&lt;script&gt;alert(1)&lt;/script&gt;</text>" in dom  # drawn as text inside a sector


def test_console_check_catches_errors(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>throw new Error('boom')</script></body></html>")
    run = chromium("--dump-dom", "--enable-logging=stderr", "--v=0", bad.as_uri())
    assert any("Uncaught" in ln and "boom" in ln for ln in run.stderr.splitlines() if "CONSOLE" in ln)
