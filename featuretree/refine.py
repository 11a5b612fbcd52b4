"""find: which nodes of a tree answer a query (a phrase or example texts), by how much more they fire on it.

    score(node) = log((rate_query + eps) / (freq + eps)) - max(0, log((rate_neg + eps) / (freq + eps)))
                  + label_weight * (query words found in the node's label, top tokens or distinctive words)

`rate_query` is the share of the query's tokens on which the node fires (the same firing rule as `link`),
`freq` its firing rate on the run's held-out tokens (the baseline), `rate_neg` the share on the negative
examples; eps = 1 / (number of query tokens) keeps a node that never fires on the query from scoring.
"""

from __future__ import annotations

import logging
import math
import re
import tempfile
from typing import Any

import numpy as np
import pandas as pd
import torch

from featuretree.config import FeatureTreeError

log = logging.getLogger(__name__)

_WORD = re.compile(r"[a-z][a-z-]{2,}")


def _texts(query: Any, what: str) -> list[str]:
    texts = [query] if isinstance(query, str) else list(query or [])
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if what == "query" and not texts:
        raise FeatureTreeError("the query is empty: give a word or phrase, or a list of example texts")
    return texts


def _is_content(token: str) -> bool:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    t = token.replace("##", "").replace("Ġ", "").replace("▁", "").strip().lower()
    return any(c.isalnum() for c in t) and t not in ENGLISH_STOP_WORDS


def _model_of(tree, model):
    """`model` (anything load_model takes), else the tree's own model, loaded and nnsight-wrapped."""
    from featuretree.model import load_model

    if model is None and tree.config is None:
        raise FeatureTreeError("this tree has no config to say which model made it: pass model=... and layer=...")
    return load_model(model if model is not None else tree.config.model)


def query_rates(tree, texts: list[str], *, model=None, layer: int | None = None,
                span: re.Pattern | None = None) -> dict[str, float]:
    """Share of the texts' content tokens on which each node fires: {node id: rate}, for every rung.

    Stop words and punctuation are left out unless the texts have nothing else. The texts go through the tree's model (`model`, else `tree.config.model`) at its layer, then each
    rung's dictionary with the firing rule `link` used (`fire_rel` from the graph).

    Example:
        >>> query_rates(tree, ["the anthrax bacterium"])["w512/11"]  # doctest: +SKIP
        1.0
    """
    from featuretree.activations import collect
    from featuretree.tree import fire

    cfg = tree.config
    model = _model_of(tree, model)
    layer = layer if layer is not None else cfg.layer
    quiet = logging.getLogger("featuretree.activations")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "the corpus has only N tokens" is the point here, not a problem
    try:
        with tempfile.TemporaryDirectory(prefix="featuretree-query-") as tmp:
            acts = collect(model, layer, texts, n_tokens=10**9, out=tmp, progress=False,
                           max_length=cfg.max_length if cfg is not None else 128)
            x = acts.load("all")
            toks = acts.tokens("all")
            strings = acts.token_strings(toks["token_id"].tolist())
            docs = acts.texts()
    finally:
        quiet.setLevel(level)
    if x.shape[0] == 0:
        raise FeatureTreeError("the query has no tokens the model keeps (only special tokens?): give real text")
    if span is not None:  # corpus contexts of a phrase: only the phrase's own tokens count
        spans = {d: [m.span() for m in span.finditer(t)] for d, t in docs.items()}
        keep = np.array([any(a < e and s_ < b for a, b in spans.get(int(d), ()))
                         for d, s_, e in zip(toks["doc_id"], toks["start"], toks["end"])])
    else:  # the query is about its content words: drop stop words and punctuation unless nothing else is left
        keep = np.array([_is_content(t) for t in strings])
    if keep.any():
        x = x[torch.from_numpy(keep)]
    fire_rel = tree.graph.graph.get("fire_rel", 0.25)
    rates: dict[str, float] = {}
    for rung, sae in tree.saes.items():
        if sae.d_model != x.shape[1]:
            raise FeatureTreeError(f"rung {rung} expects d_model {sae.d_model} but the model's layer {layer} "
                                   f"gives {x.shape[1]}: pass the model and layer the tree was built from")
        _, _, F = fire(sae, x, fire_rel)
        counts = np.asarray(F.sum(0)).ravel()
        for j in np.flatnonzero(counts):
            rates[f"{rung}/{j}"] = float(counts[j] / x.shape[0])
    rates["_n_tokens"] = float(x.shape[0])
    return rates


def _corpus_contexts(corpus, phrase: str, n: int) -> tuple[re.Pattern, list[str]]:
    from featuretree.corpus import load_corpus

    pattern = re.compile(r"(?<!\w)" + re.escape(phrase) + r"(?!\w)", re.IGNORECASE)
    try:
        texts = load_corpus(corpus).texts
    except (FeatureTreeError, OSError, ValueError):  # the corpus is gone or was a list: use the phrase alone
        return pattern, []
    return pattern, [t for t in texts if pattern.search(t)][:n]


def find(tree, query, *, negatives=None, model=None, layer: int | None = None, label_weight: float = 0.5,
         n_contexts: int = 50, top: int | None = 20) -> pd.DataFrame:
    """Nodes that answer `query` best first: DataFrame (node, score, label, freq, query_rate, label_hits).

    `query` is a word/phrase or a list of example texts. A word or phrase is looked up in the tree's corpus
    first: up to `n_contexts` texts containing it become the examples, and only the phrase's own tokens in
    them count (a model sees "anthrax" in context, not alone); without a corpus hit the phrase itself is
    the example. `negatives` (optional, same forms) are texts the wanted feature should NOT fire on. See
    the module docstring for the score. `top=None` returns every node.

    Example:
        >>> hits = find(tree, "biology")  # doctest: +SKIP
        >>> hits.iloc[0].node  # doctest: +SKIP
        'w2048/272'
    """
    texts = _texts(query, "query")
    model = _model_of(tree, model)  # loaded once for the query and the negatives
    words = set(_WORD.findall(" ".join(texts).lower()))  # label matches use the query's own words
    span = None
    if isinstance(query, str) and tree.config is not None and n_contexts > 0:
        span, found = _corpus_contexts(tree.config.corpus, query.strip(), n_contexts)
        if found:
            log.info("find %r: %d corpus texts contain it; scoring its tokens there", query, len(found))
            texts = found
        else:
            span = None
    rates = query_rates(tree, texts, model=model, layer=layer, span=span)
    n_q = rates.pop("_n_tokens")
    neg = {}
    if negatives is not None and _texts(negatives, "negatives"):
        neg = query_rates(tree, _texts(negatives, "negatives"), model=model, layer=layer)
        neg.pop("_n_tokens")
    eps = 1.0 / n_q
    rows = []
    g = tree.graph
    for n, d in g.nodes(data=True):
        if d.get("virtual"):
            continue
        freq = float(d.get("freq") or 0.0)
        rate = rates.get(n, 0.0)
        score = math.log((rate + eps) / (freq + eps))
        if neg:
            score -= max(0.0, math.log((neg.get(n, 0.0) + eps) / (freq + eps)))
        text = " ".join([str(d.get("label", "")), *map(str, d.get("top_tokens") or []), *map(str, d.get("words") or [])])
        hits = len(words & set(_WORD.findall(text.lower())))
        rows.append({"node": n, "score": score + label_weight * hits, "label": d.get("label", n), "freq": freq,
                     "query_rate": rate, "label_hits": hits})
    df = pd.DataFrame(rows, columns=["node", "score", "label", "freq", "query_rate", "label_hits"])
    df = df.sort_values(["score", "query_rate"], ascending=False, kind="stable").reset_index(drop=True)
    log.info("find %r: %d query tokens; best %s (score %.2f)", texts[0][:40], int(n_q),
             df.node.iloc[0] if len(df) else None, df.score.iloc[0] if len(df) else float("nan"))
    return df.head(top) if top is not None else df
