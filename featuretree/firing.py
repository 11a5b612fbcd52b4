"""Where features fire: the one firing rule, gated firing of refined rungs, and query firing rates.

A feature j "fires" on token i when its TopK activation is at least `fire_rel` x its 90th-percentile
positive activation (TopK fills k slots on every token; the weakest are filler that blurs co-activation).
A refined rung's feature fires only where the node it was trained under fires (its gate):
    fires(node/r64/i, token) = fires(node, token) and local feature i fires on it
query_firing(tree, texts) runs texts through the tree's model and says where each node fires on them, token by
token and text by text (query_rates: the token rates).
"""

from __future__ import annotations

import logging
import re
import tempfile

import numpy as np
import scipy.sparse as sp
import torch

from featuretree.activations import iter_batches
from featuretree.config import FeatureTreeError
from featuretree.sae import TopKSAE
from featuretree.utils import quiet, rung_key

__all__ = ["drop_weak", "encode_all", "fire", "fire_codes", "fire_rungs", "firing_matrix", "forward_texts", "gate_of", "tree_site",
           "in_spans", "node_mask", "query_firing", "query_rates", "QueryFiring", "thresholds", "tree_layer", "tree_model"]

log = logging.getLogger(__name__)


@torch.no_grad()
def encode_all(sae: TopKSAE, batches) -> tuple[np.ndarray, np.ndarray]:
    """Sparse codes of every row: (values (n, k) float32, indices (n, k) int64) as numpy arrays.

    Parameters
    ----------
    sae : TopKSAE
        The dictionary that encodes.
    batches : iterable of Tensor (b, d_model)
        The rows, batch by batch (e.g. `iter_batches(x, 4096, shuffle=False)`).

    Example:
        >>> v, i = encode_all(TopKSAE(8, 32, 2), [torch.randn(5, 8)])
        >>> v.shape, i.shape
        ((5, 2), (5, 2))
    """
    vals, idxs = [], []
    for x in batches:
        v, i = sae.encode(x.float())
        vals.append(v.numpy())
        idxs.append(i.numpy())
    if not vals:
        return np.zeros((0, sae.k), np.float32), np.zeros((0, sae.k), np.int64)
    return np.concatenate(vals), np.concatenate(idxs)


def thresholds(values: np.ndarray, indices: np.ndarray, width: int, rel: float = 0.25) -> np.ndarray:
    """Per-feature firing threshold: `rel` x the feature's 90th-percentile positive activation (0 if it never fires).

    The quantile interpolates linearly between order statistics like pandas' groupby quantile (the values
    are the same to the bit); one sort of (feature, value-bits) uint64 keys: ~0.6 GB and ~3 s at 1M x 32.

    Parameters
    ----------
    values, indices : ndarray (n, k)
        Sparse codes (encode_all); only positive values count.
    width : int
        Number of features.
    rel : float
        The fraction of the 90th percentile a feature must reach to fire.

    Example:
        >>> thresholds(np.array([[2.0, 0.1], [2.0, 0.1]]), np.array([[0, 1], [0, 1]]), 3).tolist()
        [0.5, 0.025, 0.0]
    """
    flat_v = np.asarray(values).reshape(-1)
    on = flat_v > 0
    q90 = np.zeros(width, dtype=np.float64)
    if not on.any():
        return rel * q90
    if flat_v.dtype == np.float32:  # one uint64 sort: the feature in the high 32 bits, then the bits of
        key = np.asarray(indices).reshape(-1)[on].astype(np.uint64)  # the (positive) value, which sort like it
        key <<= np.uint64(32)
        key |= flat_v[on].view(np.uint32)
        del on
        key.sort()
        m = np.bincount((key >> np.uint64(32)).astype(np.int64), minlength=width)  # values per feature
        v = (key & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.float32)  # sorted within each feature
        del key
    else:
        f, v = np.asarray(indices).reshape(-1)[on], flat_v[on]
        order = np.lexsort((v, f))
        m, v = np.bincount(f, minlength=width), v[order]
    start = np.cumsum(m) - m
    f = np.flatnonzero(m)
    q = 0.9 * (m[f] - 1).astype(np.float64)  # pandas: idx = int(q (m - 1)), out = lo + (hi - lo) frac
    lo_at = start[f] + q.astype(np.int64)
    frac = np.fmod(q, 1.0)
    lo = v[lo_at].astype(np.float64)
    hi = v[np.minimum(lo_at + 1, len(v) - 1)].astype(np.float64)
    q90[f] = np.where(frac == 0.0, lo, lo + (hi - lo) * frac)
    return rel * q90


def drop_weak(values: np.ndarray, indices: np.ndarray, width: int, rel: float = 0.25,
              at: np.ndarray | None = None) -> np.ndarray:
    """Zero each activation below `rel` x its feature's 90th-percentile activation (TopK's forced filler).

    TopK makes exactly k features active on every token, so tokens with fewer real features get small
    filler activations; counting those as firing blurs co-activation (measured on planted data: firing-set
    Jaccard of root latents rose from 0.57 to 0.9 with rel 0.25-0.3). `at` gives the thresholds (one per
    feature, e.g. the `fire_at` that `link` stored) instead of measuring them on `values`.

    Parameters
    ----------
    values, indices : ndarray (n, k)
        Sparse codes (encode_all).
    width : int
        Number of features.
    rel : float
        The fraction of its 90th percentile a feature's activation must reach (<= 0 without `at`: keep all).
    at : ndarray (width,), optional
        Fixed thresholds per feature; measured on `values` when None.

    Example:
        >>> drop_weak(np.array([[2.0, 0.1], [2.0, 0.1]]), np.array([[0, 1], [0, 2]]), 3).tolist()
        [[2.0, 0.1], [2.0, 0.1]]
    """
    if at is None:
        if rel <= 0:
            return values
        at = thresholds(values, indices, width, rel)
    return np.where((values >= at[indices]) & (values > 0), values, 0.0).astype(values.dtype)


def firing_matrix(values: np.ndarray, indices: np.ndarray, width: int) -> sp.csr_matrix:
    """Boolean (n, width) CSR matrix: token i fires feature j (value > 0).

    Parameters
    ----------
    values, indices : ndarray (n, k)
        Sparse codes; a feature fires where its value is positive.
    width : int
        Number of features (columns).

    Example:
        >>> firing_matrix(np.array([[1.0, 0.0]]), np.array([[3, 1]]), 4).toarray().astype(int).tolist()
        [[0, 0, 0, 1]]
    """
    n, k = indices.shape
    on = values.reshape(-1) > 0
    rows = np.repeat(np.arange(n), k)[on]
    m = sp.csr_matrix((np.ones(int(on.sum()), dtype=np.float32), (rows, indices.reshape(-1)[on])), shape=(n, width))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def fire(sae: TopKSAE, x: torch.Tensor, fire_rel: float = 0.25, at: np.ndarray | None = None, *,
         with_thresholds: bool = False) -> tuple:
    """Encode `x` and apply the firing rule: (values with weak ones zeroed, indices, firing matrix (n, width)).

    The one definition of "feature j fires on token i" used by linking, labels, refinement and evaluation.
    `at` (width,) holds fixed thresholds (a tree's stored `fire_at`); without it they are measured on `x`
    (`with_thresholds=True` appends them to the result).

    Parameters
    ----------
    sae : TopKSAE
        The dictionary that encodes.
    x : Tensor [n, d_model] or Activations
        The rows to encode (a store is read in order, its "train" split).
    fire_rel : float
        The fraction of its 90th-percentile activation a feature must reach to fire (LinkConfig.fire_rel).
    at : ndarray (width,), optional
        Fixed thresholds per feature; measured on `x` when None.
    with_thresholds : bool
        Also return the thresholds, as a fourth element.

    Example:
        >>> v, i, F = fire(TopKSAE(8, 32, 2), torch.randn(5, 8))
        >>> F.shape
        (5, 32)
    """
    rows = max(64, min(8192, (1 << 26) // sae.width))  # <= 256 MB of (rows, width) fp32 pre-activations
    v, i, F, at = fire_codes(*encode_all(sae, iter_batches(x, rows, shuffle=False)), sae.width, fire_rel, at)
    return (v, i, F, at) if with_thresholds else (v, i, F)


def fire_codes(values: np.ndarray, indices: np.ndarray, width: int, fire_rel: float = 0.25,
               at: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, sp.csr_matrix, np.ndarray]:
    """The firing rule on codes already computed: (values with weak ones zeroed, indices, firing matrix, thresholds).

    `fire` is `encode_all` followed by this; linking synthetic or precomputed codes (`link_codes`) uses it alone.

    Parameters
    ----------
    values, indices : ndarray (n, k)
        Sparse codes, as encode_all returns them.
    width : int
        Number of features.
    fire_rel : float
        LinkConfig.fire_rel.
    at : ndarray (width,), optional
        Fixed thresholds; measured on `values` when None.

    Example:
        >>> v, i, F, at = fire_codes(np.array([[2.0, 0.1], [2.0, 0.1]]), np.array([[0, 1], [0, 2]]), 3)
        >>> F.toarray().astype(int).tolist(), at.tolist()
        ([[1, 1, 0], [1, 0, 1]], [0.5, 0.025, 0.025])
    """
    if at is None:
        at = thresholds(values, indices, width, fire_rel)
    values = drop_weak(values, indices, width, fire_rel, at)
    return values, indices, firing_matrix(values, indices, width), at


def gate_of(tree, rung: str) -> str | None:
    """The node a refined rung was trained under ("w512/7" for "w512/7/r64"); None for a ladder rung.

    Example:
        >>> import networkx as nx
        >>> from featuretree.tree import FeatureTree
        >>> t = FeatureTree(nx.DiGraph(refined={"w512/7/r64": {"parent": "w512/7"}}))
        >>> gate_of(t, "w512/7/r64"), gate_of(t, "w512")
        ('w512/7', None)
    """
    info = (tree.graph.graph.get("refined") or {}).get(rung)
    return info["parent"] if info else None


def _thresholds(tree) -> dict[str, np.ndarray]:
    """{rung: fire_at per feature} from the nodes' `fire_at` (inf for features that never fired when linked)."""
    out: dict[str, np.ndarray] = {}
    for _, d in tree.graph.nodes(data=True):
        r, at = d.get("rung"), d.get("fire_at")
        if r in tree.saes and at is not None:
            if r not in out:
                out[r] = np.full(tree.saes[r].width, np.inf)
            out[r][int(d["index"])] = float(at)
    return out


def fire_rungs(tree, x: torch.Tensor, rungs=None) -> dict[str, sp.csr_matrix]:
    """Firing matrix (n, width) of each rung on activations `x`, with the tree's own firing rule.

    Thresholds are the `fire_at` stored on the nodes (trees linked before they were stored measure them
    on `x`). A refined rung fires only where the node it was trained under fires (its gate), so the
    rungs it hangs from are computed too. `rungs=None` means every dictionary of the tree.

    Example:
        >>> F = fire_rungs(tree, acts.load("heldout"), ["w512"])["w512"]  # doctest: +SKIP
        >>> F.shape  # doctest: +SKIP
        (60000, 512)
    """
    g = tree.graph
    rel = g.graph.get("fire_rel", 0.25)
    want = list(tree.saes) if rungs is None else list(rungs)
    unknown = [r for r in want if r not in tree.saes]
    if unknown:
        raise FeatureTreeError(f"the tree has no dictionary for rung(s) {unknown}: its rungs are {tree.rungs}")
    needed, todo = set(want), list(want)
    while todo:  # add the rungs each refined rung is gated by
        gate = gate_of(tree, todo.pop())
        if gate is not None and (pr := str(g.nodes[gate]["rung"])) not in needed:
            needed.add(pr)
            todo.append(pr)
    at_of = _thresholds(tree)
    n = x.shape[0]
    out: dict[str, sp.csr_matrix] = {}
    for r in sorted(needed, key=rung_key):  # a gate's rung always sorts before the rungs it gates
        sae, gate = tree.saes[r], gate_of(tree, r)
        if gate is None:
            out[r] = fire(sae, x, rel, at_of.get(r))[2]
            continue
        rows = out[str(g.nodes[gate]["rung"])][:, int(g.nodes[gate]["index"])].nonzero()[0]
        local = fire(sae, x[torch.from_numpy(rows)], rel, at_of.get(r))[2]  # (len(rows), width)
        lift = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, np.arange(len(rows)))), shape=(n, len(rows)))
        out[r] = (lift @ local).tocsr()  # (n, width): zero outside the gate
    return {r: out[r] for r in want}


def node_mask(tree, node: str, x: torch.Tensor) -> np.ndarray:
    """Bool (n,): where `node` fires on the rows of `x` (gated through every refinement above it).

    Example:
        >>> node_mask(tree, "w512/7", acts.load("heldout")).mean()  # doctest: +SKIP
        0.004
    """
    d = tree.node(node)
    if d.get("virtual"):
        return np.ones(x.shape[0], dtype=bool)
    F = fire_rungs(tree, x, [str(d["rung"])])[str(d["rung"])]
    return np.asarray(F[:, int(d["index"])].todense()).ravel() > 0


def tree_model(tree, model=None):
    """`model` (anything load_model takes), else the tree's own model, loaded and nnsight-wrapped.

    Parameters
    ----------
    tree : FeatureTree
        Its `config.model` is used when `model` is None.
    model : str, path, (module, tokenizer) or nnsight model, optional

    Example:
        >>> m = tree_model(tree)  # doctest: +SKIP
    """
    from featuretree.model import load_model

    if model is None and tree.config is None:
        raise FeatureTreeError("this tree has no config to say which model made it: pass model=... and layer=...")
    return load_model(model if model is not None else tree.config.model)


def tree_layer(tree, layer: int | None = None) -> int:
    """`layer`, else the layer the tree was built on (`tree.config.layer`).

    Example:
        >>> from featuretree.config import Config
        >>> from types import SimpleNamespace
        >>> tree_layer(SimpleNamespace(config=Config(layer=2))), tree_layer(None, 4)
        (2, 4)
    """
    if layer is not None:
        return int(layer)
    if tree.config is None:
        raise FeatureTreeError("this tree has no config to say which layer it was built on: pass layer=...")
    return int(tree.config.layer)


def tree_site(tree) -> str:
    """The submodule of the tree's layer its activations came from ("" for the block's output, or a tree
    without a config).

    Example:
        >>> from featuretree.config import Config
        >>> from types import SimpleNamespace
        >>> tree_site(SimpleNamespace(config=Config(site="mlp"))), tree_site(SimpleNamespace(config=None))
        ('mlp', '')
    """
    return str(getattr(tree.config, "site", "") or "") if tree.config is not None else ""


def _is_content(token: str) -> bool:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    t = token.replace("##", "").replace("Ġ", "").replace("▁", "").strip().lower()
    return any(c.isalnum() for c in t) and t not in ENGLISH_STOP_WORDS


class QueryFiring:
    """Where every node fires on some texts: per rung a (tokens, width) firing matrix over the tokens that
    count, and which text each of those tokens came from. Made by `query_firing`.

    Parameters
    ----------
    firing : dict of str to scipy.sparse.csr_matrix
        {rung: (tokens, width) firing matrix} over the counted tokens.
    doc : ndarray (tokens,)
        The text number (0..n_docs-1) of each counted token.
    n_docs : int
        Number of texts.

    Example:
        >>> q = query_firing(tree, ["the anthrax bacterium", "a spore"])  # doctest: +SKIP
        >>> q.token_rates()["w512/11"], q.document_rates()["w512/11"]  # doctest: +SKIP
        (0.5, 0.5)
    """

    def __init__(self, firing: dict[str, sp.csr_matrix], doc: np.ndarray, n_docs: int) -> None:
        self.firing, self.doc, self.n_docs = firing, np.asarray(doc, dtype=np.int64), int(n_docs)

    @property
    def n_tokens(self) -> int:
        """How many tokens count."""
        return int(self.doc.shape[0])

    def subset(self, docs) -> QueryFiring:
        """The same firing restricted to the texts numbered `docs` (renumbered 0..len(docs)-1, in that order).

        Parameters
        ----------
        docs : sequence of int
            Text numbers (positions in the texts given to `query_firing`).
        """
        docs = np.asarray(list(docs), dtype=np.int64)
        new = np.full(max(self.n_docs, 1), -1, dtype=np.int64)
        new[docs] = np.arange(len(docs))
        rows = np.flatnonzero(new[self.doc] >= 0)
        return QueryFiring({r: F[rows] for r, F in self.firing.items()}, new[self.doc[rows]], len(docs))

    def token_rates(self) -> dict[str, float]:
        """{node: share of the counted tokens on which it fires} (nodes that never fire are left out)."""
        return _shares(self.firing, self.n_tokens)

    def document_matrix(self, rung: str) -> sp.csr_matrix:
        """Bool-valued (texts, width) matrix: text d has a counted token on which feature j of `rung` fires."""
        F = self.firing[rung]
        D = sp.csr_matrix((np.ones(self.n_tokens, np.float32), (self.doc, np.arange(self.n_tokens))),
                          shape=(self.n_docs, self.n_tokens))
        M = (D @ F).tocsr()
        M.data = (M.data > 0).astype(np.float32)
        return M

    def document_rates(self) -> dict[str, float]:
        """{node: share of the texts in which it fires on at least one counted token}."""
        return _shares({r: self.document_matrix(r) for r in self.firing}, self.n_docs)


def _shares(matrices: dict[str, sp.csr_matrix], n: int) -> dict[str, float]:
    """{"rung/j": (rows where column j is set) / n} over every rung's 0/1 matrix, nonzero counts only."""
    out: dict[str, float] = {}
    for rung, M in matrices.items():
        counts = np.asarray(M.sum(0)).ravel()
        for j in np.flatnonzero(counts):
            out[f"{rung}/{j}"] = float(counts[j]) / max(n, 1)
    return out


def query_firing(tree, texts: list[str], *, model=None, layer: int | None = None,
                 span: re.Pattern | None = None) -> QueryFiring:
    """Run `texts` through the tree's model and every dictionary: where each node fires, token by token.

    Stop words and punctuation are left out unless the texts have nothing else; with `span` only tokens
    inside its matches count. The texts go through the tree's model (`model`, else `tree.config.model`) at
    its layer, then every dictionary (refined ones gated by their parents) with the tree's firing rule.

    Parameters
    ----------
    tree : FeatureTree
    texts : list of str
    model, layer : optional
        Default: the tree's config.
    span : compiled regex, optional
        Only tokens overlapping one of its matches count (a phrase's own tokens in its contexts).

    Example:
        >>> q = query_firing(tree, ["the anthrax bacterium"])  # doctest: +SKIP
        >>> q.n_docs, q.n_tokens  # doctest: +SKIP
        (1, 2)
    """
    x, toks, strings = forward_texts(tree, texts, model=model, layer=layer)
    if span is not None:  # corpus contexts of a phrase: only the phrase's own tokens count
        keep = in_spans(texts, toks, span)
    else:  # the query is about its content words: drop stop words and punctuation unless nothing else is left
        keep = np.array([_is_content(t) for t in strings])
    doc = toks["doc_id"].to_numpy()
    if keep.any():
        x, doc = x[torch.from_numpy(keep)], doc[keep]
    return QueryFiring(fire_rungs(tree, x), doc, len(texts))


def forward_texts(tree, texts: list[str], *, model=None, layer: int | None = None):
    """Run `texts` through the tree's model at its layer: (activations (n, d_model), tokens, token strings).

    `tokens` has token_id, doc_id (the text's position in `texts`), start, end per row; special tokens are
    dropped as in a harvest. The dictionaries' d_model is checked against the layer's.

    Parameters
    ----------
    tree : FeatureTree
    texts : list of str
    model, layer : optional
        Default: the tree's config.

    Example:
        >>> x, toks, strings = forward_texts(tree, ["the anthrax bacterium"])  # doctest: +SKIP
        >>> strings  # doctest: +SKIP
        ['the', 'ant', '##hra', '##x', 'bacterium']
    """
    from featuretree.harvest import collect

    wrapped = tree_model(tree, model)
    layer = tree_layer(tree, layer)
    cfg = tree.config
    with quiet(), tempfile.TemporaryDirectory(prefix="featuretree-query-") as tmp:
        acts = collect(wrapped, layer, texts, n_tokens=10**9, out=tmp, progress=False,
                       max_length=cfg.max_length if cfg is not None else 128, site=tree_site(tree))
        x = acts.load("all")
        toks = acts.tokens("all")
        strings = acts.token_strings(toks["token_id"].tolist())
    if x.shape[0] == 0:
        raise FeatureTreeError("the query has no tokens the model keeps (only special tokens?): give real text")
    for rung, sae in tree.saes.items():
        if sae.d_model != x.shape[1]:
            raise FeatureTreeError(f"rung {rung} expects d_model {sae.d_model} but the model's layer {layer} "
                                   f"gives {x.shape[1]}: pass the model and layer the tree was built from")
    return x, toks.reset_index(drop=True), strings


def in_spans(texts: list[str], tokens, pattern: re.Pattern, occurrence: bool = False) -> np.ndarray:
    """Bool per token row: it overlaps a match of `pattern` in its text (all pieces of a query word).

    Parameters
    ----------
    texts : list of str
        The texts the tokens' doc_id numbers point into.
    tokens : pandas.DataFrame
        doc_id, start, end per token (as `forward_texts` returns).
    pattern : compiled regex
    occurrence : bool
        Return, instead, the number of the match each token is in (-1 outside any), counting matches over
        all texts in order: the pieces of one occurrence share a number.

    Example:
        >>> import pandas as pd, re
        >>> toks = pd.DataFrame({"doc_id": [0, 0, 0], "start": [0, 4, 9], "end": [3, 8, 11]})
        >>> in_spans(["ant hrax is"], toks, re.compile("anthrax|ant hrax")).tolist()
        [True, True, False]
    """
    spans, first, n = {}, {}, 0
    for d in sorted(set(int(v) for v in tokens["doc_id"])):
        spans[d] = [m.span() for m in pattern.finditer(texts[d])]
        first[d], n = n, n + len(spans[d])
    out = np.full(len(tokens), -1, dtype=np.int64)
    for i, (d, s_, e) in enumerate(zip(tokens["doc_id"], tokens["start"], tokens["end"])):
        for j, (a, b) in enumerate(spans[int(d)]):
            if a < e and s_ < b:
                out[i] = first[int(d)] + j
                break
    return out if occurrence else out >= 0


def query_rates(tree, texts: list[str], *, model=None, layer: int | None = None,
                span: re.Pattern | None = None) -> dict[str, float]:
    """Share of the texts' content tokens on which each node fires: {node id: rate}, for every rung.

    `query_firing(...).token_rates()` (see there for which tokens count and the parameters), plus
    "_n_tokens": the number of tokens counted.

    Parameters
    ----------
    tree : FeatureTree
        The tree whose nodes fire.
    texts : list of str
        The texts to run.
    model, layer : optional
        The model and layer to run the texts through (default: the tree's config).
    span : compiled regex, optional
        Only tokens overlapping one of its matches count.

    Example:
        >>> query_rates(tree, ["the anthrax bacterium"])["w512/11"]  # doctest: +SKIP
        1.0
    """
    q = query_firing(tree, texts, model=model, layer=layer, span=span)
    return {**q.token_rates(), "_n_tokens": float(q.n_tokens)}
