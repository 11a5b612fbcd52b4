"""Draw a FeatureTree: a sunburst or an icicle (plotly), and the explorer page (figure + feature panel).

Both figures show the same hierarchy, one ring (sunburst) or column (icicle) per rung, narrowest first;
a refined node ("w512/7/r64/3", feature 3 of a 64-wide dictionary trained where w512/7 fires) sits one
level under the node it refines. Sector sizes are firing frequencies, made valid for plotly's
branchvalues="total" (a parent is at least the sum of its children) as
    value(node) = max(freq(node), fsum(value(child) for each child))
`write_explorer` puts the figure beside a panel that shows everything about the clicked feature.
`featuretree serve` (featuretree.serve) serves the same page for a run of any size, loading nodes on demand.
plotly is imported inside the functions that draw; nothing here imports torch or training code.
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

__all__ = ["card_facts", "COLORS", "explorer_data", "explorer_page", "icicle", "KINDS", "read_explorer_data",
           "refinements", "sunburst", "write_explorer", "write_sunburst"]

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
            highlight=None, novel_tops: bool = False, hover: bool = True) -> _Layout:
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
        if novel_tops:  # features no narrower one covers: top-level sectors of their own (the explorer)
            tops += sorted((n for n in novel if parent_of.get(n) is None), key=lambda n: (rung_key(rung_of(g, n)), n))
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
                   hover=[_hover(n, g.nodes[n], parent_of[n], edge[n]) for n in order] if hover else [], marker=marker,
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


def _r(x: Any, digits: int = 4) -> float | None:
    """A finite number to `digits` significant digits (the page shows 2-3), or None."""
    v = _num(x)
    return None if v is None else float(f"{v:.{digits}g}")


def _brief(g: nx.DiGraph, n: str) -> dict:
    """What the figure, the search and the links need of node `n`: plain JSON, compact."""
    d, p = g.nodes[n], tree_parent(g, n)
    e = g.edges[p, n] if p is not None else {}
    out = {"label": str(d.get("label") or n), "rung": rung_of(g, n), "freq": _r(d.get("freq")),
           "coverage": _r(e.get("coverage"), 3), "cos": _r(e.get("cos"), 3), "score": _r(d.get("label_score"), 3),
           "kind": str(e["kind"]) if e.get("kind") is not None else None,
           "top_words": [str(t) for t in (d.get("top_words") or d.get("top_tokens") or [])][:5],
           "words": [str(t) for t in d.get("words") or []][:5]}
    if d.get("layer") is not None:
        out["layer"] = str(d.get("layer"))
    return out


def _details(g: nx.DiGraph, n: str, n_contexts: int = 3) -> dict:
    """What only the card shows of node `n`: shaded contexts, activation histogram, context pattern."""
    d, out = g.nodes[n], {}
    shaded = [[[str(t), _r(v, 3) or 0.0] for t, v in c] for c in (d.get("context_acts") or [])[:n_contexts]]
    if shaded:  # [piece, activation] pairs; the page shades each piece
        out["contexts"] = shaded
        parent = [[_r(v, 3) or 0.0 for v in c] for c in (d.get("parent_context_acts") or [])[:n_contexts]]
        if parent and all(len(a) == len(c) for a, c in zip(parent, shaded)):  # the parent's, piece by piece
            out["parent_acts"] = parent
    else:  # older runs: the «marked» context strings
        out["marked"] = [str(c) for c in (d.get("top_contexts") or [])[:n_contexts]]
    hist = d.get("act_hist") or []
    if len(hist) == 2:
        out["hist"] = [_r(hist[0], 3), [int(c) for c in hist[1]]]
    pat = d.get("pattern")
    if isinstance(pat, dict):
        out["pattern"] = (f"{pat.get('side')} {' · '.join(map(str, pat.get('words', [])))} "
                          f"({100 * float(pat.get('share', 0)):.0f}% of its firings, "
                          f"{100 * float(pat.get('base', 0)):.0f}% of all the token's)")
    return out


def card_facts(tree, node: str, *, brief: bool = False, run: str | os.PathLike | None = None,
               n_contexts: int = 3) -> dict:
    """What the explorer shows of one node, as plain JSON: label, rung, firing rate, parent edge, words, and
    (unless `brief`) the card's shaded contexts, activation histogram, context pattern and saved effects.

    Parameters
    ----------
    tree : FeatureTree or networkx.DiGraph
        The tree (or its graph).
    node : str
        The node id, e.g. "w512/7".
    brief : bool
        Only what the figure, the search and links need (no contexts, histogram, pattern or effects).
    run : str or Path, optional
        The run directory whose effects/ files (`featuretree effects RUN NODE`) fill the "effects" entry.
    n_contexts : int
        Top contexts given.

    Example:
        >>> import networkx as nx
        >>> g = nx.DiGraph(); g.add_node("w2/0", rung="w2", freq=0.5, label="dogs", top_contexts=["a «dog»"])
        >>> f = card_facts(g, "w2/0"); f["label"], f["marked"]
        ('dogs', ['a «dog»'])
        >>> "marked" in card_facts(g, "w2/0", brief=True)
        False
    """
    g = graph_of(tree)
    if node not in g:
        raise FeatureTreeError(f"unknown node {node!r}: ids look like 'w1024/311'; list them with ft.to_frame(tree)")
    out = _brief(g, node)
    if not brief:
        out.update(_details(g, node, n_contexts))
        effects = _saved_effects(run, {node}).get(node)
        if effects:
            out["effects"] = effects
    return out


def _saved_effects(run, ids: set) -> dict:
    """{node: what the card shows of RUN/effects/NODE.json} for the nodes `featuretree effects` measured."""
    out: dict[str, dict] = {}
    folder = Path(run) / "effects" if run is not None else None
    if folder is None or not folder.is_dir():
        return out
    for f in sorted(folder.glob("*.json")):
        try:
            e = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            log.warning("skipping %s: %s", f, err)
            continue
        node = e.get("node")
        if node not in ids:
            continue
        summ, logits = e.get("summary") or {}, e.get("logits") or []

        def tokens(by: str, direction: str, logits=logits) -> list[str]:
            rows = [r for r in logits if r.get("by") == by and r.get("direction") == direction]
            return [str(r.get("token")) for r in sorted(rows, key=lambda r: r.get("rank", 0))][:6]

        steer = sorted(e.get("steering") or [], key=lambda r: r.get("rank", 0))[:6]
        out[node] = {"loss_change": _r(summ.get("loss_change"), 3), "loss_change_after": _r(summ.get("loss_change_after"), 3),
                     "n_firing": _num(summ.get("n_firing")), "promoted": tokens("measured", "promoted"),
                     "suppressed": tokens("measured", "suppressed"), "lens": tokens("lens", "promoted"),
                     "steering": [[str(r.get("token")), _r(r.get("p_clean"), 2), _r(r.get("p_steered"), 2)] for r in steer],
                     "prompt": str(steer[0].get("prompt")) if steer else None,
                     "scale": _num(steer[0].get("scale")) if steer else None}
    return out


def _packed(text: str) -> str:
    """`text` gzipped and base64-encoded: safe inside a <script> block (only A-Z a-z 0-9 + / =)."""
    import base64
    import gzip

    return base64.b64encode(gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)).decode("ascii")


def read_explorer_data(path: str | os.PathLike) -> dict:
    """The node data an explorer page written by `write_explorer` carries (ids, parents, values, nodes, ...).

    Parameters
    ----------
    path : str or Path
        The explorer HTML file.

    Example:
        >>> import tempfile, pathlib, networkx as nx
        >>> g = nx.DiGraph(); g.add_node("w2/0", rung="w2", freq=0.5, label="dogs")
        >>> p = write_explorer(g, pathlib.Path(tempfile.mkdtemp()) / "explorer.html")
        >>> d = read_explorer_data(p); d["ids"], d["nodes"][0]["label"]
        (['w2/0'], 'dogs')
    """
    import base64
    import gzip

    page = Path(path).read_text(encoding="utf-8")
    m = re.search(r'<script type="application/octet-stream" id="ft-data">([A-Za-z0-9+/=]*)</script>', page)
    if m is None:
        raise FeatureTreeError(f"{path} is not an explorer page written by featuretree (no ft-data block)")
    return json.loads(gzip.decompress(base64.b64decode(m.group(1))).decode("utf-8"))


_STYLE = """
body {margin: 0; font: 14px/1.4 system-ui, sans-serif; color: #222}
#ft-page {display: flex; height: 100vh}
#ft-main {flex: 1 1 auto; min-width: 0; display: flex; flex-direction: column}
#ft-bar {display: flex; flex-wrap: wrap; gap: 8px; align-items: center; padding: 6px 10px; border-bottom: 1px solid #ddd}
#ft-bar input[type=search] {flex: 1 1 220px; font: inherit; padding: 3px 6px}
#ft-bar select, #ft-bar button {font: inherit}
#ft-crumbs {padding: 4px 10px; color: #555; overflow-wrap: anywhere}
#ft-crumbs a, #ft-panel a {color: #1a56a8; cursor: pointer; text-decoration: none}
#ft-crumbs a:hover, #ft-panel a:hover {text-decoration: underline}
#ft-results {position: absolute; z-index: 10; background: #fff; border: 1px solid #bbb; max-height: 60vh;
             overflow-y: auto; margin: 0; padding: 0; list-style: none; min-width: 320px}
#ft-results li {padding: 3px 8px; cursor: pointer; overflow-wrap: anywhere}
#ft-results li:hover, #ft-results li.ft-on {background: #eef}
#ft-figure {flex: 1 1 auto; min-height: 0}
#ft-plot {width: 100%; height: 100%}
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
#ft-panel .ft-ctx {line-height: 1.7}
#ft-panel .ft-tok, #ft-panel .ft-ptok {border-radius: 3px}
#ft-panel .ft-pair {display: grid; grid-template-columns: 1fr 1fr; gap: 10px; font-size: 13px}
#ft-panel .ft-pair .ft-ctx {margin: 6px 0}
#ft-panel code {display: block; background: #f4f4f4; padding: 4px 6px; overflow-wrap: anywhere; user-select: all}
#ft-hint {color: #777}
#ft-bar #ft-query {flex: 0 1 220px; font: inherit; padding: 3px 6px}
#ft-job {color: #555; overflow-wrap: anywhere}
#ft-job[data-state=failed] {color: #b00020}
"""

# Builds the figure from the embedded data (only the rings in view, small siblings grouped) and fills the
# card with createElement / textContent only: node text is never parsed as HTML (hover text is escaped).
_SCRIPT = r"""
function featuretreeInflate(id) {  // a gzipped, base64-encoded block of the page, as text
  var b64 = document.getElementById(id).textContent, bin = atob(b64), bytes = new Uint8Array(bin.length);
  for (var i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return new Response(new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"))).text();
}
function featuretreeApi(url, body) {  // the served page's calls: JSON in, JSON out, errors as Error(detail)
  var opt = body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  return fetch(url, opt).then(function (r) {
    return r.json().then(function (j) { if (!r.ok) throw new Error(j.detail || r.statusText); return j; });
  });
}
function featuretreeStart() {
  if (window.featuretreeServed) {  // `featuretree serve`: plotly.js and the nodes come from the server
    var ps = document.createElement("script");
    ps.src = "plotly.js";
    ps.onload = function () {
      window.featuretreePlotlyAt = performance.now();
      featuretreeApi("api/meta").then(function (meta) {
        window.featuretreeDataAt = performance.now();
        featuretreeExplorer(document.getElementById("ft-plot"), meta, true);
      });
    };
    document.head.appendChild(ps);
    return;
  }
  featuretreeInflate("ft-plotlyjs").then(function (js) {
    var sc = document.createElement("script");
    sc.src = URL.createObjectURL(new Blob([js], {type: "text/javascript"}));
    sc.onload = function () {
      window.featuretreePlotlyAt = performance.now();
      featuretreeInflate("ft-data").then(function (text) {
        window.featuretreeDataAt = performance.now();
        featuretreeExplorer(document.getElementById("ft-plot"), JSON.parse(text));
      });
    };
    document.head.appendChild(sc);
  });
}
function featuretreeExplorer(gd, data, served) {
  "use strict";
  // one store for both pages: the static page fills it at once; the served one as nodes come into view
  // (kids[i] === null: node i has children the page has not loaded yet)
  var ids = [], facts = {}, marks = {}, index = {}, kids = [], parent = [], values = [], counts = [], colors = [];
  var tops = [], markedIds = {};
  function addNode(id, p, v, c, col, nk, f) {
    if (index[id] !== undefined) return index[id];
    var i = ids.length;
    ids.push(id); index[id] = i; parent.push(p); values.push(v); counts.push(c); colors.push(col);
    kids.push(nk ? null : []); facts[id] = f;
    if (markedIds[id]) marks[i] = true;
    return i;
  }
  function addRecords(recs, p) {  // records from the server: {id, p (parent id, "" at the top), v, c, col, nk, f}
    return recs.map(function (r) {
      return addNode(r.id, p !== undefined ? p : (r.p === "" ? -1 : index[r.p]), r.v, r.c, r.col, r.nk, r.f);
    });
  }
  if (!served) {
    data.ids.forEach(function (id, i) { addNode(id, data.parents[i], data.values[i], data.counts[i], data.colors[i], 0, data.nodes[i]); });
    data.marked.forEach(function (i) { marks[i] = true; });
    parent.forEach(function (p, i) { if (p >= 0) kids[p].push(i); });
    kids.forEach(function (k) { k.sort(function (a, b) { return values[b] - values[a]; }); });
    for (var i = 0; i < ids.length; i++) if (parent[i] < 0) tops.push(i);
    tops.sort(function (a, b) { return values[b] - values[a]; });
  } else {
    data.marked.forEach(function (id) { markedIds[id] = true; });
    tops = addRecords(data.tops, -1);
  }
  var panel = document.getElementById("ft-panel"), crumbs = document.getElementById("ft-crumbs");
  var box = document.getElementById("ft-search"), results = document.getElementById("ft-results");
  var colourBy = document.getElementById("ft-colour"), sizeBy = document.getElementById("ft-size");
  var view = null, selected = null, expanded = {}, depth = data.depth, per = data.per_parent;
  var MORE = "\u2026more:";

  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  function esc(t) { return String(t).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;"); }
  function cut(t, n) { t = String(t); return t.length > n ? t.slice(0, n - 1) + "\u2026" : t; }
  function pct(x) { return x === null || x === undefined ? "?" : (100 * x).toPrecision(3) + "%"; }
  function num(x) { return x === null || x === undefined ? "?" : x.toFixed(2); }
  function link(i, text) {
    var a = el("a", text === undefined ? ids[i] + "  " + facts[ids[i]].label : text);
    a.href = "#" + encodeURIComponent(ids[i]);
    return a;
  }
  function viridis(t) {  // 0..1 -> a colour of the viridis scale (5 stops, linear between)
    var s = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
    t = Math.max(0, Math.min(1, t)) * 4;
    var k = Math.min(3, Math.floor(t)), f = t - k, c = s[k].map(function (v, j) { return Math.round(v + f * (s[k + 1][j] - v)); });
    return "rgb(" + c.join(",") + ")";
  }
  function colourOf(i) {
    var f = facts[ids[i]], how = colourBy.value;
    if (how === "coverage") return f.coverage === null ? "#ccc" : viridis(f.coverage);
    if (how === "score") return f.score === null || f.score === undefined ? "#ccc" : viridis(2 * (f.score - 0.5));
    return data.palette[colors[i]];
  }
  function sizeOf(i) { return sizeBy.value === "count" ? counts[i] : values[i]; }

  // the sectors in view: `depth` rings under the view's node; of each parent its largest `per` children
  // (all of them once its "smaller features" sector was clicked); of those the `budget` largest, so the first
  // view stays readable and quick; the rest of each parent's children as one "n smaller features" sector
  function sectors() {
    var out = {ids: [], parents: [], labels: [], values: [], colors: [], hover: [], need: []};
    var cand = [], chosen = {}, forced = {};
    function collect(i, p, left) {
      cand.push([i, p]);
      if (left > 1) {
        var ks = kids[i];
        if (ks === null) { out.need.push(i); return; }  // served: its children are loaded, then drawn
        var shown = expanded[i] ? ks.length : Math.min(per, ks.length);
        for (var j = 0; j < ks.length; j++) {  // the largest `per`, and always the selected node and a starred path
          var must = ks[j] === selected || marks[ks[j]];
          if (j >= shown && !must) continue;
          if (expanded[i] || must) forced[ks[j]] = true;
          collect(ks[j], i, left - 1);
        }
      }
    }
    var roots = view === null ? tops.slice(0, expanded[-1] ? tops.length : data.top_shown) : [view];
    roots.forEach(function (r) { forced[r] = expanded[-1] || view !== null || forced[r]; collect(r, null, view === null ? depth : depth + 1); });
    cand.sort(function (a, b) { return sizeOf(b[0]) - sizeOf(a[0]); });
    var n = 0;
    cand.forEach(function (c) {
      if ((c[1] === null || chosen[c[1]]) && (n < data.budget || forced[c[0]])) { chosen[c[0]] = true; n++; }
    });
    function add(i, p) {
      var f = facts[ids[i]];
      out.ids.push(ids[i]); out.parents.push(p === null ? "" : ids[p]);
      out.labels.push((marks[i] ? "\u2605 " : "") + esc(cut(f.label, 60)));
      out.colors.push(marks[i] && colourBy.value === "rung" ? "#FFD700" : colourOf(i));
      var h = "<b>" + esc(ids[i]) + "</b>  " + esc(cut(f.label, 100)) + "<br>fires on " + pct(f.freq) + " of tokens";
      if (p !== null && f.coverage !== null) h += "<br>coverage " + num(f.coverage) + " \u00b7 cos " + num(f.cos);
      out.hover.push(h);
    }
    function more(key, p, count, value, what) {
      out.ids.push(MORE + key); out.parents.push(p); out.labels.push(count + " smaller features");
      out.values.push(value); out.colors.push("#e0e0e0"); out.hover.push(count + " smaller features " + what + ": click to draw them");
    }
    function walk(i, p) {  // preorder; returns the sector's value (at least the sum of its children's)
      add(i, p);
      var at = out.values.length, ks = kids[i] || [], total = 0, rest = 0, hidden = 0;
      out.values.push(0);
      var drawsKids = ks.some(function (k) { return chosen[k]; });
      ks.forEach(function (k) { if (chosen[k]) total += walk(k, i); else { rest += sizeOf(k); hidden++; } });
      if (drawsKids && hidden) { more(ids[i], ids[i], hidden, rest, "of " + esc(ids[i])); total += rest; }
      out.values[at] = Math.max(sizeOf(i), total);
      return out.values[at];
    }
    if (view === null) {
      var rest = 0, hidden = 0;
      tops.forEach(function (t) { if (chosen[t]) walk(t, null); else { rest += sizeOf(t); hidden++; } });
      if (hidden) more("top", "", hidden, rest, "at the top");
    } else {
      walk(view, null);
    }
    return out;
  }
  var drawing = 0;
  function draw() {
    var s = sectors(), whole = 0, at = ++drawing;
    if (s.need.length) {  // served: load the children the view needs, then draw (only the latest call draws)
      loadKids(s.need).then(function () { if (at === drawing) draw(); }, fail);
      return;
    }
    s.parents.forEach(function (p, j) { if (p === "") whole += s.values[j]; });
    // no text on slivers too thin to hold it (plotly would measure and then hide every one of them)
    s.labels = s.labels.map(function (t, j) { return s.values[j] >= 0.003 * whole ? t : ""; });
    var trace = {type: data.kind, ids: s.ids, parents: s.parents, labels: s.labels, values: s.values,
      branchvalues: "total", marker: {colors: s.colors, line: {width: 0.5, color: "white"}}, hovertext: s.hover,
      hoverinfo: "text", textinfo: "label", leaf: {opacity: 1}, sort: false};
    if (data.kind === "sunburst") trace.insidetextorientation = "radial"; else trace.tiling = {orientation: "h"};
    var title = view === null ? data.title : esc(ids[view]) + "  " + esc(cut(facts[ids[view]].label, 80));
    Plotly.react(gd, [trace], {margin: {t: 40, l: 10, r: 10, b: 10}, title: {text: title, x: 0.5}},
                 {responsive: true, displaylogo: false});
    gd.dataset.view = view === null ? "" : ids[view];
    if (!window.featuretreeDrawnAt) window.featuretreeDrawnAt = performance.now();  // ms since the page began
    listen();
  }
  function chain(i) { var c = []; while (i >= 0) { c.unshift(i); i = parent[i]; } return c; }
  function showCrumbs(i) {
    var parts = [el("a", "all features")];
    parts[0].href = "#";
    if (i !== null) chain(i).forEach(function (j) { parts.push(document.createTextNode(" \u203a ")); parts.push(link(j, ids[j])); });
    crumbs.replaceChildren.apply(crumbs, parts);
  }
  function chips(items) {
    var p = el("p");
    if (!items || !items.length) p.textContent = "(none)";
    (items || []).forEach(function (t) { p.appendChild(el("span", t, "ft-chip")); });
    return p;
  }
  function histogram(h) {  // bars of how often it fires at each activation, 0 .. max
    var ns = "http://www.w3.org/2000/svg", svg = document.createElementNS(ns, "svg"), counts = h[1];
    var top = Math.max.apply(null, counts) || 1, w = 240, ht = 60, bw = w / counts.length;
    svg.setAttribute("width", w); svg.setAttribute("height", ht + 14); svg.id = "ft-hist";
    counts.forEach(function (c, j) {
      var r = document.createElementNS(ns, "rect"), bh = Math.round(ht * c / top);
      r.setAttribute("x", j * bw + 1); r.setAttribute("y", ht - bh); r.setAttribute("width", bw - 2);
      r.setAttribute("height", bh); r.setAttribute("fill", "#6a8cc7");
      svg.appendChild(r);
    });
    var t = document.createElementNS(ns, "text");
    t.setAttribute("x", 0); t.setAttribute("y", ht + 12); t.setAttribute("font-size", "10");
    t.textContent = "0 \u2026 " + (h[0] === null ? "?" : h[0].toFixed(2)) + " activation";
    svg.appendChild(t);
    return svg;
  }
  function shaded(segs, parentSide) {  // each piece of the context on a background as strong as its activation
    var p = el("p", null, "ft-ctx"), top = 0;
    segs.forEach(function (s) { top = Math.max(top, s[1]); });
    segs.forEach(function (s) {
      if (s[1] > 0) {
        var span = el("span", s[0], parentSide ? "ft-ptok" : "ft-tok");
        span.style.background = (parentSide ? "rgba(60, 120, 230, " : "rgba(255, 140, 0, ") +
          (0.15 + 0.85 * s[1] / (top || 1)).toFixed(3) + ")";
        span.title = "activation " + s[1].toFixed(3);
        p.appendChild(span);
      } else {
        p.appendChild(document.createTextNode(s[0]));
      }
    });
    return p;
  }
  function marked(text) {  // older runs: the «firing token» in a <mark>, the rest as text
    var p = el("p", null, "ft-ctx"), re = /\u00ab[^\u00ab\u00bb]*\u00bb/g, last = 0, m;
    while ((m = re.exec(text)) !== null) {
      p.appendChild(document.createTextNode(text.slice(last, m.index)));
      p.appendChild(el("mark", m[0]));
      last = re.lastIndex;
    }
    p.appendChild(document.createTextNode(text.slice(last)));
    return p;
  }
  function links(list, empty) {
    var p = el("p");
    if (!list.length) p.textContent = empty;
    list.slice(0, 12).forEach(function (j, k) { if (k) p.appendChild(el("br")); p.appendChild(link(j)); });
    if (list.length > 12) { p.appendChild(el("br")); p.appendChild(document.createTextNode("\u2026 and " + (list.length - 12) + " more")); }
    return p;
  }
  function card(i) {
    var id = ids[i], n = facts[id], rows = [["id", id], ["rung", n.rung + (n.layer ? "  (layer " + n.layer + ")" : "")],
      ["fires on", pct(n.freq) + " of tokens"], ["label score", n.score === null || n.score === undefined ? "(not scored)" : num(n.score)]];
    if (n.pattern) rows.push(["context", n.pattern]);
    var facts_t = el("table");
    facts_t.id = "ft-facts";
    rows.forEach(function (r) { var tr = el("tr"); tr.appendChild(el("th", r[0])); tr.appendChild(el("td", r[1])); facts_t.appendChild(tr); });
    var parts = [el("h2", n.label), facts_t];
    if (n.hist) parts.push(el("h3", "Activation histogram (its firings on held-out tokens)"), histogram(n.hist));
    parts.push(el("h3", "Parent"));
    if (parent[i] >= 0) {
      var pp = el("p");
      pp.appendChild(link(parent[i]));
      pp.appendChild(el("br"));
      pp.appendChild(document.createTextNode("coverage " + num(n.coverage) + " = P(parent fires | it fires) \u00b7 decoder cos " + num(n.cos) + (n.kind ? " \u00b7 " + n.kind : "")));
      parts.push(pp);
    } else {
      parts.push(el("p", "(none: a top-level feature)"));
    }
    var sib = (parent[i] >= 0 ? kids[parent[i]] : tops).filter(function (j) { return j !== i; });
    parts.push(el("h3", "Children (" + kids[i].length + ")"), links(kids[i], "(none yet: refine it, below)"),
               el("h3", "Siblings (" + sib.length + ")"), links(sib, "(none)"),
               el("h3", "Top words"), chips(n.top_words), el("h3", "Distinctive words"), chips(n.words));
    var box2 = el("div");
    box2.id = "ft-contexts";
    (n.contexts || []).forEach(function (c, j) {  // with the parent's activations beside it, where saved
      var pa = n.parent_acts && n.parent_acts[j];
      if (!pa || pa.length !== c.length) { box2.appendChild(shaded(c)); return; }
      var pair = el("div", null, "ft-pair");
      pair.appendChild(shaded(c));
      pair.appendChild(shaded(c.map(function (s, k) { return [s[0], pa[k]]; }), true));
      box2.appendChild(pair);
    });
    (n.marked || []).forEach(function (c) { box2.appendChild(marked(c)); });
    var heading = n.parent_acts ? "Top contexts: each token shaded by its activation (orange) and the parent\u2019s (blue)"
                                : "Top contexts, each token shaded by its activation";
    parts.push(el("h3", heading), box2.childNodes.length ? box2 : el("p", "(none)"));
    var fx = data.effects[id];
    if (fx) {
      var ft = el("table");
      ft.id = "ft-effects";
      [["loss change", num(fx.loss_change) + " nats when ablated where it fires (" + fx.n_firing + " tokens)"],
       ["next token", num(fx.loss_change_after) + " nats one token later"],
       ["promotes", fx.promoted.join("  ")], ["suppresses", fx.suppressed.join("  ")], ["logit lens", fx.lens.join("  ")],
       ["steering", fx.steering.map(function (r) { return r[0] + " " + num(r[1]) + "\u2192" + num(r[2]); }).join(",  ") +
        (fx.prompt ? "  (prompt \u201c" + fx.prompt + "\u201d, scale " + fx.scale + ")" : "")]].forEach(function (r) {
        var tr = el("tr"); tr.appendChild(el("th", r[0])); tr.appendChild(el("td", r[1])); ft.appendChild(tr);
      });
      parts.push(el("h3", "Effects on the model"), ft);
    } else if (data.causal) {
      parts.push(el("h3", "Effects on the model"), el("code", "featuretree effects " + data.run + " " + id));
    }
    parts.push(el("h3", "Go deeper here"));
    if (served) {  // the server runs them and saves what they make into the run
      var act = el("p"), bRefine = el("button", "refine here"), bUnder = el("button", "search under here");
      bRefine.id = "ft-refine"; bUnder.id = "ft-search-under";
      bRefine.addEventListener("click", function () { runJob({kind: "refine", node: id}); });
      bUnder.addEventListener("click", function () { runJob({kind: "search", query: query.value, start: id}); });
      act.appendChild(bRefine); act.appendChild(document.createTextNode(" ")); act.appendChild(bUnder);
      act.appendChild(document.createTextNode("  (the query is the one in the bar above)"));
      parts.push(act);
    }
    parts.push(el("code", "featuretree refine " + data.run + " " + id),
               el("code", "featuretree search " + data.run + " <query> --start " + id));
    panel.replaceChildren.apply(panel, parts);
    panel.dataset.node = id;
    panel.scrollTop = 0;
  }
  function select(id, recentre) {  // a boolean on the static page, a promise of one when served
    if (!served) return show(id, recentre);
    return ensure(id).then(function (ok) { return ok && show(id, recentre); }, function (e) { fail(e); return false; });
  }
  function ensure(id) {  // served: the node, its ancestors, its and its parent's children, and its card, loaded
    var known = index[id] !== undefined ? Promise.resolve() :
      featuretreeApi("api/chain?id=" + encodeURIComponent(id)).then(function (r) { addRecords(r.chain); }, function () {});
    return known.then(function () {
      var i = index[id];
      if (i === undefined) return false;
      return Promise.all([loadKids(parent[i] >= 0 ? [i, parent[i]] : [i]), loadCard(i)]).then(function () { return true; });
    });
  }
  function loadKids(list) {
    list = list.filter(function (i) { return kids[i] === null; });
    if (!list.length) return Promise.resolve();
    return featuretreeApi("api/kids", {ids: list.map(function (i) { return ids[i]; })}).then(function (r) {
      list.forEach(function (i) { kids[i] = addRecords(r.kids[ids[i]] || [], i); });
    });
  }
  function loadCard(i) {
    var f = facts[ids[i]];
    if (f.full) return Promise.resolve();
    return featuretreeApi("api/card?id=" + encodeURIComponent(ids[i])).then(function (r) {
      Object.keys(r.facts).forEach(function (k) { f[k] = r.facts[k]; });
      if (r.facts.effects) data.effects[ids[i]] = r.facts.effects;
      f.full = true;
    });
  }
  function show(id, recentre) {
    var i = index[id];
    if (i === undefined) return false;
    selected = i;
    if (recentre) view = kids[i].length ? i : (parent[i] >= 0 ? parent[i] : null);
    card(i);
    showCrumbs(i);
    draw();
    if (decodeURIComponent(location.hash.slice(1)) !== id) history.replaceState(null, "", "#" + encodeURIComponent(id));
    return true;
  }
  function onClick(ev) {
    var pt = ev && ev.points && ev.points[0];
    if (!pt) return false;
    var id = pt.id !== undefined ? pt.id : gd.data[0].ids[pt.pointNumber];
    if (id.indexOf(MORE) === 0) {  // draw a parent's smaller children (lazily: only now)
      var rest = id.slice(MORE.length);
      expanded[rest === "top" ? -1 : index[rest]] = true;
      draw();
      return false;
    }
    var i = index[id];
    if (view !== null && i === view) { view = parent[i] >= 0 ? parent[i] : null; selected = i; card(i); showCrumbs(i); draw(); return false; }
    select(id, true);
    return false;  // we draw the zoom ourselves
  }
  var listening = false;
  function listen() {  // plotly gives the div its .on() when it first draws
    if (!listening && gd.on) { gd.on("plotly_" + data.kind + "click", onClick); listening = true; }
  }

  var asked = 0;
  function search(q) {  // labels, words and ids holding every word of the query; best: fires most
    q = q.trim().toLowerCase();
    if (q.length < 2) { results.replaceChildren(); results.hidden = true; return; }
    if (served) {  // the server ranks every node the same way
      var at = ++asked;
      featuretreeApi("api/search?q=" + encodeURIComponent(q)).then(function (r) {
        if (at === asked) showHits(r.hits.map(function (h) { return [h.id, h.label]; }));
      }, fail);
      return;
    }
    var terms = q.split(/\s+/), hits = [], rank = {};
    for (var i = 0; i < ids.length && hits.length < 2000; i++) {
      var f = facts[ids[i]], label = f.label.toLowerCase();
      var hay = (ids[i] + " " + label + " " + f.top_words.join(" ") + " " + f.words.join(" ")).toLowerCase();
      if (!terms.every(function (t) { return hay.indexOf(t) >= 0; })) continue;
      // the whole query in the label or as the id first, then in its words; ties: the feature firing most
      rank[i] = ids[i].toLowerCase() === q ? 3 : label.indexOf(q) >= 0 ? 2 : hay.indexOf(q) >= 0 ? 1 : 0;
      hits.push(i);
    }
    hits.sort(function (a, b) { return (rank[b] - rank[a]) || ((facts[ids[b]].freq || 0) - (facts[ids[a]].freq || 0)); });
    showHits(hits.slice(0, 30).map(function (i) { return [ids[i], facts[ids[i]].label]; }));
  }
  function showHits(hits) {  // [id, label] pairs, best first
    results.replaceChildren();
    hits.forEach(function (h, k) {
      var li = el("li", h[0] + "  " + h[1]);
      li.dataset.node = h[0];
      if (!k) li.className = "ft-on";
      li.addEventListener("mousedown", function (e) { e.preventDefault(); go(h[0]); });
      results.appendChild(li);
    });
    if (!hits.length) results.appendChild(el("li", "no feature matches"));
    results.hidden = false;
  }
  function go(id) { results.hidden = true; box.blur(); location.hash = "#" + encodeURIComponent(id); select(id, true); }
  box.addEventListener("input", function () { search(box.value); });
  box.addEventListener("keydown", function (e) {
    var items = Array.prototype.slice.call(results.querySelectorAll("li[data-node]")), on = results.querySelector(".ft-on");
    var k = items.indexOf(on);
    if (e.key === "Enter" && on) { go(on.dataset.node); e.preventDefault(); }
    else if (e.key === "ArrowDown" || e.key === "ArrowUp") {
      if (on) on.className = "";
      k = Math.max(0, Math.min(items.length - 1, k + (e.key === "ArrowDown" ? 1 : -1)));
      if (items[k]) items[k].className = "ft-on";
      e.preventDefault();
    } else if (e.key === "Escape") { results.hidden = true; box.blur(); }
  });
  box.addEventListener("blur", function () { setTimeout(function () { results.hidden = true; }, 150); });
  document.addEventListener("keydown", function (e) {  // keys walk the tree from the selected feature
    if (e.target === box || selected === null) { if (e.key === "/" && e.target !== box) { box.focus(); e.preventDefault(); } return; }
    var i = selected, sib = (parent[i] >= 0 ? kids[parent[i]] : tops) || [i], to = null;
    if (e.key === "ArrowUp" && parent[i] >= 0) to = parent[i];
    else if (e.key === "ArrowDown" && kids[i] && kids[i].length) to = kids[i][0];
    else if (e.key === "ArrowRight" || e.key === "ArrowLeft") to = sib[(sib.indexOf(i) + (e.key === "ArrowRight" ? 1 : sib.length - 1)) % sib.length];
    else if (e.key === "Escape") { view = null; selected = null; history.replaceState(null, "", "#"); showCrumbs(null); draw(); return; }
    else if (e.key === "/") { box.focus(); e.preventDefault(); return; }
    if (to !== null) { e.preventDefault(); location.hash = "#" + encodeURIComponent(ids[to]); }
  });
  // served: a query box with find / search buttons, and a line that shows the running job's progress
  var query = null, jobLine = null;
  if (served) {
    var bar = document.getElementById("ft-bar"), bFind = el("button", "find"), bGo = el("button", "search");
    query = el("input"); query.type = "text"; query.id = "ft-query"; query.placeholder = "a concept: find or search for it";
    bFind.id = "ft-find"; bGo.id = "ft-go"; jobLine = el("span", "", "ft-job"); jobLine.id = "ft-job";
    bFind.addEventListener("click", function () { runJob({kind: "find", query: query.value}); });
    bGo.addEventListener("click", function () { runJob({kind: "search", query: query.value}); });
    query.addEventListener("keydown", function (e) { if (e.key === "Enter") runJob({kind: "find", query: query.value}); });
    [query, bFind, bGo, jobLine].forEach(function (x) { bar.appendChild(x); });
  }
  function fail(e) {  // served: a failed call is said on the job line, never thrown
    if (jobLine) { jobLine.textContent = String(e && e.message || e); jobLine.dataset.state = "failed"; }
  }
  function runJob(req) {
    if (req.kind !== "refine" && !String(req.query || "").trim()) { fail("type a word or phrase in the box first"); return; }
    jobLine.textContent = req.kind + ": starting\u2026"; jobLine.dataset.state = "running";
    featuretreeApi("api/jobs", req).then(function (j) { poll(j.id); }, fail);
  }
  function poll(jid) {
    featuretreeApi("api/jobs/" + jid).then(function (j) {
      jobLine.dataset.state = j.state;
      jobLine.textContent = j.kind + " " + j.what + ": " + (j.state === "running" ? (j.progress || "running\u2026") :
                                                         j.state === "failed" ? j.error : "done");
      if (j.state === "running") { setTimeout(function () { poll(jid); }, 400); return; }
      if (j.state !== "done") return;
      if (j.kind === "find") { found(j); return; }
      location.hash = "#" + encodeURIComponent(j.select);  // the run has new nodes: start again from the server
      location.reload();
    }, fail);
  }
  function found(j) {  // find's ranking in the panel, each node a link
    var t = el("table");
    t.id = "ft-found";
    var head = el("tr");
    ["node", "score", "label"].forEach(function (h) { head.appendChild(el("th", h)); });
    t.appendChild(head);
    j.result.forEach(function (r) {
      var tr = el("tr"), td = el("td"), a = el("a", r.node);
      a.href = "#" + encodeURIComponent(r.node);
      td.appendChild(a); tr.appendChild(td); tr.appendChild(el("td", num(r.score))); tr.appendChild(el("td", r.label));
      t.appendChild(tr);
    });
    panel.replaceChildren(el("h2", "find: " + j.what), t);
    panel.dataset.node = "";
    panel.scrollTop = 0;
  }
  colourBy.addEventListener("change", draw);
  sizeBy.addEventListener("change", draw);
  window.addEventListener("hashchange", function () {
    var id = decodeURIComponent(location.hash.slice(1));
    if (!id) { view = null; selected = null; showCrumbs(null); draw(); return; }
    if (selected === null || ids[selected] !== id) select(id, true);
  });
  var start = decodeURIComponent(location.hash.slice(1)) || data.select;
  showCrumbs(null);
  Promise.resolve(start ? select(start, true) : false).then(function (ok) { if (!ok) draw(); });
}
"""


def write_explorer(tree, path: str | os.PathLike, *, root: str | None = None, kind: str = "sunburst",
                   max_depth: int | None = 3, color: str = "rung", prefer_refined: bool = True,
                   highlight=None, run: str | os.PathLike | None = None, per_parent: int = 8,
                   top_shown: int = 64, max_sectors: int = 300) -> Path:
    """Write one self-contained HTML page to explore the tree offline: a readable figure, search, and a card
    for the selected feature.

    The figure (sunburst, or icicle with kind="icicle") opens on the top levels only: `max_depth` rings, of
    each parent its `per_parent` largest children (and `top_shown` top-level features: the narrowest rung's, then
    the novel features no narrower one covers), the rest grouped
    in one grey "n smaller features" sector that draws them when clicked; at most `max_sectors`
    sectors, the largest, are drawn at once. Clicking a feature centres the
    figure on it (its next rings are drawn only then) and opens its card; clicking the centre goes up. The
    bar above it has a search box over labels, words and ids ("/" focuses it; Enter opens the first hit),
    and the colour (rung, coverage, label score) and size (firing rate, number of features) of sectors;
    breadcrumbs lead back to the root; arrow keys walk the tree (up: parent, down: first child, left /
    right: siblings; Escape: everything); the URL fragment (`page.html#w512/7`) opens a node directly.
    The card shows label and label score, rung (and layer), firing rate, an activation histogram, the
    parent with coverage and decoder cosine, children and siblings (links), top and distinctive words,
    the top contexts with each token shaded by the feature's activation, the context pattern of a token
    feature, its effects on a causal LM where `featuretree effects RUN NODE` saved them (loss change when
    ablated, promoted / suppressed tokens, steering), and the `featuretree refine` / `search --start` commands that go deeper there. plotly.js is
    inlined once (~4.6 MB); node data is embedded as JSON and shown as text only (hover text escaped), so
    corpus text cannot inject markup or script. Written atomically.

    Parameters
    ----------
    tree : FeatureTree or networkx.DiGraph
        The tree (or its graph) to draw.
    path : str or Path
        The HTML file to write (replaced if it exists); the returned Path points to it.
    root : str, optional
        A node id: the page holds only its subtree and opens on it.
    kind : str
        "sunburst" or "icicle".
    max_depth : int, optional
        Rings drawn at once (None: all of them).
    color : str
        The colour the page opens with: "rung" (one per rung and refinement level) or "coverage".
    prefer_refined : bool
        A refined node shows only its local dictionary's children, not the ladder's.
    highlight : list of str, optional
        Nodes to mark (a search's path, `path.node`): filled gold (colour "rung"), "★ " before their labels;
        the page opens on the last one.
    run : str or Path, optional
        The run directory named in the card's commands (default: "RUN"); its effects/ files fill the cards.
    per_parent, top_shown : int
        Children drawn per parent, and top-level features drawn, before the rest are grouped.
    max_sectors : int
        Most sectors drawn at once (the largest; a clicked "smaller features" sector draws its own anyway).

    Example:
        >>> import tempfile, pathlib, networkx as nx
        >>> g = nx.DiGraph(); g.add_node("w2/0", rung="w2", freq=0.5, top_contexts=["a «dog» barked"])
        >>> p = write_explorer(g, pathlib.Path(tempfile.mkdtemp()) / "explorer.html")
        >>> read_explorer_data(p)["nodes"][0]["marked"]
        ['a «dog» barked']
    """
    data = explorer_data(tree, root=root, kind=kind, max_depth=max_depth, color=color, prefer_refined=prefer_refined,
                         highlight=highlight, run=run, per_parent=per_parent, top_shown=top_shown,
                         max_sectors=max_sectors)
    write_text(path, explorer_page(data))
    if data["effects"]:
        log.info("explorer: effects of %d nodes from %s/effects", len(data["effects"]), run)
    log.info("wrote explorer (%s, %d features) to %s (%.1f MB)", kind, len(data["ids"]), path,
             Path(path).stat().st_size / 1e6)
    return Path(path)


def explorer_data(tree, *, root: str | None = None, kind: str = "sunburst", max_depth: int | None = 3,
                  color: str = "rung", prefer_refined: bool = True, highlight=None,
                  run: str | os.PathLike | None = None, per_parent: int = 8, top_shown: int = 64,
                  max_sectors: int = 300, nodes: bool = True) -> dict:
    """The data an explorer page draws from, as plain JSON: every shown node in preorder (ids, parent
    indices, sector values, subtree counts, colour indices into `palette`) and, with `nodes`, each node's
    `card_facts`; the options are those of `write_explorer`.

    `featuretree serve` builds it with nodes=False and sends each node's facts when the page asks for them.

    Parameters
    ----------
    tree : FeatureTree or networkx.DiGraph
        The tree (or its graph) to draw.
    root, kind, max_depth, color, prefer_refined, highlight, run, per_parent, top_shown, max_sectors
        As in `write_explorer`.
    nodes : bool
        Include every node's facts ("nodes") and the saved effects ("effects"); False leaves both out
        ("effects" is then {}).

    Example:
        >>> import networkx as nx
        >>> g = nx.DiGraph(); g.add_node("w2/0", rung="w2", freq=0.5); g.add_node("w8/1", rung="w8", freq=0.2)
        >>> g.add_edge("w2/0", "w8/1", coverage=0.9)
        >>> d = explorer_data(g, nodes=False)
        >>> d["ids"], d["parents"], d["values"], d["counts"], "nodes" in d
        (['w2/0', 'w8/1'], [-1, 0], [0.5, 0.2], [2, 1], False)
    """
    if kind not in KINDS:
        raise FeatureTreeError(f"kind={kind!r} is not a figure: use kind='sunburst' or kind='icicle'")
    if min(per_parent, top_shown, max_sectors) < 1:
        raise FeatureTreeError(f"per_parent={per_parent}, top_shown={top_shown} and max_sectors={max_sectors} must be "
                               "at least 1")
    lay = _layout(tree, root, None, "rung", prefer_refined, highlight, novel_tops=True, hover=False)
    g = graph_of(tree)
    at = {n: i for i, n in enumerate(lay.ids)}
    counts = [1] * len(lay.ids)
    for i in range(len(lay.ids) - 1, -1, -1):  # preorder reversed: children before parents
        p = lay.parents[i]
        if p:
            counts[at[p]] += counts[i]
    marked = set(highlight or [])
    start = highlight[-1] if highlight and highlight[-1] in at else root if root in at else None
    title = lay.title + (f" · {color}" if color != "rung" else "")
    palette = list(dict.fromkeys(lay.marker["colors"]))
    colour_at = {c: i for i, c in enumerate(palette)}
    data = {"kind": kind, "ids": lay.ids, "parents": [at[p] if p else -1 for p in lay.parents],
            "values": [_r(v, 6) for v in lay.values], "counts": counts, "palette": palette,
            "colors": [colour_at[c] for c in lay.marker["colors"]], "color": color,
            "marked": [at[n] for n in lay.ids if n in marked],
            "causal": run is not None and (Path(run) / "faithfulness.json").is_file(),  # a causal LM's run
            "depth": int(max_depth) if max_depth is not None else 10_000, "per_parent": int(per_parent),
            "top_shown": int(top_shown), "budget": int(max_sectors), "effects": {}, "title": title,
            "select": start, "run": str(run or "RUN")}
    if nodes:
        data["nodes"] = [_brief(g, n) | _details(g, n) for n in lay.ids]
        data["effects"] = _saved_effects(run, set(lay.ids))
    return data


def explorer_page(data: dict | None = None) -> str:
    """The explorer's HTML: with `data` (from `explorer_data`, nodes=True) one self-contained page, plotly.js
    and the data inlined; without, the page `featuretree serve` sends, which loads plotly.js from
    "plotly.js" and its nodes from the server's "api/..." as they come into view.

    Parameters
    ----------
    data : dict, optional
        What `explorer_data` returned; None for the served page.

    Example:
        >>> page = explorer_page()
        >>> "featuretreeServed = true" in page and 'id="ft-data"' not in page
        True
    """
    if data is not None and "nodes" not in data:
        raise FeatureTreeError("explorer_page(data) needs explorer_data(..., nodes=True): the page embeds every node")
    color = data["color"] if data is not None else "rung"
    title = data["title"] if data is not None else "served"  # the layout's title is escaped already
    options = "".join(f'<option value="{v}"{" selected" if v == color else ""}>{t}</option>'
                      for v, t in (("rung", "rung"), ("coverage", "coverage"), ("score", "label score")))
    if data is None:
        blocks = "<script>window.featuretreeServed = true;</script>\n"
    else:
        from plotly.offline import get_plotlyjs

        body = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        # plotly.js and the data travel gzipped + base64 (a third of the size) and are inflated by the browser
        blocks = (f'<script type="application/octet-stream" id="ft-plotlyjs">{_packed(get_plotlyjs())}</script>\n'
                  f'<script type="application/octet-stream" id="ft-data">{_packed(body)}</script>\n')
    return "".join([
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<link rel="icon" href="data:,">\n',
        f"<title>featuretree explorer · {title}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n",
        blocks, f'<script>{_SCRIPT}</script>\n',
        '<div id="ft-page">\n<aside id="ft-panel"><p id="ft-hint">Click a sector to centre the figure on it and show '
        "its feature here; click the centre to go up. Search with the box above (or press /).</p></aside>\n",
        '<div id="ft-main"><div id="ft-bar"><input type="search" id="ft-search" placeholder="search labels, words, ids"'
        ' autocomplete="off"><label>colour <select id="ft-colour">', options, '</select></label>'
        '<label>size <select id="ft-size"><option value="freq">firing rate</option><option value="count">'
        "number of features</option></select></label></div>\n",
        '<ul id="ft-results" hidden></ul><div id="ft-crumbs"></div>\n',
        '<div id="ft-figure"><div id="ft-plot"></div></div></div>\n</div>\n',
        "<script>featuretreeStart();</script>\n</body>\n</html>\n",
    ])
