"""crosslayer: link the features of one layer to those of a later layer by co-activation on the same tokens.

Two runs of one model on one corpus at layers L < L' (e.g. `featuretree build --layer 3` and `--layer 9`)
harvest the same documents in the same order, so their stores hold the same token positions. On the
positions both hold out, with each tree's own firing rule, for an earlier feature a and a later feature b:

    p_later   = P(b fires | a fires)      p_earlier = P(a fires | b fires)

An edge a -> b is kept when p_earlier >= min_coverage (b's tokens lie mostly inside a's: b is a's
continuation, as a ladder child is covered by its parent) or p_later >= min_coverage (a's tokens lie
mostly inside b's). Its kind:

    same    both >= same_threshold: one feature carried from L to L'
    split   a has two or more later features covering it (p_earlier >= min_coverage): its tokens divide
    merge   b covers two or more earlier features (p_later >= min_coverage): several become one
    into    the rest (a continues as part of b, or b as part of a)

The graph's nodes are "L3:w512/7" (layer, rung, index, label, freq); each later node's best earlier
feature (highest p_earlier) is its primary parent (`primary=True`), so the primary edges form a forest that
the sunburst and exports read like a ladder (`as_tree`).
"""

from __future__ import annotations

import logging

import networkx as nx
import numpy as np
import pandas as pd

from featuretree.config import FeatureTreeError

__all__ = ["aligned_rows", "as_tree", "link_layers", "upstream"]

log = logging.getLogger(__name__)


def _store(tree):
    from featuretree.activations import Activations
    from featuretree.utils import store_path

    p = store_path(tree)
    if p is None or not (p / "meta.json").is_file():
        raise FeatureTreeError("cross-layer linking reads both runs' activation stores: pass trees loaded from run "
                               "directories written by `featuretree build`")
    return Activations(p)


def aligned_rows(acts_a, acts_b, split: str = "heldout") -> tuple[np.ndarray, np.ndarray]:
    """Row numbers of the token positions two stores share (same document, position and token), in order.

    Parameters
    ----------
    acts_a, acts_b : Activations
        Stores harvested from the same model and corpus (at different layers).
    split : str
        "heldout", "train" or "all".

    Example:
        >>> ra, rb = aligned_rows(Activations("runs/L3/acts"), Activations("runs/L9/acts"))  # doctest: +SKIP
    """
    ta = acts_a.tokens(split).reset_index(drop=True)
    tb = acts_b.tokens(split).reset_index(drop=True)
    m = ta.reset_index().merge(tb.reset_index(), on=["doc_id", "position"], suffixes=("_a", "_b"))
    if len(m) == 0:
        raise FeatureTreeError("the two stores share no token positions: build both runs on the same corpus with the "
                               "same seed (only --layer differs)")
    bad = m.token_id_a != m.token_id_b
    if bool(bad.any()):
        raise FeatureTreeError(f"{int(bad.sum())} shared positions hold different tokens: the runs used different "
                               "tokenizers or models; link layers of one model")
    return m["index_a"].to_numpy(dtype=np.int64, copy=True), m["index_b"].to_numpy(dtype=np.int64, copy=True)


def _widest(tree) -> str:
    from featuretree.utils import rung_key

    return sorted((r for r in tree.saes if "/" not in r), key=rung_key)[-1]


def link_layers(trees: list, *, rungs: list[str] | None = None, min_coverage: float = 0.5,
                same_threshold: float = 0.9, min_tokens: int = 5, split: str = "heldout") -> nx.DiGraph:
    """A graph over the features of several layers' trees, consecutive layers linked by co-activation.

    Parameters
    ----------
    trees : list of FeatureTree
        Runs of one model on one corpus at increasing layers (loaded with `ft.load`, each with its store).
    rungs : list of str, optional
        One rung per tree (default: each tree's widest ladder rung).
    min_coverage : float
        P(a | b) or P(b | a) an edge needs (the ladder's LinkConfig.min_coverage).
    same_threshold : float
        Both directions at least this: kind "same".
    min_tokens : int
        Features firing on fewer shared tokens take no part.
    split : str
        Which tokens to count ("heldout": nothing the dictionaries trained on).

    Returns an nx.DiGraph: nodes "L{layer}:{rung}/{index}" with layer, rung, index, label, freq (on the shared
    tokens); edges earlier -> later with p_later, p_earlier, n_both, kind, primary (module docstring).

    Example:
        >>> g = link_layers([ft.load("runs/smolL3"), ft.load("runs/smolL9")])  # doctest: +SKIP
        >>> pd.Series(nx.get_edge_attributes(g, "kind")).value_counts()  # doctest: +SKIP
    """
    from featuretree.firing import fire_rungs

    if len(trees) < 2:
        raise FeatureTreeError("link_layers needs two or more trees, one per layer")
    layers = [t.config.layer if t.config is not None else None for t in trees]
    if any(v is None for v in layers) or list(layers) != sorted(set(layers)):
        raise FeatureTreeError(f"the trees' layers {layers} must be known and strictly increasing: pass runs in "
                               "layer order, one per layer")
    models = {str(t.config.model) for t in trees}
    if len(models) > 1:
        raise FeatureTreeError(f"the trees come from different models {sorted(models)}: link layers of one model")
    rungs = list(rungs) if rungs is not None else [_widest(t) for t in trees]
    g = nx.DiGraph(layers=layers, rungs=rungs, min_coverage=min_coverage, same_threshold=same_threshold)
    stores = [_store(t) for t in trees]
    for k in range(len(trees) - 1):
        ta, tb, ra, rb = trees[k], trees[k + 1], rungs[k], rungs[k + 1]
        ia, ib = aligned_rows(stores[k], stores[k + 1], split)
        import torch

        Fa = fire_rungs(ta, stores[k].load(split)[torch.from_numpy(ia)], [ra])[ra].tocsc()
        Fb = fire_rungs(tb, stores[k + 1].load(split)[torch.from_numpy(ib)], [rb])[rb].tocsc()
        n = len(ia)
        na, nb = np.asarray(Fa.sum(0)).ravel(), np.asarray(Fb.sum(0)).ravel()
        C = (Fa.T @ Fb).tocoo()  # (width_a, width_b) tokens both fire on
        ok = (na[C.row] >= min_tokens) & (nb[C.col] >= min_tokens)
        a, b, both = C.row[ok], C.col[ok], C.data[ok]
        p_later, p_earlier = both / na[a], both / nb[b]
        keep = (p_earlier >= min_coverage) | (p_later >= min_coverage)
        e = pd.DataFrame({"a": a[keep], "b": b[keep], "n_both": both[keep].astype(int),
                          "p_later": p_later[keep], "p_earlier": p_earlier[keep]})
        covered_by = e[e.p_earlier >= min_coverage].groupby("a").size()  # later features inside each a
        covers = e[e.p_later >= min_coverage].groupby("b").size()  # earlier features inside each b
        for tree, rung, layer, counts in ((ta, ra, layers[k], na), (tb, rb, layers[k + 1], nb)):
            for j in np.flatnonzero(counts >= min_tokens):
                node = f"L{layer}:{rung}/{j}"
                if node not in g:
                    d = tree.graph.nodes.get(f"{rung}/{j}", {})
                    g.add_node(node, layer=int(layer), rung=rung, index=int(j), label=d.get("label", ""),
                               freq=float(counts[j] / n))
        best = e.sort_values("p_earlier", ascending=False).drop_duplicates("b").set_index("b")["a"]
        for r in e.itertuples():
            if r.p_earlier >= same_threshold and r.p_later >= same_threshold:
                kind = "same"
            elif r.p_earlier >= min_coverage and covered_by.get(r.a, 0) >= 2:
                kind = "split"
            elif r.p_later >= min_coverage and covers.get(r.b, 0) >= 2:
                kind = "merge"
            else:
                kind = "into"
            g.add_edge(f"L{layers[k]}:{ra}/{r.a}", f"L{layers[k + 1]}:{rb}/{r.b}", p_later=float(r.p_later),
                       p_earlier=float(r.p_earlier), n_both=int(r.n_both), kind=kind,
                       primary=bool(best.get(r.b) == r.a))
        log.info("layer %d %s -> layer %d %s: %d edges on %d shared tokens", layers[k], ra, layers[k + 1], rb, len(e), n)
    return g


def as_tree(graph: nx.DiGraph):
    """The primary edges of a `link_layers` graph as a FeatureTree (a forest under a virtual root), for the
    sunburst / icicle / exports: one feature's descendants across layers.

    Parameters
    ----------
    graph : nx.DiGraph
        What `link_layers` returns.

    Example:
        >>> ft.sunburst(as_tree(g), root="L3:w2048/17").write_html("across.html")  # doctest: +SKIP
    """
    from featuretree.tree import FeatureTree, add_virtual_root

    t = nx.DiGraph(**graph.graph)
    for n, d in graph.nodes(data=True):
        t.add_node(n, **{**d, "rung": f"L{d['layer']}:{d['rung']}", "width": 0, "top_tokens": [],
                         "top_contexts": []})
    order = sorted({d["rung"] for _, d in t.nodes(data=True)}, key=lambda r: int(r[1:].split(":")[0]))
    t.graph["rungs"] = order
    for u, v, d in graph.edges(data=True):
        if d.get("primary"):
            t.add_edge(u, v, **d, coverage=d["p_earlier"], reverse=d["p_later"], cos=float("nan"), within=False)
    if order:
        add_virtual_root(t, order[0])
    return FeatureTree(t)


class _Stop(Exception):
    """Raised by the hook on the node's block: nothing after it is needed for the attribution."""


def _by_layer(trees) -> dict[int, object]:
    if isinstance(trees, dict):
        return {int(k): v for k, v in sorted(trees.items())}
    out = {}
    for t in trees:
        if t.config is None:
            raise FeatureTreeError("a tree without a config: upstream needs each tree's model and layer; load runs "
                                   "written by `featuretree build`")
        if int(t.config.layer) in out:
            raise FeatureTreeError(f"two trees at layer {t.config.layer}: pass one tree per layer")
        out[int(t.config.layer)] = t
    return dict(sorted(out.items()))


def upstream(trees, node: str, *, layer: int | None = None, texts: list[str] | None = None,
             rungs: dict[int, str] | None = None, max_docs: int = 16, top: int = 20, max_length: int = 128,
             batch_size: int = 8, progress: bool = True) -> pd.DataFrame:
    """Earlier-layer features ranked by how much they drive a later node: attribution = activation x gradient
    of the node's pre-activation, summed over the positions where it fires (a circuit's first step back).

    At each earlier layer the block output is replaced, at the real tokens, by its dictionary's decoding of
    codes z plus the dictionary's error (detached), so the model computes exactly what it did; the gradient
    of the node's pre-activation (x - b_dec) . W_enc[:, j] + b_enc[j] at the later layer, summed over the
    positions where the node fires, is taken with respect to z (every position: attention carries earlier
    positions' features forward). attribution_j = sum over positions of z_j * dpre/dz_j, reported per firing
    position; share = its part of the positive total.

    Parameters
    ----------
    trees : list or dict of FeatureTree
        Runs of one model at several layers (a dict {layer: tree}, or trees whose configs give the layer).
    node : str
        "L15:w512/7" (the crosslayer id), or "w512/7" with `layer=` (default: the last tree's layer).
    layer : int, optional
        The node's layer when `node` does not say it.
    texts : list of str, optional
        Texts to attribute on (default: the node's run's held-out texts where it fires).
    rungs : dict, optional
        {layer: rung} of the earlier trees (default: each tree's widest ladder rung).
    max_docs, top, max_length, batch_size : int
        Default texts at most; rows returned per earlier layer; truncation; documents per forward.
    progress : bool

    Returns a DataFrame, best first per earlier layer: layer, node, label, attribution, share, n_active
    (positions where it was active).

    Example:
        >>> up = upstream([ft.load("runs/smolL9"), ft.load("runs/smolL15")], "L15:w2048/17")  # doctest: +SKIP
        >>> up.head()  # doctest: +SKIP
    """
    import torch
    from tqdm.auto import tqdm

    from featuretree.effect import firing_texts
    from featuretree.faithful import Splice, causal_lm, splice_batch
    from featuretree.firing import fire_rungs, tree_model
    from featuretree.harvest import forward_args, special_ids
    from featuretree.model import check_layer, find_layers, get_tokenizer

    by_layer = _by_layer(trees)
    if ":" in node and node.startswith("L"):
        head, node = node.split(":", 1)
        layer = int(head[1:])
    layer = int(layer) if layer is not None else max(by_layer)
    if layer not in by_layer:
        raise FeatureTreeError(f"no tree at layer {layer}: the trees are at layers {list(by_layer)}")
    later = by_layer[layer]
    d = later.graph.nodes.get(node)
    if d is None or d.get("virtual") or "rung" not in d:
        raise FeatureTreeError(f"{node!r} is not a feature of the layer-{layer} tree: ids look like 'w512/7'")
    rung, j = str(d["rung"]), int(d["index"])
    if "/" in rung:
        raise FeatureTreeError(f"{node} is a refined feature (it fires only under its gate): pass a ladder feature")
    earlier = {L: t for L, t in by_layer.items() if L < layer}
    if not earlier:
        raise FeatureTreeError(f"no tree below layer {layer} (layers {list(by_layer)}): pass an earlier layer's run")
    models = {str(t.config.model) for t in by_layer.values() if t.config is not None}
    if len(models) > 1:
        raise FeatureTreeError(f"the trees come from different models {sorted(models)}: pass runs of one model")
    rungs = {L: (rungs or {}).get(L) or _widest(t) for L, t in earlier.items()}
    lm = causal_lm(tree_model(later))
    module = getattr(lm, "_module", lm)
    blocks = find_layers(lm)[1]
    tok = get_tokenizer(lm)
    special = torch.tensor(special_ids(tok), dtype=torch.long)
    accepted = forward_args(module)
    device = next(module.parameters()).device
    if texts is None:
        texts = firing_texts(later, node, max_docs)
    sae_b = later.saes[rung]
    w_j, b_j = sae_b.W_enc[:, j].detach().float(), float(sae_b.b_enc.detach()[j])
    totals = {L: torch.zeros(earlier[L].saes[rungs[L]].width, dtype=torch.float64) for L in earlier}
    active = {L: torch.zeros_like(totals[L], dtype=torch.long) for L in earlier}
    n_fire = 0
    grad_was = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        for b in tqdm(range(0, len(texts), int(batch_size)), desc=f"upstream {node}", unit="batch",
                      disable=not progress):
            enc, mask, _ = splice_batch(tok, texts[b:b + int(batch_size)], max_length, special)
            inputs = {k: v.to(device) for k, v in enc.items() if k in accepted}
            for L, tree_a in earlier.items():
                sae_a = tree_a.saes[rungs[L]]
                held: dict = {}

                def recode(rows, sae_a=sae_a, held=held):
                    x = rows.float()
                    v, i = sae_a.encode(x)
                    z = torch.zeros(x.shape[0], sae_a.width, device=x.device).scatter(1, i, v.detach())
                    z.requires_grad_(True)
                    recon = z @ sae_a.W_dec.detach().float() + sae_a.b_dec.detach().float()
                    held["z"] = z
                    return recon + (x - recon).detach()

                def read(mod, args, output, held=held, mask=mask):
                    h = (output[0] if isinstance(output, (tuple, list)) else output)[mask.to(device)].float()
                    fires = fire_rungs(later, h.detach().cpu(), [rung])[rung][:, j].toarray().ravel() > 0
                    held["n"] = int(fires.sum())
                    pre = (h - sae_b.b_dec.detach().float()) @ w_j.to(h.device) + b_j
                    held["target"] = pre[torch.from_numpy(fires).to(h.device)].sum()
                    raise _Stop

                splice = Splice()
                splice.mask, splice.mode = mask, recode
                handles = [blocks[check_layer(lm, L)].register_forward_hook(splice),
                           blocks[check_layer(lm, layer)].register_forward_hook(read)]
                try:
                    with torch.enable_grad():
                        try:
                            module(**inputs)
                        except _Stop:
                            pass
                        if held.get("n"):
                            held["target"].backward()
                finally:
                    for h in handles:
                        h.remove()
                if not held.get("n"):
                    continue
                z = held["z"]
                totals[L] += (z.detach() * z.grad).sum(0).double().cpu()
                active[L] += (z.detach() > 0).sum(0).cpu()
                if L == min(earlier):
                    n_fire += held["n"]
    finally:
        for p, g_ in zip(module.parameters(), grad_was):
            p.requires_grad_(g_)
    if n_fire == 0:
        raise FeatureTreeError(f"{node} fires on none of the {len(texts)} texts at layer {layer}: pass texts where "
                               "it fires (default: its run's held-out texts where it does)")
    rows = []
    for L, tree_a in earlier.items():
        att = totals[L] / n_fire
        pos = float(att.clamp(min=0).sum()) or 1.0
        order = torch.argsort(att.abs(), descending=True)[:int(top)]
        for k in order.tolist():
            nid = f"{rungs[L]}/{k}"
            rows.append({"layer": L, "node": f"L{L}:{nid}",
                         "label": tree_a.graph.nodes.get(nid, {}).get("label", ""), "attribution": float(att[k]),
                         "share": float(att[k]) / pos, "n_active": int(active[L][k])})
    log.info("upstream of L%d:%s over %d firing positions", layer, node, n_fire)
    return pd.DataFrame(rows, columns=["layer", "node", "label", "attribution", "share", "n_active"])
