"""Draw a FeatureTree: a sunburst or an icicle (plotly), and the explorer page (figure + feature panel).

Both figures show the same hierarchy, one ring (sunburst) or column (icicle) per rung, narrowest first;
a refined node ("w512/7/r64/3", feature 3 of a 64-wide dictionary trained where w512/7 fires) sits one
level under the node it refines. Sector sizes are firing frequencies, made valid for plotly's
branchvalues="total" (a parent is at least the sum of its children) as
    value(node) = max(freq(node), fsum(value(child) for each child))
`write_explorer` puts the figure beside a panel that shows everything about the clicked feature.
plotly is imported inside the functions that draw; nothing here imports torch or training code.
`featuretree.export` re-exports every public name of this module.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featuretree.config import FeatureTreeError
from featuretree.utils import graph_of, rung_key, rung_of, tree_parent, write_text

if TYPE_CHECKING:
    import networkx as nx
    import plotly.graph_objects as go

__all__ = ["COLORS", "icicle", "KINDS", "refinements", "sunburst", "write_explorer", "write_sunburst"]

log = logging.getLogger(__name__)

KINDS = ("sunburst", "icicle")
COLORS = ("rung", "coverage")
_MARK = re.compile(r"«([^«»]*)»")
_REFINED = re.compile(r"r\d+")


# ---- the layout both figures share -------------------------------------------------------------------
def _esc(text: Any, limit: int | None = None) -> str:
    s = str(text)
    if limit is not None and len(s) > limit:
        s = s[: limit - 1] + "…"
    return html.escape(s, quote=False)  # no &quot;: plotly shows it verbatim, and with < escaped no tag can form


def _fmt(x: Any) -> str:
    return f"{float(x):.2f}" if isinstance(x, (int, float)) else "?"


def _hover(n: str, d: dict, p: str | None, e: dict) -> str:
    lines = [f"<b>{_esc(n)}</b>  {_esc(d.get('label') or n, 120)}",
             f"width {_esc(d.get('width', '?'))} · fires on {100 * float(d.get('freq') or 0):.3g}% of tokens"]
    if p is not None:
        lines.append(f"parent {_esc(p)}: coverage {_fmt(e.get('coverage'))} · cos {_fmt(e.get('cos'))}")
    for c in list(d.get("top_contexts") or [])[:3]:
        # escape first, then bold the «firing token»: corpus text can never inject markup
        lines.append("• " + _MARK.sub(r"<b>«\1»</b>", _esc(c, 120)))
    return "<br>".join(lines)


def _refines(rung: str, node: str) -> bool:
    """Whether `rung` is a local dictionary trained where `node` fires ("w512/7/r64" for "w512/7")."""
    return rung.startswith(f"{node}/") and bool(_REFINED.fullmatch(rung[len(node) + 1:]))


def refinements(rung: str) -> int:
    """How many refinements deep a rung is: 0 for a ladder rung, 1 for "w512/7/r64", 2 for "w512/7/r64/3/r16".

    Example:
        >>> [refinements(r) for r in ("w512", "w512/7/r64", "w512/7/r64/3/r16")]
        [0, 1, 2]
    """
    return sum(1 for part in str(rung).split("/")[1:] if _REFINED.fullmatch(part))


def _colour_group(rung: str) -> str:
    """The colour a rung is drawn in with color="rung": its own for a ladder rung, one per refinement level."""
    level = refinements(rung)
    return rung if level == 0 else f"refined ×{level}"


def _n_dicts(rungs: list[str]) -> str:
    """The key's note on a refinement level: how many local dictionaries it gathers ("" for a ladder rung)."""
    if refinements(rungs[0]) == 0:
        return ""
    return f" ({len(rungs)} local dictionar{'y' if len(rungs) == 1 else 'ies'})"


def _rungs(g: nx.DiGraph, tree) -> list[str]:
    names = {rung_of(g, n) for n in g if not g.nodes[n].get("virtual")}
    names |= set(getattr(tree, "saes", None) or {}) | set(g.graph.get("rungs") or [])
    return sorted(names, key=rung_key)


@dataclass
class _Layout:
    """What a figure draws, one entry per shown node in preorder (every parent before its descendants)."""

    ids: list[str]
    parents: list[str]  # "" for the centre / the top-level sectors
    labels: list[str]
    values: list[float]
    hover: list[str]
    marker: dict
    title: str
    key: str  # the colour key line under the title
    maxdepth: int


HIGHLIGHT = "#FFD700"
"""Fill of the sectors on a highlighted path (a search's), with "★ " before their labels."""


def _layout(tree, root: str | None, max_depth: int | None, color: str, prefer_refined: bool = True,
            highlight=None) -> _Layout:
    import plotly.colors

    if color not in COLORS:
        raise FeatureTreeError(f"color={color!r} is not supported: use color='rung' or color='coverage'")
    if max_depth is not None and int(max_depth) < 1:
        raise FeatureTreeError(f"max_depth={max_depth} must be at least 1 (or None for every ring)")
    g = graph_of(tree)
    if root is not None and root not in g:
        raise FeatureTreeError(f"unknown node {root!r}: ids look like 'w1024/311'; list them with ft.to_frame(tree)")
    rungs = _rungs(g, tree)
    novel = {n for n, d in g.nodes(data=True) if d.get("novel")}
    virtual = {n for n, d in g.nodes(data=True) if d.get("virtual")}
    children: dict[str, list[str]] = {}
    parent_of: dict[str, str | None] = {}
    for n in g:
        if n in virtual:
            continue
        p = parent_of[n] = tree_parent(g, n)
        if p is not None and n not in novel:
            children.setdefault(p, []).append(n)
    if prefer_refined:  # a refined node shows its local dictionary's children, not also the ladder's
        hidden = 0
        for p, kids in children.items():
            local = [c for c in kids if _refines(rung_of(g, c), p)]
            if local and len(local) < len(kids):
                hidden += len(kids) - len(local)
                children[p] = local
        if hidden:
            log.info("figure: %d ladder children of refined nodes left out (prefer_refined=False shows them)", hidden)
    if root is not None and root not in virtual:
        tops = [root]
    else:
        tops = [n for n, p in parent_of.items() if p is None and n not in novel and rungs and rung_of(g, n) == rungs[0]]
    order, seen, stack = [], set(), list(reversed(tops))
    while stack:  # preorder: every parent before its descendants
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        order.append(n)
        stack.extend(reversed(children.get(n, [])))
    value: dict[str, float] = {}
    for n in reversed(order):  # bottom-up; fsum so plotly's own summation cannot exceed the parent
        kids = math.fsum(value[c] for c in children.get(n, []) if c in value)
        value[n] = max(float(g.nodes[n].get("freq") or 0.0), kids)
    n_features = g.number_of_nodes() - len(virtual)
    if root is None or root in virtual:
        log.info("figure: %d of %d features shown; %d left out (novel, or not under a %s root)",
                 len(order), n_features, n_features - len(order), rungs[0] if rungs else "?")
    else:
        log.info("figure of %s: %d features in its subtree", root, len(order))

    top_set = set(tops)
    # hover and colour use the real parent edge, also for a `root` drawn as the center
    edge = {n: g.edges[parent_of[n], n] if parent_of[n] is not None else {} for n in order}
    shown_rungs = sorted({rung_of(g, n) for n in order}, key=rung_key)
    # white borders only around sectors big enough to see: on thousands of slivers they wash the colour out.
    # Transparent rather than 0-wide elsewhere: a per-sector width array breaks plotly's icicle zoom (NaN paths).
    total = math.fsum(value[n] for n in tops if n in value) or 1.0
    line = dict(width=0.5, color=["white" if value[n] >= 2e-3 * total else "rgba(0,0,0,0)" for n in order])
    if color == "rung":
        # ladder rungs one colour each; refined rungs (one per refined node, so possibly many) one per level
        palette = plotly.colors.qualitative.Plotly + plotly.colors.qualitative.D3
        groups = list(dict.fromkeys(_colour_group(r) for r in rungs))
        colour_of = {grp: palette[i % len(palette)] for i, grp in enumerate(groups)}
        marker = dict(colors=[colour_of[_colour_group(rung_of(g, n))] for n in order], line=line)
        members: dict[str, list[str]] = {}  # colour group -> its shown rungs
        for r in shown_rungs:
            members.setdefault(_colour_group(r), []).append(r)
        key = " ".join(f'<span style="color:{colour_of[grp]}">■ {_esc(grp)}{_n_dicts(rs)}</span>'
                       for grp, rs in members.items())
    else:
        covs = [float(c) if isinstance(c := edge[n].get("coverage"), (int, float)) else 1.0 for n in order]
        marker = dict(colors=covs, colorscale="Viridis", cmin=0.0, cmax=1.0, showscale=True,
                      colorbar=dict(title=dict(text="coverage")), line=line)
        key = "colour = coverage P(parent | child)"
    where = f"subtree of {_esc(root)}: " if root is not None else ""
    marked = [n for n in (highlight or []) if n in seen]
    if highlight:
        missing = [n for n in highlight if n not in g]
        if missing:
            raise FeatureTreeError(f"highlight names nodes the tree does not have: {missing[:3]}")
        if color == "rung":  # coverage colours are a scale: there the label mark alone shows the path
            marker["colors"] = [HIGHLIGHT if n in set(marked) else c for n, c in zip(order, marker["colors"])]
        key += f'<br><span style="color:#b8860b">★ path: {_esc(" > ".join(marked))}</span>'
    on_path = set(marked)
    return _Layout(ids=order, parents=["" if n in top_set else parent_of[n] for n in order],
                   labels=[("★ " if n in on_path else "") + _esc(g.nodes[n].get("label") or n) for n in order],
                   values=[value[n] for n in order],
                   hover=[_hover(n, g.nodes[n], parent_of[n], edge[n]) for n in order], marker=marker,
                   title=f"{where}{len(order)} features in {len(shown_rungs)} rungs", key=key,
                   maxdepth=int(max_depth) if max_depth is not None else -1)


def _figure(tree, kind: str, root: str | None, max_depth: int | None, color: str,
            prefer_refined: bool = True, highlight=None) -> go.Figure:
    import plotly.graph_objects as go

    if kind not in KINDS:
        raise FeatureTreeError(f"kind={kind!r} is not a figure: use kind='sunburst' or kind='icicle'")
    lay = _layout(tree, root, max_depth, color, prefer_refined, highlight)
    common = dict(ids=lay.ids, parents=lay.parents, labels=lay.labels, values=lay.values, branchvalues="total",
                  hovertext=lay.hover, hoverinfo="text", textinfo="label", marker=lay.marker, maxdepth=lay.maxdepth,
                  leaf=dict(opacity=1.0))  # plotly fades leaves by default, which would blur the colour key
    if kind == "sunburst":
        trace = go.Sunburst(**common, insidetextorientation="radial")
    else:
        trace = go.Icicle(**common, tiling=dict(orientation="h"))  # narrowest rung on the left
    fig = go.Figure(trace)
    fig.update_layout(title=dict(text=lay.title, subtitle=dict(text=lay.key), x=0.5),
                      margin=dict(t=70, l=10, r=10, b=10))
    return fig


# ---- figures -----------------------------------------------------------------------------------------
def sunburst(tree, *, root: str | None = None, max_depth: int | None = None, color: str = "rung",
             prefer_refined: bool = True) -> go.Figure:
    """A plotly sunburst of the tree: ring 1 = the narrowest rung, ring 2 = the next, and so on.

    Without `root` it starts from the parentless features of the narrowest rung (novel features and
    anything not under them are left out, and counted in the log); with `root` (a node id) that node is
    the center and only its subtree is drawn. Sector size is the firing frequency, made valid for
    branchvalues="total" as value = max(freq, sum of children's values). `max_depth` rings are shown at
    once (click a sector to zoom in). `color` is "rung" (one colour per ladder rung, and one per
    refinement level: every first-level refinement is "refined ×1", and so on) or "coverage"
    (P(parent fires | child fires), continuous; roots are drawn at 1). With `prefer_refined` (default) a
    node that has been refined shows only its local dictionary's children: the ladder's children split
    the same tokens a second way, and both side by side would count them twice. All corpus text is
    HTML-escaped.
    `fig.write_html(path)` inlines plotly.js (include_plotlyjs=True, the default), so the file is
    self-contained (~5 MB) and opens offline; `write_sunburst` does that atomically.

    Example:
        >>> import networkx as nx
        >>> g = nx.DiGraph(); g.add_node("w2/0", rung="w2", freq=0.5, label="animals")
        >>> g.add_node("w8/1", rung="w8", freq=0.3, label="dogs"); g.add_edge("w2/0", "w8/1")
        >>> fig = sunburst(g)
        >>> list(fig.data[0].ids), list(fig.data[0].parents), list(fig.data[0].values)
        (['w2/0', 'w8/1'], ['', 'w2/0'], [0.5, 0.3])
    """
    return _figure(tree, "sunburst", root, max_depth, color, prefer_refined)


def icicle(tree, *, root: str | None = None, max_depth: int | None = None, color: str = "rung",
           prefer_refined: bool = True) -> go.Figure:
    """A plotly icicle of the tree: the sunburst's sectors (same ids, parents, values, hover, colours) as columns.

    Column 1 is the narrowest rung, column 2 the next, and so on, left to right; the options are those of
    `sunburst`. Long labels stay readable in an icicle's rectangles, where a sunburst's thin outer
    sectors have no room.

    Parameters
    ----------
    tree : FeatureTree or networkx.DiGraph
        The tree (or its graph) to draw.
    root : str, optional
        A node id: draw only its subtree (default: from every parentless feature of the narrowest rung).
    max_depth : int, optional
        Levels shown at once; click to zoom further (None: all).
    color : str
        "rung" (one colour per rung and refinement level) or "coverage" (P(parent | child)).
    prefer_refined : bool
        A refined node shows only its local dictionary's children, not the ladder's.

    Example:
        >>> import networkx as nx
        >>> g = nx.DiGraph(); g.add_node("w2/0", rung="w2", freq=0.5, label="animals")
        >>> g.add_node("w8/1", rung="w8", freq=0.3, label="dogs"); g.add_edge("w2/0", "w8/1")
        >>> fig = icicle(g)
        >>> fig.data[0].type, list(fig.data[0].ids), list(fig.data[0].values)
        ('icicle', ['w2/0', 'w8/1'], [0.5, 0.3])
    """
    return _figure(tree, "icicle", root, max_depth, color, prefer_refined)


def write_sunburst(tree, path: str | os.PathLike, *, root: str | None = None, max_depth: int | None = None,
                   color: str = "rung", kind: str = "sunburst", prefer_refined: bool = True) -> Path:
    """Write `sunburst(tree, ...)` as one self-contained HTML file (plotly.js inlined), atomically.

    kind="icicle" writes `icicle(tree, ...)` instead; the other options are those of `sunburst`.

    Parameters
    ----------
    tree : FeatureTree or networkx.DiGraph
        The tree (or its graph) to draw.
    path : str or Path
        The HTML file to write (replaced if it exists).
    root : str, optional
        A node id: draw only its subtree (default: from every parentless feature of the narrowest rung).
    max_depth : int, optional
        Levels shown at once; click to zoom further (None: all).
    color : str
        "rung" (one colour per rung and refinement level) or "coverage" (P(parent | child)).
    prefer_refined : bool
        A refined node shows only its local dictionary's children, not the ladder's.
    kind : str
        "sunburst" or "icicle".

    Example:
        >>> import tempfile, pathlib, networkx as nx
        >>> g = nx.DiGraph(); g.add_node("w2/0", rung="w2", freq=0.5)
        >>> p = write_sunburst(g, pathlib.Path(tempfile.mkdtemp()) / "sunburst.html")
        >>> p.stat().st_size > 1_000_000
        True
    """
    fig = _figure(tree, kind, root, max_depth, color, prefer_refined)
    page = fig.to_html(include_plotlyjs=True, full_html=True, default_height="97vh", div_id="ft-plot")
    title = fig.layout.title.text or ""  # already escaped, and free of markup
    # a page title, and no body margin (plotly sizes the plot to 100% of the body, so a margin scrolls)
    page = page.replace("<head>", f"<head><title>featuretree · {title}</title><style>body {{margin: 0}}</style>", 1)
    write_text(path, page)
    log.info("wrote %s to %s (%.1f MB)", kind, path, Path(path).stat().st_size / 1e6)
    return Path(path)


# ---- the explorer page -------------------------------------------------------------------------------
def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _facts(g: nx.DiGraph, n: str) -> dict:
    """What the panel shows for node `n`: plain JSON (numbers finite or null, text as strings)."""
    d, p = g.nodes[n], tree_parent(g, n)
    e = g.edges[p, n] if p is not None else {}
    rung = rung_of(g, n)
    return {"id": str(n), "label": str(d.get("label") or n), "rung": rung, "refinements": refinements(rung),
            "width": _num(d.get("width")), "index": _num(d.get("index")), "freq": _num(d.get("freq")),
            "parent": p, "parent_label": str(g.nodes[p].get("label") or p) if p is not None else None,
            "coverage": _num(e.get("coverage")), "reverse": _num(e.get("reverse")), "cos": _num(e.get("cos")),
            "kind": str(e["kind"]) if e.get("kind") is not None else None,
            "n_children": sum(1 for c in g.successors(n) if not g.nodes[c].get("novel")),
            **{k: [str(t) for t in d.get(k) or []] for k in ("top_tokens", "top_words", "words", "top_contexts")}}


def _script_json(obj: Any) -> str:
    """JSON for a <script type="application/json"> block: <, > and & escaped, so no text can close the script."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


_STYLE = """
body {margin: 0; font: 14px/1.4 system-ui, sans-serif; color: #222}
#ft-page {display: flex; height: 100vh}
#ft-figure {flex: 1 1 auto; min-width: 0}
#ft-panel {order: 2; flex: 0 0 36%; max-width: 640px; overflow-y: auto; padding: 12px 16px; border-left: 1px solid #ddd;
           box-sizing: border-box}
#ft-panel h2 {font-size: 18px; margin: 4px 0 8px; overflow-wrap: anywhere}
#ft-panel h3 {font-size: 14px; margin: 14px 0 4px; color: #555}
#ft-panel table {border-collapse: collapse; width: 100%}
#ft-panel td, #ft-panel th {padding: 3px 6px; border-bottom: 1px solid #eee; text-align: left; vertical-align: top;
                            overflow-wrap: anywhere}
#ft-panel th {color: #555; font-weight: normal; white-space: nowrap}
#ft-panel mark {background: #ffe28a; font-weight: bold}
#ft-panel .ft-chip {display: inline-block; margin: 2px; padding: 1px 6px; background: #eef; border-radius: 8px}
#ft-hint {color: #777}
"""

# Fills the panel with createElement / textContent only: node text is never parsed as HTML.
_SCRIPT = r"""
function featuretreeExplorer(gd) {
  "use strict";
  var nodes = JSON.parse(document.getElementById("ft-data").textContent).nodes;
  var panel = document.getElementById("ft-panel");
  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  function pct(x) { return x === null ? "?" : (100 * x).toPrecision(3) + "%"; }
  function num(x) { return x === null ? "?" : x.toFixed(2); }
  function context(text) {  // the «firing token» in a <mark>, the rest as text
    var td = el("td"), re = /\u00ab[^\u00ab\u00bb]*\u00bb/g, last = 0, m;
    while ((m = re.exec(text)) !== null) {
      td.appendChild(document.createTextNode(text.slice(last, m.index)));
      td.appendChild(el("mark", m[0]));
      last = re.lastIndex;
    }
    td.appendChild(document.createTextNode(text.slice(last)));
    return td;
  }
  function chips(items) {
    var p = el("p");
    if (!items.length) p.textContent = "(none)";
    items.forEach(function (t) { p.appendChild(el("span", t, "ft-chip")); });
    return p;
  }
  function select(id) {
    var n = nodes[id];
    if (!n) return;
    var rung = n.rung + (n.refinements ? " (refined \u00d7" + n.refinements + ")" : "");
    var rows = [["id", n.id], ["rung", rung], ["width", n.width], ["index", n.index],
                ["fires on", pct(n.freq) + " of tokens"], ["children", n.n_children]];
    if (n.parent !== null) {
      rows.push(["parent", n.parent + "  " + n.parent_label], ["coverage", num(n.coverage) + "  P(parent fires | it fires)"],
                ["reverse", num(n.reverse) + "  P(it fires | parent fires)"], ["cos", num(n.cos) + "  decoder cosine"],
                ["edge", n.kind]);
    } else {
      rows.push(["parent", "(none: a top-level feature)"]);
    }
    var facts = el("table"), ctx = el("table");
    facts.id = "ft-facts";
    ctx.id = "ft-contexts";
    rows.forEach(function (r) {
      var tr = el("tr");
      tr.appendChild(el("th", r[0]));
      tr.appendChild(el("td", r[1] === null ? "?" : r[1]));
      facts.appendChild(tr);
    });
    n.top_contexts.forEach(function (c, i) {
      var tr = el("tr");
      tr.appendChild(el("th", i + 1));
      tr.appendChild(context(c));
      ctx.appendChild(tr);
    });
    var h = el("h2", n.label);
    panel.replaceChildren(h, facts, el("h3", "Top tokens"), chips(n.top_tokens),
                          el("h3", "In words"), chips(n.top_words),
                          el("h3", "Distinctive words"), chips(n.words),
                          el("h3", "Top contexts (" + n.top_contexts.length + ")"),
                          n.top_contexts.length ? ctx : el("p", "(none)"));
    panel.dataset.node = n.id;
    panel.scrollTop = 0;
  }
  function onClick(ev) {  // returns nothing: plotly's own click-zoom goes on
    var pt = ev && ev.points && ev.points[0];
    if (pt) select(pt.id !== undefined ? pt.id : gd.data[0].ids[pt.pointNumber]);
  }
  gd.on("plotly_" + gd.data[0].type + "click", onClick);
  gd.on("plotly_click", onClick);
  var start = document.getElementById("ft-data").dataset.select;
  if (start) select(start);
}
"""


def write_explorer(tree, path: str | os.PathLike, *, root: str | None = None, kind: str = "sunburst",
                   max_depth: int | None = 3, color: str = "rung", prefer_refined: bool = True,
                   highlight=None) -> Path:
    """Write one self-contained HTML page to explore the tree offline: the figure, and a panel for the clicked node.

    Left: `sunburst` (or `icicle` with kind="icicle") with the same `root`, `max_depth`, `color` and
    `prefer_refined` options; click a sector to zoom into it (click the centre to zoom out). Right: the clicked node's id,
    label, rung, width, firing rate, parent with coverage / reverse coverage / decoder cosine, top tokens,
    distinctive words and every top context, the «firing token» highlighted. plotly.js is inlined once
    (~5 MB); node data is embedded as JSON and put on the page as text only, so corpus text cannot
    inject markup or script. With `root`, the panel starts on that node. Written atomically.

    Parameters
    ----------
    tree : FeatureTree or networkx.DiGraph
        The tree (or its graph) to draw.
    path : str or Path
        The HTML file to write (replaced if it exists); the returned Path points to it.
    root : str, optional
        A node id: draw only its subtree and open the panel on it (default: from every parentless feature of
        the narrowest rung).
    kind : str
        "sunburst" or "icicle".
    max_depth : int, optional
        Levels shown at once; click to zoom further (None: all).
    color : str
        "rung" (one colour per rung and refinement level) or "coverage" (P(parent | child)).
    prefer_refined : bool
        A refined node shows only its local dictionary's children, not the ladder's.
    highlight : list of str, optional
        Nodes to mark (a search's path, `path.node`): filled gold (colour "rung"), "★ " before their labels,
        and listed under the title; the panel opens on the last one.

    Example:
        >>> import tempfile, pathlib, networkx as nx
        >>> g = nx.DiGraph(); g.add_node("w2/0", rung="w2", freq=0.5, top_contexts=["a «dog» barked"])
        >>> p = write_explorer(g, pathlib.Path(tempfile.mkdtemp()) / "explorer.html")
        >>> page = p.read_text(encoding="utf-8"); page.count("ft-panel") > 0, '"a «dog» barked"' in page
        (True, True)
    """
    fig = _figure(tree, kind, root, max_depth, color, prefer_refined, highlight)
    g = graph_of(tree)
    data = {"kind": kind, "nodes": {n: _facts(g, n) for n in fig.data[0].ids}}
    if highlight and highlight[-1] in data["nodes"]:
        root = highlight[-1]  # the panel opens on the path's end
    title = fig.layout.title.text or ""  # already escaped, and free of markup
    plot = fig.to_html(include_plotlyjs=True, full_html=False, div_id="ft-plot", default_height="100vh",
                       default_width="100%", config={"responsive": True},
                       post_script="featuretreeExplorer(document.getElementById('{plot_id}'));")
    start = f' data-select="{html.escape(root)}"' if root is not None and root in data["nodes"] else ""
    page = "".join([
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n',
        f"<title>featuretree explorer · {title}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n",
        f'<script type="application/json" id="ft-data"{start}>{_script_json(data)}</script>\n',
        f"<script>{_SCRIPT}</script>\n",
        # the panel comes first in the document (CSS puts it on the right): it exists when the plot calls in
        '<div id="ft-page">\n<aside id="ft-panel"><p id="ft-hint">Click a sector to zoom into it and show its feature '
        "here; click the centre (the icicle's left column) to zoom back out.</p></aside>\n",
        '<div id="ft-figure">', plot, "</div>\n</div>\n</body>\n</html>\n",
    ])
    write_text(path, page)
    log.info("wrote explorer (%s, %d features) to %s (%.1f MB)", kind, len(data["nodes"]), path,
             Path(path).stat().st_size / 1e6)
    return Path(path)
