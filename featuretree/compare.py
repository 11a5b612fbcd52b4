"""match and novel: which features two dictionaries share (universality), and which fire unusually on new texts.

match pairs feature i of dictionary A with feature j of B by the Pearson correlation of their activations
on the same tokens, from sparse codes (k non-zeros per row, never a dense (n, width) matrix):
    corr(i, j) = (A[:, i] . B[:, j] / n - mean_i mean_j) / (std_i std_j)
Two features that never fire together have corr <= 0, so the positive correlations live on the sparsity
pattern of A^T B. An optimal one-to-one assignment then maximises the total positive correlation (dense
scipy.optimize.linear_sum_assignment, or its sparse twin LAPJVsp for large dictionaries: same optimum).
    shared_fraction = |matched pairs with corr >= threshold| / min(live features of A, live features of B)
Dictionaries of two models (or layers) are compared on tokens aligned by identical character spans.

novel ranks a tree's nodes by log((rate + eps) / (freq + eps)), eps = 1 / n_tokens: the firing rate on new
texts' content tokens against the corpus rate `freq`; a feature firing for the first time tops the list.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from featuretree.activations import is_store, iter_batches
from featuretree.config import FeatureTreeError
from featuretree.firing import encode_all, tree_site
from featuretree.sae import TopKSAE
from featuretree.tree import FeatureTree
from featuretree.utils import quiet

__all__ = ["aligned_activations", "assign", "correlations", "DENSE_MAX", "Match", "match", "sparse_codes"]

log = logging.getLogger(__name__)

DENSE_MAX = 4096 * 4096  # above this many (rows x cols) the assignment runs on the sparse graph instead
_COLUMNS = ["a", "b", "corr", "cos", "shared", "label_a", "label_b"]


@dataclass
class Match:
    """The result of `match`: matched pairs, best first, and the share of features the two dictionaries share.

    `pairs` has columns a, b (node ids such as "w512/7"), corr, cos (decoder cosine; NaN across spaces),
    shared (corr >= threshold), label_a, label_b. Only pairs with a positive correlation are listed.

    Parameters
    ----------
    pairs : pandas.DataFrame
        The matched pairs, best first, with the columns above.
    shared_fraction : float
        Pairs with corr >= `threshold` over min(n_live_a, n_live_b) (0.0 when either has no live feature).
    n_live_a, n_live_b : int
        Live features of each dictionary: active on at least `match`'s `min_tokens` of the tokens compared.
    n_tokens : int
        Tokens the correlations were measured on.
    threshold : float
        The correlation at which a pair counts as shared.
    rung_a, rung_b : str
        The rungs compared, e.g. "w512".

    Example:
        >>> m = Match(pd.DataFrame(columns=_COLUMNS), 0.0, 10, 12, 1000, 0.7, "w16", "w16")
        >>> str(m)
        'w16 vs w16: 0 of 10 live features shared (corr >= 0.70), 0.0%, on 1000 tokens'
    """

    pairs: pd.DataFrame
    shared_fraction: float
    n_live_a: int
    n_live_b: int
    n_tokens: int
    threshold: float
    rung_a: str
    rung_b: str

    @property
    def n_shared(self) -> int:
        """Matched pairs with corr >= threshold.

        Example:
            >>> Match(pd.DataFrame({"shared": [True, False]}), 0.5, 2, 2, 10, 0.7, "w4", "w4").n_shared
            1
        """
        return int(self.pairs["shared"].sum()) if len(self.pairs) else 0

    def summary(self) -> str:
        """One line: rungs, shared features out of the live ones, the fraction, the tokens compared.

        Example:
            >>> Match(pd.DataFrame({"shared": [True]}), 0.5, 2, 3, 10, 0.7, "w4", "w8").summary()
            'w4 vs w8: 1 of 2 live features shared (corr >= 0.70), 50.0%, on 10 tokens'
        """
        return (f"{self.rung_a} vs {self.rung_b}: {self.n_shared} of {min(self.n_live_a, self.n_live_b)} live "
                f"features shared (corr >= {self.threshold:.2f}), {100 * self.shared_fraction:.1f}%, "
                f"on {self.n_tokens} tokens")

    __str__ = summary


# ---- inputs ----------------------------------------------------------------------------------------------
def _rung_name(rung: Any) -> str:
    text = str(rung)
    return text if not text.isdigit() else f"w{text}"


def _pick(obj: Any, rung: Any, which: str) -> tuple[TopKSAE, str, Any]:
    """(dictionary, rung name, graph or None) from a TopKSAE, a FeatureTree or a {width | rung: TopKSAE} dict."""
    if isinstance(obj, TopKSAE):
        return obj, f"w{obj.width}", None
    graph = None
    if isinstance(obj, FeatureTree):
        saes, graph = obj.saes, obj.graph
    elif isinstance(obj, dict):
        saes = {_rung_name(k): v for k, v in obj.items()}
    else:
        raise FeatureTreeError(f"{which} is a {type(obj).__name__}: pass a TopKSAE, a FeatureTree or "
                               "a dict {width: TopKSAE} from ft.train_ladder")
    if not saes or not all(isinstance(s, TopKSAE) for s in saes.values()):
        raise FeatureTreeError(f"{which} holds no TopKSAE dictionaries: pass a trained ladder or tree")
    if rung is None:  # the widest ladder rung (refined rungs such as "w512/7/r64" only saw their region)
        ladder = [r for r in saes if "/" not in r] or list(saes)
        name = max(ladder, key=lambda r: (saes[r].width, r))
    else:
        name = _rung_name(rung)
        if name not in saes:
            raise FeatureTreeError(f"{which} has no rung {rung!r}: choose one of {sorted(saes, key=lambda r: saes[r].width)}")
    return saes[name], name, graph


def _rows(acts: Any, max_tokens: int, what: str) -> torch.Tensor:
    """(n, d_model) float32 rows: a store's held-out split (all of it if nothing is held out), or a Tensor."""
    if is_store(acts):
        split = "heldout" if acts.n_rows("heldout") > 0 else "all"
        return acts.load(split, max_tokens=max_tokens)
    x = torch.as_tensor(acts)
    if x.ndim != 2:
        raise FeatureTreeError(f"{what} must be an Activations store or a 2-D tensor [n, d_model]; "
                               f"got shape {tuple(x.shape)}")
    return x[:max_tokens].float()


def _model_and_layer(obj: Any, model: Any, layer: int | None, which: str) -> tuple[Any, int, int]:
    cfg = obj.config if isinstance(obj, FeatureTree) else None
    if (model is None or layer is None) and cfg is None:
        raise FeatureTreeError(f"{which} has no config to say which model and layer made it: "
                               f"pass model_{which}=... and layer_{which}=... with texts=")
    return (model if model is not None else cfg.model, layer if layer is not None else cfg.layer,
            cfg.max_length if cfg is not None else 128)


def _span_table(acts) -> pd.DataFrame:
    """Row number of every token by its (doc text, char start, char end) span; empty and repeated spans dropped."""
    toks = acts.tokens("all")
    if len(toks) and (toks["start"] < 0).all():
        raise FeatureTreeError("the model's tokenizer gives no character offsets (not a 'fast' tokenizer), so "
                               "tokens cannot be aligned across models: load the model with a fast tokenizer")
    docs = acts.texts()
    df = pd.DataFrame({"text": toks["doc_id"].map(docs), "start": toks["start"], "end": toks["end"],
                       "row": np.arange(len(toks))})
    df = df[df["end"] > df["start"]]
    return df.drop_duplicates(["text", "start", "end"], keep="first")


def _same_model(m_a: Any, m_b: Any) -> bool:
    """The same model object, name, path or (module, tokenizer) pair (wrapped models compare by identity)."""
    plain = (str, os.PathLike, tuple)
    return m_a is m_b or (isinstance(m_a, plain) and type(m_a) is type(m_b) and m_a == m_b)


def aligned_activations(texts, model_a, layer_a: int, model_b, layer_b: int, *, max_tokens: int = 100_000,
                        max_length: int = 128, site_a: str = "",
                        site_b: str = "") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Activations of `texts` at two models' layers, row-aligned by identical (doc text, start, end) spans.

    Only tokens whose span exists in both tokenizations are kept. With the same model and layer the texts
    run once and the second tensor is None (one space).

    Parameters
    ----------
    texts : list of str
        The documents to run (or anything with a `.texts` list, such as a Corpus).
    model_a, model_b : str, path, (module, tokenizer) or loaded model
        The two models (anything `load_model` takes).
    layer_a, layer_b : int
        The block of each model whose output is harvested.
    max_tokens : int
        Most tokens harvested from each model.
    max_length : int
        Tokenizer truncation length for each text.
    site_a, site_b : str
        A submodule of each block to read instead of its output ("mlp"; "" the block), as each tree's config says.

    Example:
        >>> xa, xb = aligned_activations(["a cat"], tiny_a, 0, tiny_b, 0)  # doctest: +SKIP
        >>> xa.shape[0] == xb.shape[0]  # doctest: +SKIP
        True
    """
    from featuretree.activations import as_texts
    from featuretree.harvest import collect
    from featuretree.model import load_model

    texts = as_texts(texts)
    same = _same_model(model_a, model_b)
    # "the corpus has only N tokens" is expected: the texts are all there is
    with quiet(), tempfile.TemporaryDirectory(prefix="featuretree-match-") as tmp:
        model_a = load_model(model_a)
        acts_a = collect(model_a, layer_a, texts, n_tokens=max_tokens, out=f"{tmp}/a", progress=False,
                         max_length=max_length, site=site_a)
        if same and layer_a == layer_b and site_a == site_b:
            return acts_a.load("all"), None
        model_b = model_a if same else load_model(model_b)
        acts_b = collect(model_b, layer_b, texts, n_tokens=max_tokens, out=f"{tmp}/b", progress=False,
                         max_length=max_length, site=site_b)
        both = _span_table(acts_a).merge(_span_table(acts_b), on=["text", "start", "end"], suffixes=("_a", "_b"))
        if both.empty:
            raise FeatureTreeError("no token of the texts has the same character span in both models' "
                                   "tokenizations: pass longer texts of ordinary words")
        both = both.sort_values("row_a")
        x_a = acts_a.load("all")[torch.from_numpy(both["row_a"].to_numpy(copy=True))]  # (n, d_a)
        x_b = acts_b.load("all")[torch.from_numpy(both["row_b"].to_numpy(copy=True))]  # (n, d_b)
    log.info("aligned %d tokens across the two models (%d and %d harvested)", len(both), len(acts_a), len(acts_b))
    return x_a, x_b


# ---- maths ---------------------------------------------------------------------------------------------
@torch.no_grad()
def sparse_codes(sae: TopKSAE, x: torch.Tensor) -> sp.csr_matrix:
    """The (n, width) float64 CSR matrix of `sae`'s activations on `x` (k entries per row at most).

    Example:
        >>> sparse_codes(TopKSAE(8, 32, 2), torch.randn(5, 8)).shape
        (5, 32)
    """
    v, i = encode_all(sae, iter_batches(x, 8192, shuffle=False))  # (n, k) each
    n, k = i.shape
    A = sp.csr_matrix((v.reshape(-1).astype(np.float64), i.reshape(-1), np.arange(0, n * k + 1, k)),
                      shape=(n, sae.width))
    A.eliminate_zeros()
    return A


def _moments(A: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    n = A.shape[0]
    mean = np.asarray(A.sum(0)).ravel() / n
    var = np.asarray(A.power(2).sum(0)).ravel() / n - mean**2
    return mean, np.sqrt(np.maximum(var, 0.0))


def correlations(A: sp.csr_matrix, B: sp.csr_matrix, *, block: int = 1024) -> sp.coo_matrix:
    """Positive Pearson correlations between the columns of two (n, width) sparse code matrices.

    corr = (A^T B / n - mean_a mean_b) / (std_a std_b), computed `block` columns of A at a time; pairs
    that never fire together have corr <= 0 and are left out, so the result is as sparse as A^T B.

    Example:
        >>> A = sp.csr_matrix(np.array([[1.0, 0], [0, 2.0], [1.0, 0]]))
        >>> correlations(A, A).toarray().round(2).tolist()
        [[1.0, 0.0], [0.0, 1.0]]
    """
    if A.shape[0] != B.shape[0]:
        raise FeatureTreeError(f"the two code matrices have {A.shape[0]} and {B.shape[0]} rows: "
                               "correlations need the same tokens on both sides")
    n = A.shape[0]
    (mean_a, std_a), (mean_b, std_b) = _moments(A), _moments(B)
    At, B = A.T.tocsr(), B.tocsr()
    rows, cols, vals = [], [], []
    for s in range(0, At.shape[0], block):
        C = (At[s:s + block] @ B).tocoo()  # (block, width_b) co-firing sums, sparse
        r, c = C.row + s, C.col
        denom = std_a[r] * std_b[c]
        corr = np.divide(C.data / n - mean_a[r] * mean_b[c], denom, out=np.zeros_like(denom), where=denom > 0)
        keep = corr > 0
        rows.append(r[keep])
        cols.append(c[keep])
        vals.append(np.minimum(corr[keep], 1.0))
    return sp.coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                         shape=(A.shape[1], B.shape[1]))


def assign(corr: sp.coo_matrix, *, dense_max: int = DENSE_MAX) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one pairs (rows, cols, corr) maximising the total of the (positive, sparse) correlations.

    Only rows and columns with some positive correlation take part. Up to `dense_max` cells the dense
    linear_sum_assignment runs; above, LAPJVsp on the sparse graph with one zero-gain "unmatched" edge per
    row (same optimum, far less memory). Pairs are returned by decreasing correlation.

    Example:
        >>> c = sp.coo_matrix(np.array([[0.9, 0.8], [0.85, 0.0]]))
        >>> [r.tolist() for r in assign(c)]
        [[1, 0], [0, 1], [0.85, 0.8]]
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    corr = corr.tocoo()
    keep = corr.data > 0
    if not keep.any():
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0)
    rows_u, ri = np.unique(corr.row[keep], return_inverse=True)
    cols_u, ci = np.unique(corr.col[keep], return_inverse=True)
    v = corr.data[keep]
    n_r, n_c = len(rows_u), len(cols_u)
    if n_r * n_c <= dense_max:
        D = np.zeros((n_r, n_c))
        D[ri, ci] = v
        r, c = linear_sum_assignment(D, maximize=True)
        got = D[r, c]
    else:
        # cost 2 - corr in [1, 2) on real edges, 2 on the extra column of each row: a full matching always
        # exists and its cost is 2 n_r - (total matched correlation)
        G = sp.csr_matrix((np.concatenate([2.0 - v, np.full(n_r, 2.0)]),
                           (np.concatenate([ri, np.arange(n_r)]), np.concatenate([ci, n_c + np.arange(n_r)]))),
                          shape=(n_r, n_c + n_r))
        r, c = min_weight_full_bipartite_matching(G)
        real = c < n_c
        r, c = r[real], c[real]
        got = 2.0 - np.asarray(G[r, c]).ravel()
    pos = got > 0
    order = np.argsort(-got[pos], kind="stable")
    return rows_u[r[pos][order]], cols_u[c[pos][order]], got[pos][order]


# ---- public ----------------------------------------------------------------------------------------------
def match(a, b, acts=None, *, acts_b=None, texts=None, rung_a=None, rung_b=None, max_tokens: int = 100_000,
          threshold: float = 0.7, same_space: bool | None = None, model_a=None, model_b=None,
          layer_a: int | None = None, layer_b: int | None = None, min_tokens: int = 10,
          dense_max: int = DENSE_MAX) -> Match:
    """Pair the features of two dictionaries one-to-one by activation correlation; see the module docstring.

    `a` and `b` are each a TopKSAE, a FeatureTree or a {width | rung: TopKSAE} dict (then `rung_a` /
    `rung_b`, e.g. "w512" or 512, pick a rung; default the widest). `acts` (an Activations store, whose
    held-out split is used, or a Tensor [n, d_model]) gives the tokens for `a` and, unless `acts_b` is given
    (row-aligned with `acts`, for a dictionary of another model or layer), for `b` too. Instead of `acts`,
    `texts` (a list of strings) runs each tree's model (`model_a` / `model_b`, `layer_a` / `layer_b` override
    the trees' configs) and keeps the tokens whose character spans both tokenizers share. At most
    `max_tokens` tokens are compared. Features active on fewer than `min_tokens` of them take no part and
    do not count as live: two features seen once on the same token correlate perfectly by chance (on the
    default run's w8192 rungs of two seeds, such pairs had corr 1.0 and decoder cosine 0.1). Decoder
    cosines are reported when `same_space` (default: same d_model and one activation space).

    Parameters
    ----------
    a, b : TopKSAE, FeatureTree or dict of width or rung to TopKSAE
        The two dictionaries (or trees / ladders holding them).
    acts : Activations or Tensor [n, d_model], optional
        The tokens for `a` (and for `b` without `acts_b`); a store's held-out split is used.
    acts_b : Activations or Tensor [n, d_model_b], optional
        `b`'s activations of the same tokens, row for row with `acts`.
    texts : list of str, optional
        Instead of `acts`: texts run through both models, tokens aligned by character span.
    rung_a, rung_b : str or int, optional
        The rung of each to compare, e.g. "w512" or 512 (default: the widest ladder rung).
    max_tokens : int
        Most tokens compared.
    threshold : float
        Correlation in (0, 1] from which a pair counts as shared.
    same_space : bool, optional
        Report decoder cosines (default: both read the same activations and d_model agrees).
    model_a, model_b : str, path or loaded model, optional
        With `texts`: the models to run (default: each tree's `config.model`).
    layer_a, layer_b : int, optional
        With `texts`: the layers to harvest (default: each tree's `config.layer`).
    min_tokens : int
        Features active on fewer of the tokens are left out and not counted as live.
    dense_max : int
        Up to this many (rows x cols) cells the assignment is dense, above it sparse (see `assign`).

    Example:
        >>> import featuretree as ft
        >>> x = torch.randn(4000, 16)
        >>> m = match(ft.train_ladder(x, (32,), k=4, seed=0, progress=False),
        ...           ft.train_ladder(x, (32,), k=4, seed=1, progress=False), x)
        >>> m.pairs.columns.tolist()[:5], 0 <= m.shared_fraction <= 1
        (['a', 'b', 'corr', 'cos', 'shared'], True)
    """
    if not 0 < threshold <= 1:
        raise FeatureTreeError(f"threshold={threshold} must lie in (0, 1]: it is a correlation")
    if int(max_tokens) <= 0:
        raise FeatureTreeError(f"max_tokens={max_tokens} must be a positive integer")
    sae_a, name_a, g_a = _pick(a, rung_a, "a")
    sae_b, name_b, g_b = _pick(b, rung_b, "b")
    if texts is not None:
        if acts is not None or acts_b is not None:
            raise FeatureTreeError("pass either texts= (run the models) or acts= / acts_b= (stored activations), "
                                   "not both")
        m_a, l_a, max_len = _model_and_layer(a, model_a, layer_a, "a")
        m_b, l_b, _ = _model_and_layer(b, model_b, layer_b, "b")
        x_a, x_b = aligned_activations(texts, m_a, l_a, m_b, l_b, max_tokens=max_tokens, max_length=max_len,
                                       site_a=tree_site(a) if isinstance(a, FeatureTree) else "",
                                       site_b=tree_site(b) if isinstance(b, FeatureTree) else "")
    elif acts is None:
        raise FeatureTreeError("no tokens to compare on: pass acts= (an Activations store or a Tensor [n, d_model]) "
                               "or texts= (a list of strings the trees' models will read)")
    else:
        x_a = _rows(acts, max_tokens, "acts")
        x_b = _rows(acts_b, max_tokens, "acts_b") if acts_b is not None else None
    if x_b is not None and x_b.shape[0] != x_a.shape[0]:
        raise FeatureTreeError(f"acts has {x_a.shape[0]} rows but acts_b {x_b.shape[0]}: acts_b must hold the "
                               "same tokens, row for row (or pass texts= to align two models by spans)")
    for sae, x, name, which in ((sae_a, x_a, name_a, "a"), (sae_b, x_b if x_b is not None else x_a, name_b, "b")):
        if x.shape[1] != sae.d_model:
            hint = "pass acts_b= with b's own activations" if which == "b" and x_b is None else "check the layer"
            raise FeatureTreeError(f"{which} ({name}) expects d_model {sae.d_model} but its activations have "
                                   f"{x.shape[1]}: {hint}")
    if x_a.shape[0] == 0:
        raise FeatureTreeError("no tokens to compare on: the activations are empty; collect more tokens")
    if same_space is None:
        same_space = x_b is None and sae_a.d_model == sae_b.d_model
    elif same_space and sae_a.d_model != sae_b.d_model:
        raise FeatureTreeError(f"same_space=True but d_model differs ({sae_a.d_model} vs {sae_b.d_model})")

    A = _supported(sparse_codes(sae_a, x_a), min_tokens)
    B = _supported(sparse_codes(sae_b, x_b if x_b is not None else x_a), min_tokens)
    n_live_a, n_live_b = int((A.getnnz(0) > 0).sum()), int((B.getnnz(0) > 0).sum())
    rows, cols, corr = assign(correlations(A, B), dense_max=dense_max)
    if same_space:
        Wa = torch.nn.functional.normalize(sae_a.W_dec.detach()[torch.from_numpy(rows)], dim=1)
        Wb = torch.nn.functional.normalize(sae_b.W_dec.detach()[torch.from_numpy(cols)], dim=1)
        cos = (Wa * Wb).sum(1).double().numpy()
    else:
        cos = np.full(len(rows), np.nan)
    ids_a = [f"{name_a}/{int(i)}" for i in rows]
    ids_b = [f"{name_b}/{int(j)}" for j in cols]
    pairs = pd.DataFrame({"a": ids_a, "b": ids_b, "corr": corr, "cos": cos, "shared": corr >= threshold,
                          "label_a": [_label(g_a, n) for n in ids_a], "label_b": [_label(g_b, n) for n in ids_b]},
                         columns=_COLUMNS)
    n_min = min(n_live_a, n_live_b)
    out = Match(pairs, float(pairs["shared"].sum() / n_min) if n_min else 0.0, n_live_a, n_live_b,
                int(x_a.shape[0]), float(threshold), name_a, name_b)
    log.info("%s", out.summary())
    return out


def _supported(A: sp.csr_matrix, min_tokens: int) -> sp.csr_matrix:
    """`A` with the columns of features active on fewer than `min_tokens` rows zeroed (too rare to correlate)."""
    keep = (A.getnnz(0) >= max(int(min_tokens), 1)).astype(np.float64)
    A = (A @ sp.diags(keep)).tocsr()
    A.eliminate_zeros()
    return A


def _label(g, n: str) -> str:
    return str(g.nodes[n].get("label", n)) if g is not None and n in g else n
