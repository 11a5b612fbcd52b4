"""Export a FeatureTree: save/load a run directory, a pandas table, GraphML, and the plotly figures.

On disk a tree is `config.json`, `tree.json` (networkx node-link JSON) and `saes/<rung>/` (SAELens
layout); every file is written atomically and nothing else in the directory is touched. The figures
(sunburst, icicle, write_sunburst, write_explorer) live in featuretree.explore.
torch, the tree module and plotly are imported inside the functions that need them, so tables and
GraphML work on a bare nx.DiGraph and importing this module never pulls in training code.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import networkx as nx
import pandas as pd

from featuretree.config import Config, FeatureTreeError
from featuretree.utils import (
    atomic_path,
    graph_of,
    rung_key,
    rung_of,
    store_path,
    tree_edge,
    tree_parent,
    write_json,
)

if TYPE_CHECKING:
    from featuretree.tree import FeatureTree

__all__ = ["from_frame", "from_graphml", "load", "save", "to_frame", "to_graphml"]

log = logging.getLogger(__name__)

CONFIG_FILE, TREE_FILE, SAES_DIR = "config.json", "tree.json", "saes"
_GRAPHML_JSON = "featuretree_json"  # graph attribute naming the attributes stored as JSON text in GraphML
_FRAME_COLUMNS = ["node", "rung", "width", "index", "freq", "label", "parent", "coverage", "cos", "kind",
                  "depth", "n_children", "top_tokens", "top_contexts"]
_EDGE_COLUMNS = ["parent", "child", "coverage", "reverse", "cos", "kind"]


# ---- helpers -----------------------------------------------------------------------------------------
def _plain(v: Any) -> Any:
    """A JSON-safe copy: numpy/torch scalars and arrays -> Python, tuples/sets -> lists, Paths -> str."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        return [_plain(x) for x in v]
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    if hasattr(v, "tolist"):  # numpy scalar/array, torch tensor
        return _plain(v.tolist())
    raise FeatureTreeError(f"cannot store {v!r} (type {type(v).__name__}) as JSON: keep graph attributes to "
                           "numbers, strings, lists and dicts")


def _check_rung_name(rung: str) -> str:
    parts = str(rung).split("/")
    if not rung or any(p in ("", ".", "..") or "\\" in p for p in parts):
        raise FeatureTreeError(f"rung name {rung!r} cannot be a directory under {SAES_DIR}/: use names like "
                               "'w512' or 'w512/7/r64'")
    return str(rung)


# ---- save / load -------------------------------------------------------------------------------------
def save(tree: FeatureTree, path: str | os.PathLike, *, dictionaries: bool = True) -> Path:
    """Write `tree` to directory `path`: config.json, tree.json (node-link) and saes/<rung>/ per dictionary.

    Other files in `path` (e.g. an `acts/` store) are left alone; tree.json is written last.
    `dictionaries=False` leaves saes/ as it is (a caller that has just written every rung there, as build does).

    Example:
        >>> import tempfile, networkx as nx
        >>> from featuretree.sae import TopKSAE
        >>> from featuretree.tree import FeatureTree
        >>> g = nx.DiGraph(rungs=["w4"]); g.add_node("w4/0", rung="w4", freq=0.5)
        >>> d = save(FeatureTree(g, {"w4": TopKSAE(8, 4, 2)}), tempfile.mkdtemp())
        >>> sorted(p.name for p in d.iterdir())
        ['config.json', 'saes', 'tree.json']
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rungs = sorted(tree.saes, key=rung_key)
    for rung in rungs:
        if dictionaries:
            tree.saes[rung].save(path / SAES_DIR / _check_rung_name(rung))
        else:
            _check_rung_name(rung)
    write_json(path / CONFIG_FILE, tree.config.to_dict() if tree.config is not None else {})
    data = _plain(nx.node_link_data(tree.graph, edges="edges"))
    store = store_path(tree)
    if store is not None and store.is_dir():  # saved elsewhere than its run: point back at the run's store
        tree.graph.graph["acts"] = data["graph"]["acts"] = os.path.relpath(store, path)  # tree.path moves below
    data["saes"] = rungs  # which saes/ subdirectories belong to this tree (stale ones may linger)
    write_json(path / TREE_FILE, data)
    log.info("saved %d nodes, %d edges and %d dictionaries to %s", tree.graph.number_of_nodes(),
             tree.graph.number_of_edges(), len(rungs), path)
    tree.path = path
    return path


def _read_json(p: Path, what: str) -> Any:
    if not p.is_file():
        raise FeatureTreeError(f"{p.parent} has no {p.name} ({what}): it is not a saved feature tree; "
                               "write one with ft.save(tree, path)")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise FeatureTreeError(f"{p} is not readable JSON ({e}): re-save the tree with ft.save(tree, path)") from e


def load(path: str | os.PathLike) -> FeatureTree:
    """Read a tree written by `save`: graph, dictionaries and config (None if config.json is {}).

    Parameters
    ----------
    path : str or Path
        The directory `save` (or `featuretree build`) wrote: tree.json, config.json and saes/.

    Example:
        >>> import tempfile, networkx as nx
        >>> from featuretree.tree import FeatureTree
        >>> g = nx.DiGraph([("w2/0", "w8/1")])
        >>> load(save(FeatureTree(g), tempfile.mkdtemp())).graph.edges
        OutEdgeView([('w2/0', 'w8/1')])
    """
    from featuretree.dictionaries import load_dictionary
    from featuretree.tree import FeatureTree

    path = Path(path)
    if not path.is_dir():
        raise FeatureTreeError(f"no saved tree at {path}: the directory does not exist; write one with "
                               "ft.save(tree, path) or check the path")
    if not (path / TREE_FILE).is_file() and (path / "run.json").is_file():
        stage = (_read_json(path / "run.json", "the run record") or {}).get("stage", "?")
        raise FeatureTreeError(f"{path} is an unfinished run (it stopped at stage {stage!r}): rerun the same "
                               "`featuretree build` to finish it, then load it")
    cfg = _read_json(path / CONFIG_FILE, "the run's settings")
    data = _read_json(path / TREE_FILE, "the feature graph")
    try:
        config = Config.from_dict(cfg) if cfg else None
    except (FeatureTreeError, TypeError) as e:
        raise FeatureTreeError(f"{path / CONFIG_FILE} is not a valid Config: {e}") from e
    try:
        graph = nx.node_link_graph(data, directed=True, multigraph=False, edges="edges")
    except (KeyError, TypeError, AttributeError, nx.NetworkXError) as e:
        raise FeatureTreeError(f"{path / TREE_FILE} is not networkx node-link data ({e!r}): re-save the tree "
                               "with ft.save(tree, path)") from e
    if "saes" in data:
        rungs = [_check_rung_name(r) for r in data["saes"]]
    else:  # a tree.json from another tool: take every saved dictionary under saes/
        root = path / SAES_DIR
        rungs = sorted((p.parent.relative_to(root).as_posix() for p in root.rglob("cfg.json")), key=rung_key)
    saes = {}
    for rung in rungs:
        try:
            saes[rung] = load_dictionary(path / SAES_DIR / rung)
        except FeatureTreeError as e:
            raise FeatureTreeError(f"rung {rung!r} listed in {path / TREE_FILE} cannot be loaded: {e}") from e
    log.info("loaded %d nodes and %d dictionaries from %s", graph.number_of_nodes(), len(saes), path)
    return FeatureTree(graph, saes, config, path)


# ---- tables ------------------------------------------------------------------------------------------
_DERIVED = ("node", "parent", "coverage", "cos", "kind", "depth", "n_children")  # computed by to_frame, not stored


def to_frame(tree, *, edges: bool = False, virtual: bool = False) -> pd.DataFrame:
    """One row per node (index = node id) with its primary parent edge, depth and every node attribute; or
    the edge table.

    The first columns are node, rung, width, index, freq, label, parent, coverage, cos, kind, depth,
    n_children, top_tokens, top_contexts; every other node attribute follows (sorted), so nothing is lost
    (`from_frame` rebuilds the graph). `depth` counts parent edges up to the node's root (0 for a root).
    `virtual=True` also lists the virtual root. `tree` may be a FeatureTree or an nx.DiGraph. With
    `edges=True`: columns parent, child, coverage, reverse, cos, kind, then every other edge attribute.

    Example:
        >>> import networkx as nx
        >>> g = nx.DiGraph(); g.add_edge("w2/0", "w8/1", coverage=0.9, cos=0.5, kind="split")
        >>> df = to_frame(g)
        >>> df.parent.tolist(), df.depth.tolist(), df.coverage.tolist()[1]
        ([None, 'w2/0'], [0, 1], 0.9)
        >>> to_frame(g, edges=True).child.tolist()
        ['w8/1']
    """
    g = graph_of(tree)
    if edges:
        extra = sorted({k for *_, d in g.edges(data=True) for k in d} - set(_EDGE_COLUMNS))
        rows = [{"parent": p, "child": c, **{k: d.get(k) for k in _EDGE_COLUMNS[2:] + extra}}
                for p, c, d in g.edges(data=True)]
        return pd.DataFrame(rows, columns=_EDGE_COLUMNS + extra)
    parent = {n: tree_parent(g, n) for n in g}
    depth: dict[str, int] = {}
    for n in g:
        chain, m = [], n
        while m is not None and m not in depth and len(chain) <= len(g):  # the bound stops on a cycle
            chain.append(m)
            m = parent[m]
        base = depth.get(m, -1) if m is not None else -1
        for i, c in enumerate(reversed(chain)):
            depth[c] = base + 1 + i
    shown = [(n, d) for n, d in g.nodes(data=True) if virtual or not d.get("virtual")]
    extra = sorted({k for _, d in shown for k in d} - set(_FRAME_COLUMNS))
    rows = []
    for n, d in shown:
        p, e = parent[n], tree_edge(g, n)[1]  # under the virtual root: parent None, kind "top" / "novel"
        rows.append({"node": n, "rung": rung_of(g, n) if "rung" in d or not d.get("virtual") else None,
                     "width": d.get("width"), "index": d.get("index"),
                     "freq": d.get("freq"), "label": d.get("label", n), "parent": p, "coverage": e.get("coverage"),
                     "cos": e.get("cos"), "kind": e.get("kind"), "depth": depth[n], "n_children": g.out_degree(n),
                     "top_tokens": list(d.get("top_tokens") or []), "top_contexts": list(d.get("top_contexts") or []),
                     **{k: d[k] for k in extra if k in d}})
    df = pd.DataFrame(rows, columns=_FRAME_COLUMNS + extra, index=[r["node"] for r in rows])
    for col in ("parent", "kind"):  # keep None for roots (pandas 3 would turn a str column's None into NaN)
        df[col] = pd.Series([r[col] for r in rows], index=df.index, dtype=object)
    return df


def _present(v: Any) -> bool:
    """A table cell that holds a value (a missing attribute reads back as NaN / None)."""
    if v is None:
        return False
    try:
        return not (isinstance(v, float) and v != v) and not bool(pd.isna(v))
    except (TypeError, ValueError):  # lists and other containers
        return True


def from_frame(nodes: pd.DataFrame, edges: pd.DataFrame, graph: dict | None = None) -> nx.DiGraph:
    """Rebuild the graph from `to_frame(tree, virtual=True)` and `to_frame(tree, edges=True)` (and graph
    attributes `graph`): the inverse of those tables, attribute for attribute.

    Columns that `to_frame` derives (parent, coverage, cos, kind, depth, n_children) come from the edge
    table instead. Empty cells (NaN / None) are attributes the node or edge did not have. Every attribute of
    a tree featuretree built comes back as it was; a hand-made graph's nodes also get the columns to_frame
    fills in when missing (rung, label, top_tokens, top_contexts).

    Example:
        >>> import networkx as nx
        >>> g = nx.DiGraph(); g.add_edge("w2/0", "w8/1", coverage=0.9, kind="split")
        >>> g.nodes["w8/1"].update(rung="w8", label="dogs", freq=0.1, top_tokens=["dog"], top_contexts=[])
        >>> h = from_frame(to_frame(g, virtual=True), to_frame(g, edges=True))
        >>> h.nodes["w8/1"] == g.nodes["w8/1"], h.edges["w2/0", "w8/1"]
        (True, {'coverage': 0.9, 'kind': 'split'})
    """
    g = nx.DiGraph(**(graph or {}))
    keep = [c for c in nodes.columns if c not in _DERIVED]
    for rec in nodes.to_dict("records"):
        g.add_node(rec["node"], **{k: _cell(rec[k]) for k in keep if _present(rec[k])})
    for rec in edges.to_dict("records"):
        g.add_edge(rec["parent"], rec["child"],
                   **{k: _cell(v) for k, v in rec.items() if k not in ("parent", "child") and _present(v)})
    return g


def _cell(v: Any) -> Any:
    return v.item() if hasattr(v, "item") and not isinstance(v, (list, dict, str)) else v


# ---- GraphML -----------------------------------------------------------------------------------------
def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "num"
    return "str" if isinstance(v, str) else "json"


def _json_names(dicts: Iterable[dict]) -> list[str]:
    # GraphML holds one scalar type per attribute: store an attribute as JSON text wherever any of its
    # values is a list/dict/None or its types are mixed, so decoding is per attribute, never guessed
    kinds: dict[str, set[str]] = {}
    for d in dicts:
        for k, v in d.items():
            kinds.setdefault(k, set()).add(_kind(v))
    return sorted(k for k, s in kinds.items() if "json" in s or len(s) > 1)


def to_graphml(tree, path: str | os.PathLike) -> Path:
    """Write the graph as GraphML (for Gephi, Cytoscape, yEd); lists are stored as JSON strings.

    Parameters
    ----------
    tree : FeatureTree or networkx.DiGraph
        The tree (or its graph) to write.
    path : str or Path
        The GraphML file to write (replaced if it exists); the returned Path points to it.

    Example:
        >>> import tempfile, pathlib, networkx as nx
        >>> g = nx.DiGraph(); g.add_node("w2/0", top_tokens=["dog", "cat"])
        >>> p = to_graphml(g, pathlib.Path(tempfile.mkdtemp()) / "tree.graphml")
        >>> from_graphml(p).nodes["w2/0"]["top_tokens"]
        ['dog', 'cat']
    """
    g = graph_of(tree)
    nodes = {n: _plain(d) for n, d in g.nodes(data=True)}
    edges = {(p, c): _plain(d) for p, c, d in g.edges(data=True)}
    graph = _plain(g.graph)
    enc = {"graph": _json_names([graph]), "node": _json_names(nodes.values()), "edge": _json_names(edges.values())}

    def scalars(d: dict, names: list[str]) -> dict:
        return {k: json.dumps(v, ensure_ascii=False) if k in names else v for k, v in d.items()}

    h = nx.DiGraph(**scalars(graph, enc["graph"]))
    h.graph[_GRAPHML_JSON] = json.dumps(enc)
    h.add_nodes_from((str(n), scalars(d, enc["node"])) for n, d in nodes.items())
    h.add_edges_from((str(p), str(c), scalars(d, enc["edge"])) for (p, c), d in edges.items())
    with atomic_path(path) as tmp:
        nx.write_graphml(h, tmp, encoding="utf-8", infer_numeric_types=True)
    log.info("wrote GraphML with %d nodes to %s", h.number_of_nodes(), path)
    return Path(path)


def from_graphml(path: str | os.PathLike) -> nx.DiGraph:
    """Read GraphML written by `to_graphml`, decoding the JSON-encoded attributes back to lists.

    Parameters
    ----------
    path : str or Path
        A GraphML file, as `to_graphml` writes it.

    Example:
        >>> import tempfile, pathlib, networkx as nx
        >>> p = to_graphml(nx.DiGraph([("w2/0", "w8/1")]), pathlib.Path(tempfile.mkdtemp()) / "t.graphml")
        >>> list(from_graphml(p).edges)
        [('w2/0', 'w8/1')]
    """
    path = Path(path)
    if not path.is_file():
        raise FeatureTreeError(f"no GraphML file at {path}: write one with ft.to_graphml(tree, path)")
    try:
        g = nx.DiGraph(nx.read_graphml(path))
    except Exception as e:  # the XML parser raises several unrelated types
        raise FeatureTreeError(f"{path} is not readable GraphML ({e}): re-export it with ft.to_graphml") from e
    enc = json.loads(g.graph.pop(_GRAPHML_JSON, "{}"))
    for k in ("node_default", "edge_default"):  # the reader's own bookkeeping, not the tree's
        if g.graph.get(k) == {}:
            del g.graph[k]

    def decode(d: dict, names: list[str]) -> None:
        for k in names:
            if isinstance(d.get(k), str):
                d[k] = json.loads(d[k])

    decode(g.graph, enc.get("graph", []))
    for _, d in g.nodes(data=True):
        decode(d, enc.get("node", []))
    for _, _, d in g.edges(data=True):
        decode(d, enc.get("edge", []))
    return g
