"""FeatureTree and link: join each rung's features to parents in narrower rungs by co-activation.

For a child feature c (wide rung) and a candidate parent p (a narrower rung), on held-out tokens:
    coverage(c, p) = P(p fires | c fires) = |fires(c) & fires(p)| / |fires(c)|
The primary parent is the one with the highest coverage (decoder cosine breaks ties); a child whose best
coverage in the rung just above is below `min_coverage` is tried against the rungs further up, and is
left without a feature parent ("novel") if none covers it. Decoder cosine is recorded but never decides
alone: a child that absorbed its parent has a decoder row as close to the parent as to itself (../FINDINGS).
A virtual node ROOT ("root", virtual=True) is the parent of the narrowest rung's features (edge kind "top")
and of every novel feature (edge kind "novel"), so the graph is one tree.
Co-activation is counted in blocks of child features (`coactivation_blocks` -> `joint_counts`) and only the
pairs that pass a threshold are kept: memory does not grow with width x width (docs/SCALE.md, measured).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import numpy as np
import scipy.sparse as sp
import torch

from featuretree.activations import is_store
from featuretree.config import Config, FeatureTreeError, LinkConfig, settings
from featuretree.firing import fire, fire_codes
from featuretree.sae import TopKSAE
from featuretree.utils import rung_key

__all__ = ["add_virtual_root", "attach", "candidates", "coactivation_blocks", "coverage_matrix", "decoder_cos",
           "FeatureTree", "joint_counts", "link", "link_codes", "node_id", "ROOT"]

log = logging.getLogger(__name__)

ROOT = "root"  # the virtual node above the narrowest rung and the novel features
BLOCK = 4096  # child features whose joint counts are computed at once (candidates)
MAX_PAIRS = 1 << 23  # most joint counts held at once: ~17 bytes each while a block is filtered
MAX_PARENTS = 16  # candidate parents link keeps per child: attach uses the best and 8 others
TIE = 0.05  # attach: parents covering a child within this of the best one count as tied


@dataclass
class FeatureTree:
    """A feature hierarchy: `graph` (nx.DiGraph, edges parent -> child), the dictionaries, the config.

    Nodes are ids like "w1024/311" with attributes width, index, rung, freq, label, top_tokens,
    top_contexts; edges carry cos, coverage and kind. `saes` maps rung names ("w1024", and refined rungs
    like "w1024/311/r64") to TopKSAE. `path` is the run directory (set by `build(out=...)`, `save`, `load`):
    refinement finds the run's activation store through it.

    Example:
        >>> t = FeatureTree(nx.DiGraph(), {}, Config())
        >>> t.rungs
        []
    """

    graph: nx.DiGraph
    saes: dict[str, TopKSAE] = field(default_factory=dict)
    config: Config | None = None
    path: Path | None = field(default=None, compare=False)  # the run directory it was saved to / loaded from

    @property
    def rungs(self) -> list[str]:
        """Rung names from narrowest to widest, e.g. ["w128", "w512"].

        Example:
            >>> FeatureTree(nx.DiGraph(), {"w8": None, "w2": None}).rungs
            ['w2', 'w8']
        """
        return sorted(self.saes, key=rung_key)

    def roots(self) -> list[str]:
        """The top-level features: the virtual root's "top" children (graphs without a virtual root: the
        parentless nodes). Novel features are listed by `novel_features`.

        Example:
            >>> g = nx.DiGraph([("w2/0", "w8/1")])
            >>> FeatureTree(g).roots()
            ['w2/0']
        """
        g = self.graph
        if ROOT in g and g.nodes[ROOT].get("virtual"):
            return [n for n in g.successors(ROOT) if g.edges[ROOT, n].get("kind") == "top"]
        return [n for n in g.nodes if g.in_degree(n) == 0]

    def novel_features(self) -> list[str]:
        """Features no narrower feature covers (they hang under the virtual root with edge kind "novel").

        Example:
            >>> g = nx.DiGraph(); g.add_node("w8/3", novel=True); g.add_node("w2/0")
            >>> FeatureTree(g).novel_features()
            ['w8/3']
        """
        return [n for n, d in self.graph.nodes(data=True) if d.get("novel")]

    def node(self, node_id: str) -> dict:
        """Attributes of one node; an unknown id is an error that says how to find valid ones.

        Example:
            >>> g = nx.DiGraph(); g.add_node("w2/0", freq=0.5)
            >>> FeatureTree(g).node("w2/0")["freq"]
            0.5
        """
        if node_id not in self.graph:
            raise FeatureTreeError(f"unknown node {node_id!r}: ids look like 'w1024/311'; list them with ft.to_frame(tree)")
        return self.graph.nodes[node_id]


def node_id(rung: str, index: int) -> str:
    """The node id of feature `index` of rung `rung`.

    Example:
        >>> node_id("w1024", 311)
        'w1024/311'
    """
    return f"{rung}/{int(index)}"


def coverage_matrix(child: sp.csr_matrix, parent: sp.csr_matrix) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """coverage[c, p] = P(p fires | c fires) as a sparse (w_child, w_parent) matrix, plus both firing counts.

    The whole matrix at once: for small rungs and tests. Linking (`candidates`) computes the same
    coverages block by block and keeps only those that pass its thresholds.

    Parameters
    ----------
    child : scipy.sparse.csr_matrix
        The child rung's 0/1 firing matrix (n_tokens, w_child).
    parent : scipy.sparse.csr_matrix
        The parent rung's 0/1 firing matrix (n_tokens, w_parent), on the same tokens.

    Example:
        >>> c = sp.csr_matrix(np.array([[1.0], [1.0]])); p = sp.csr_matrix(np.array([[1.0, 0], [0, 1.0]]))
        >>> coverage_matrix(c, p)[0].toarray().tolist()
        [[0.5, 0.5]]
    """
    co = (child.T @ parent).tocsr()  # (w_child, w_parent) joint firing counts
    n_child = np.asarray(child.sum(0)).ravel()
    n_parent = np.asarray(parent.sum(0)).ravel()
    inv = sp.diags(1.0 / np.maximum(n_child, 1))
    return (inv @ co).tocsr(), n_child, n_parent


def decoder_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two decoder rows (recorded on every edge; never decides a parent alone).

    Parameters
    ----------
    a, b : Tensor (d_model,)
        The two decoder rows.

    Example:
        >>> decoder_cos(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]))  # doctest: +ELLIPSIS
        0.707...
    """
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def joint_counts(child_t: sp.csr_matrix, parent: sp.csr_matrix) -> sp.csr_matrix:
    """Joint firing counts of a block of child features with every parent feature, as a (B, w_parent) CSR.

    The one place co-activation is counted: `candidates` calls it block by block, so a torch.sparse (CUDA)
    version of this function is all a device path needs. Only the pairs that co-fire are stored.

    Parameters
    ----------
    child_t : csr_matrix (B, n)
        A block of child features (rows) over the tokens: rows of the transposed child firing matrix.
    parent : csr_matrix (n, w_parent)
        The parent rung's firing matrix on the same tokens.

    Example:
        >>> c = sp.csr_matrix(np.array([[1.0, 1.0, 0.0]]))  # one child, firing on tokens 0 and 1
        >>> p = sp.csr_matrix(np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]))
        >>> joint_counts(c, p).toarray().tolist()
        [[2.0, 1.0]]
    """
    return (child_t @ parent).tocsr()


def coactivation_blocks(child_t: sp.csr_matrix, parent: sp.csr_matrix, rows: np.ndarray, *, block: int = BLOCK,
                        max_pairs: int = MAX_PAIRS):
    """Yield (features, joint counts) for consecutive blocks of the child features `rows`.

    A block holds at most `block` child features and at most `max_pairs` joint counts: each child's count
    row is bounded by min(sum over its tokens of the parent features firing there, w_parent), and blocks
    are cut on the running sum of those bounds (a child whose bound alone exceeds `max_pairs` is a block of
    its own). Memory is then O(max_pairs) whatever the widths: never (w_child, w_parent), never (n, width).

    Parameters
    ----------
    child_t : csr_matrix (w_child, n)
        The child rung's firing matrix, transposed (one row per child feature).
    parent : csr_matrix (n, w_parent)
        The parent rung's firing matrix.
    rows : ndarray of int, ascending
        The child features wanted.
    block, max_pairs : int
        Most child features and most joint counts per block.

    Example:
        >>> F = sp.csr_matrix(np.array([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]]))
        >>> [(f.tolist(), co.toarray().tolist()) for f, co in coactivation_blocks(F.T.tocsr(), F, np.arange(3), block=2)]
        [([0, 1], [[2.0, 1.0, 1.0], [1.0, 1.0, 0.0]]), ([2], [[1.0, 0.0, 1.0]])]
    """
    rows = np.asarray(rows, dtype=np.int64)
    if not len(rows):
        return
    per_token = np.diff(parent.indptr).astype(np.float64)  # parent features firing on each token
    bound = np.minimum(child_t @ per_token, parent.shape[1])[rows]  # >= the stored pairs of each child's row
    ends = np.cumsum(bound)
    start = 0
    while start < len(rows):
        base = ends[start - 1] if start else 0.0
        stop = int(np.searchsorted(ends, base + max_pairs, side="right"))
        stop = min(max(stop, start + 1), start + block, len(rows))
        feats = rows[start:stop]
        yield feats, joint_counts(child_t[feats], parent)
        start = stop


def _covering(child_t, parent, rows, inv, min_v, extra=None, *, block, max_pairs):
    """(child, parent, coverage) of the pairs with coverage >= min_v (and `extra(c, p, v)`), sorted by child,
    then parent descending (the order the sparse products of `coverage_matrix` leave each row in)."""
    out_c, out_p, out_v = [], [], []
    for feats, co in coactivation_blocks(child_t, parent, rows, block=block, max_pairs=max_pairs):
        per_row = np.diff(co.indptr)
        v = co.data * np.repeat(inv[feats], per_row)  # the float arithmetic of coverage_matrix's row scaling
        at = np.flatnonzero(v >= min_v)
        c = feats[np.searchsorted(co.indptr, at, side="right") - 1]
        p, v = co.indices[at].astype(np.int64), v[at]
        del co, at
        if extra is not None:
            keep = extra(c, p, v)
            c, p, v = c[keep], p[keep], v[keep]
        order = np.lexsort((-p, c))
        out_c.append(c[order])
        out_p.append(p[order])
        out_v.append(v[order])
    if not out_c:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), inv[:0]
    return np.concatenate(out_c), np.concatenate(out_p), np.concatenate(out_v)


def _near_best(c: np.ndarray, v: np.ndarray, pos: np.ndarray, max_parents: int) -> np.ndarray:
    """Mask of each child's `max_parents` best-covering candidates (ties: earlier in its pool) and of every
    candidate within TIE of its best (the ones attach chooses the primary among)."""
    if not len(c):
        return np.zeros(0, dtype=bool)
    order = np.lexsort((pos, -v, c))
    cs = c[order]
    first = np.flatnonzero(np.r_[True, cs[1:] != cs[:-1]])
    group = np.cumsum(np.r_[True, cs[1:] != cs[:-1]]) - 1
    rank = np.arange(len(cs)) - first[group]
    best = v[order][first].astype(np.float64)[group]
    keep = np.empty(len(c), dtype=bool)
    keep[order] = (rank < max_parents) | (v[order].astype(np.float64) >= best - TIE)
    return keep


def candidates(above: list[str], r: str, fires: dict, min_coverage: float, within_coverage: float, *,
               max_parents: int | None = None, block: int = BLOCK,
               max_pairs: int = MAX_PAIRS) -> dict[int, list[tuple[str, int, float, float]]]:
    """Candidate parents of each live feature of rung `r`: (rung, index, coverage, reverse) tuples.

    Across rungs: the nearest narrower rung holding any parent with coverage >= min_coverage. Within
    rung `r` (the eval-HSAEs rule): P(p | c) >= within_coverage while P(c | p) < within_coverage, i.e. p
    covers c and fires more widely: a child the rung already resolves beside its parent. Each pool lists
    the across-rung parents, then the within-rung ones, each by parent index descending.

    Co-activation is counted in blocks of child features (`coactivation_blocks`), and only the pairs that
    pass a threshold are kept, so memory stays O(max_pairs + candidates) at any width; the result is the
    one the full `coverage_matrix` products give.

    Parameters
    ----------
    above : list of str
        The narrower rungs, narrowest first.
    r : str
        The rung whose features get parents.
    fires : dict
        {rung: firing matrix (n, width)} on the same tokens.
    min_coverage, within_coverage : float
        LinkConfig's thresholds.
    max_parents : int, optional
        Keep only each child's `max_parents` best-covering candidates (ties: earlier in the pool), plus
        every one within TIE (0.05) of its best; pool order is kept. With max_parents >= 9 `attach` makes
        the same edge and `other_parents` as with the whole pool. None keeps all.
    block, max_pairs : int
        Most child features and most joint counts held at once (coactivation_blocks).

    Example:
        >>> F = {"w2": sp.csr_matrix(np.array([[1.0, 0], [1, 1]]))}
        >>> candidates([], "w2", F, 0.5, 0.9)
        {1: [('w2', 0, 1.0, 0.5)]}
    """
    F = fires[r]
    n_c = np.asarray(F.sum(0)).ravel()
    inv = 1.0 / np.maximum(n_c, 1)  # the same dtype and rounding as coverage_matrix
    F_t = F.T.tocsr()  # (w, n): one row per child feature
    todo = np.flatnonzero(n_c > 0)
    parts = []  # (rung, child, parent, coverage, reverse), in pool order
    for pr in reversed(above):
        if not len(todo):
            break
        n_p = np.asarray(fires[pr].sum(0)).ravel()
        c, p, v = _covering(F_t, fires[pr], todo, inv, min_coverage, block=block, max_pairs=max_pairs)
        parts.append((pr, c, p, v, v * n_c[c] / np.maximum(n_p[p], 1)))
        todo = np.setdiff1d(todo, c, assume_unique=False)

    def within(c, p, v):
        rev = v * n_c[c] / np.maximum(n_c[p], 1)
        return (p != c) & (rev.astype(np.float64) < within_coverage) & (n_c[p] > n_c[c])

    live = np.flatnonzero(n_c > 0) if within_coverage <= 1.000001 else todo[:0]  # coverage <= 1 (+ rounding)
    c, p, v = _covering(F_t, F, live, inv, within_coverage, within, block=block, max_pairs=max_pairs)
    parts.append((r, c, p, v, v * n_c[c] / np.maximum(n_c[p], 1)))
    del F_t
    if max_parents is not None:
        cs = np.concatenate([t[1] for t in parts])
        pos = np.arange(len(cs))  # pool order: every child's entries are in pool order in `parts`
        keep = _near_best(cs, np.concatenate([t[3] for t in parts]), pos, max_parents)
        cuts = np.cumsum([len(t[1]) for t in parts])[:-1]
        parts = [(q, c[m], p[m], v[m], rev[m]) for (q, c, p, v, rev), m in zip(parts, np.split(keep, cuts))]
    out: dict[int, list[tuple[str, int, float, float]]] = {}
    for q, c, p, v, rev in parts:
        for cc, pp, vv, rr in zip(c.tolist(), p.tolist(), v.tolist(), rev.tolist()):
            pool = out.get(cc)
            if pool is None:
                out[cc] = pool = []
            pool.append((q, pp, vv, rr))
    return out


def link(saes, acts, config: LinkConfig | None = None, *, max_tokens: int = 200_000, n_contexts: int = 5,
         labels: bool = True, max_parents: int | None = MAX_PARENTS, **overrides) -> FeatureTree:
    """Build a FeatureTree from a ladder of dictionaries and the activations to measure co-firing on.

    An edge p -> c gets `coverage` = P(p | c), `reverse` = P(c | p), decoder `cos`, and `kind` "same" (both
    coverages >= same_threshold) or "split". Other parents with coverage >= min_coverage are kept in the
    child's `other_parents`. A feature may also get a parent in its own rung (`within=True` on the edge)
    when that parent covers it at >= within_coverage but not the other way round: a child the rung
    resolves beside its parent.

    Memory: the held-out activations (freed once encoded), per rung the codes (kept only for labels) and a
    sparse firing matrix; co-activation is counted in bounded blocks (`candidates`). Nothing of shape
    (n, width) or (width, width) is ever dense.

    Parameters
    ----------
    saes : dict or list
        {width or rung name: TopKSAE}, or a list ordered narrow to wide.
    acts : Activations or Tensor
        A store (its held-out split is used, and labels come from its tokens) or a Tensor [n, d_model]
        (used whole; labels are then feature ids).
    config : LinkConfig or Config, optional
        min_coverage, within_coverage, same_threshold, fire_rel (see LinkConfig); `overrides` replace fields.
    max_tokens : int
        Most held-out tokens to measure co-activation on.
    n_contexts : int
        Contexts kept per node for labels.
    labels : bool
        Label the nodes (needs a store with tokens).
    max_parents : int, optional
        Candidate parents kept per child (see `candidates`; >= 9 gives the same tree as None, all of them).

    Example:
        >>> from featuretree.train import train_ladder
        >>> x = torch.randn(3000, 8)
        >>> saes = train_ladder(x, (8, 16), k=2, epochs=1, batch_size=500, progress=False)
        >>> tree = link(saes, x)
        >>> sorted(tree.graph.nodes[n]["width"] for n in tree.roots())[0]
        8
    """
    cfg = settings(LinkConfig, config, **overrides)
    saes, rungs = _ladder(saes)
    d_model = saes[rungs[0]].d_model
    split = "heldout" if is_store(acts) and acts.n_rows("heldout") > 0 else "all"
    if is_store(acts):
        x_eval = acts.load(split, max_tokens=max_tokens)
    else:
        x_eval = torch.as_tensor(acts)[:max_tokens]
    if x_eval.ndim != 2 or x_eval.shape[-1] != d_model:
        raise FeatureTreeError(f"activations have shape {tuple(x_eval.shape)} but the dictionaries expect "
                               f"[n, {d_model}]: pass the layer's activations the ladder was trained on")
    if not torch.isfinite(x_eval).all():
        raise FeatureTreeError("the activations to link on contain NaN or Inf: check the model's dtype or drop the "
                               "bad rows")
    n = x_eval.shape[0]
    if n == 0:
        raise FeatureTreeError("no held-out tokens to link on: collect more tokens or pass a larger tensor")

    with_labels = labels and is_store(acts)
    codes, fires, ats = {}, {}, {}
    for r in rungs:
        v, i, fires[r], ats[r] = fire(saes[r], x_eval, cfg.fire_rel, with_thresholds=True)
        if with_labels:
            codes[r] = (v, i)
        del v, i
    del x_eval
    acts_path = str(Path(acts.path).resolve()) if is_store(acts) else None
    g = _link_fired(saes, rungs, fires, ats, int(n), cfg, acts_path, max_parents)
    tree = FeatureTree(g, dict(saes), None)
    if with_labels:
        from featuretree.label import annotate

        annotate(tree, codes, acts.tokens(split, max_tokens=max_tokens), acts, n_contexts=n_contexts)
    return tree


def link_codes(saes, codes: dict, config: LinkConfig | None = None, *, max_parents: int | None = MAX_PARENTS,
               **overrides) -> FeatureTree:
    """`link` on codes already computed (no activations, no labels): the tree from each rung's sparse codes.

    The firing rule (`fire_codes`) is applied to the codes, then the rungs are linked exactly as `link`
    does after encoding: the same tree `link` builds from those codes. Useful for codes computed elsewhere
    (another device, a cache) and for measuring linking alone (benchmarks/scale.py link).

    Parameters
    ----------
    saes : dict or list
        {width or rung name: TopKSAE} (widths and decoder rows are used), or a list ordered narrow to wide.
    codes : dict
        {rung name: (values (n, k), indices (n, k))}, the same n tokens for every rung, as encode_all gives.
    config : LinkConfig or Config, optional
        Thresholds and fire_rel; `overrides` replace fields.
    max_parents : int, optional
        Candidate parents kept per child (see `candidates`).

    Example:
        >>> from featuretree.firing import encode_all
        >>> saes = {"w8": TopKSAE(4, 8, 2), "w16": TopKSAE(4, 16, 2)}
        >>> x = torch.randn(500, 4)
        >>> tree = link_codes(saes, {r: encode_all(s, [x]) for r, s in saes.items()})
        >>> tree.graph.graph["n_tokens"], tree.rungs
        (500, ['w8', 'w16'])
    """
    cfg = settings(LinkConfig, config, **overrides)
    saes, rungs = _ladder(saes)
    missing = [r for r in rungs if r not in codes]
    if missing:
        raise FeatureTreeError(f"no codes for rung(s) {missing}: pass {{rung: (values, indices)}} for each of {rungs}")
    ns = {np.shape(codes[r][1])[0] for r in rungs}
    if len(ns) != 1 or 0 in ns:
        raise FeatureTreeError(f"the codes cover {sorted(ns)} tokens: every rung needs codes on the same (>0) tokens")
    fires, ats = {}, {}
    for r in rungs:
        _, _, fires[r], ats[r] = fire_codes(*codes[r], saes[r].width, cfg.fire_rel)
    return FeatureTree(_link_fired(saes, rungs, fires, ats, ns.pop(), cfg, None, max_parents), dict(saes), None)


def _ladder(saes) -> tuple[dict, list[str]]:
    """{rung name: TopKSAE} and the rungs narrow to wide; the dictionaries must share d_model."""
    if isinstance(saes, (list, tuple)):
        saes = {f"w{s.width}": s for s in saes}
    saes = {(k if isinstance(k, str) else f"w{int(k)}"): v for k, v in saes.items()}
    if not saes:
        raise FeatureTreeError("no dictionaries to link: pass {width: TopKSAE} from ft.train_ladder")
    rungs = sorted(saes, key=lambda r: (saes[r].width, r))
    d_models = {saes[r].d_model for r in rungs}
    if len(d_models) != 1:
        raise FeatureTreeError(f"dictionaries disagree on d_model {sorted(d_models)}: link rungs trained on the same layer")
    return saes, rungs


def _link_fired(saes: dict, rungs: list[str], fires: dict, ats: dict, n: int, cfg: LinkConfig,
                acts_path: str | None, max_parents: int | None) -> nx.DiGraph:
    """The linked graph (nodes, edges, virtual root) from each rung's firing matrix and thresholds."""
    g = nx.DiGraph(rungs=rungs, n_tokens=int(n), min_coverage=cfg.min_coverage, within_coverage=cfg.within_coverage,
                   fire_rel=cfg.fire_rel)
    if acts_path is not None:  # where refine finds the tokens again (build makes it relative to the run)
        g.graph["acts"] = acts_path
    for r in rungs:
        sae, at = saes[r], ats[r]
        counts = np.asarray(fires[r].sum(0)).ravel()
        for j in np.flatnonzero(counts):
            g.add_node(node_id(r, j), rung=r, width=sae.width, index=int(j), freq=float(counts[j] / n),
                       fire_at=float(at[j]), label=node_id(r, j), top_tokens=[], top_contexts=[])
        log.info("rung %s: %d of %d features fire on %d held-out tokens", r, len(np.flatnonzero(counts)), sae.width, n)

    n_novel = 0
    for i, r in enumerate(rungs):
        cands = candidates(rungs[:i], r, fires, cfg.min_coverage, cfg.within_coverage, max_parents=max_parents)
        for c, pool in cands.items():
            attach(g, saes, r, c, pool, cfg.same_threshold)
        if i > 0:
            live = np.flatnonzero(np.asarray(fires[r].sum(0)).ravel() > 0)
            novel = [c for c in live if c not in cands]
            for c in novel:
                g.nodes[node_id(r, c)]["novel"] = True
            n_novel += len(novel)
    if n_novel:
        log.info("%d features have no parent covering them >= %.2f (marked novel)", n_novel, cfg.min_coverage)
    add_virtual_root(g, rungs[0])
    return g


def attach(g: nx.DiGraph, saes: dict, r: str, c: int, pool: list[tuple[str, int, float, float]],
           same_threshold: float = LinkConfig.same_threshold) -> None:
    """Add the edge from the primary parent among `pool` (rung, index, coverage, reverse) to feature c of rung r;
    the other candidates go to the child's `other_parents`.

    Among parents that cover the child about equally, the most specific one (highest P(child | parent)) is
    the direct parent: an ancestor covers the child as well but fires more widely.

    Parameters
    ----------
    g : networkx.DiGraph
        The graph to add the edge to (in place).
    saes : dict of str to TopKSAE
        {rung: dictionary} holding rung `r` and every rung in `pool` (for the decoder cosine).
    r : str
        The child's rung, e.g. "w512".
    c : int
        The child's feature index in rung `r`.
    pool : list of (str, int, float, float)
        Candidate parents: (rung, index, coverage P(parent | child), reverse P(child | parent)).
    same_threshold : float
        The edge is kind "same" when both coverage and reverse reach this, else "split".

    Example:
        >>> g = nx.DiGraph(); s = {"w2": TopKSAE(4, 2, 1), "w4": TopKSAE(4, 4, 1)}
        >>> attach(g, s, "w4", 3, [("w2", 0, 0.95, 0.5), ("w2", 1, 0.6, 0.2)])
        >>> list(g.edges), g.nodes["w4/3"]["other_parents"]
        ([('w2/0', 'w4/3')], [['w2/1', 0.6]])
    """
    best_cov = max(v for _, _, v, _ in pool)
    tied = [t for t in pool if t[2] >= best_cov - TIE]
    pr, p, cov, rev = max(tied, key=lambda t: (t[3], t[0] == r))
    kind = "same" if cov >= same_threshold and rev >= same_threshold else "split"
    g.add_edge(node_id(pr, p), node_id(r, c), coverage=cov, reverse=rev,
               cos=decoder_cos(saes[r].W_dec.detach()[c], saes[pr].W_dec.detach()[p]), kind=kind, within=pr == r)
    others = sorted((t for t in pool if t[:2] != (pr, p)), key=lambda t: -t[2])[:8]
    g.nodes[node_id(r, c)]["other_parents"] = [[node_id(q, j), round(v, 4)] for q, j, v, _ in others]


def add_virtual_root(g: nx.DiGraph, top_rung: str) -> None:
    """Hang every parentless feature under the virtual node ROOT: kind "top" for `top_rung`'s features,
    "novel" (and node flag novel=True) for the others. Edge coverage is 1 (the root "fires" everywhere),
    reverse is the feature's firing rate, cos 0.

    Example:
        >>> g = nx.DiGraph(); g.add_node("w2/0", rung="w2", freq=0.5); g.add_node("w8/1", rung="w8", freq=0.1)
        >>> add_virtual_root(g, "w2")
        >>> g.edges[ROOT, "w2/0"]["kind"], g.edges[ROOT, "w8/1"]["kind"], g.nodes["w8/1"]["novel"]
        ('top', 'novel', True)
    """
    tops = [n for n in g if g.in_degree(n) == 0 and n != ROOT]
    g.add_node(ROOT, rung=ROOT, width=0, index=-1, freq=1.0, label="(all tokens)", virtual=True, top_tokens=[],
               top_contexts=[])
    for n in tops:
        d = g.nodes[n]
        kind = "top" if d.get("rung") == top_rung else "novel"
        if kind == "novel":
            d["novel"] = True
        g.add_edge(ROOT, n, coverage=1.0, reverse=float(d.get("freq") or 0.0), cos=0.0, kind=kind, within=False)
