"""find: which nodes of a tree answer a query (a phrase or example texts), by how much more they fire on it.

    score(node) = log((rate_query + eps) / (freq + eps)) - max(0, log((rate_neg + eps) / (freq + eps)))
                  + label_weight * (query words found in the node's label, top tokens or distinctive words)

`rate_query` is the share of the query's tokens on which the node fires (the tree's firing rule, refined
nodes gated by their parents), `freq` its firing rate on the run's held-out tokens (the baseline),
`rate_neg` the share on the negative examples; eps = 1 / (number of query tokens) keeps a node that never
fires on the query from scoring.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import pandas as pd

from featuretree.config import FeatureTreeError
from featuretree.refine import _model_of, query_rates
from featuretree.utils import rung_key

log = logging.getLogger(__name__)

_WORD = re.compile(r"[a-z][a-z-]{2,}")


def _texts(query: Any, what: str) -> list[str]:
    texts = [query] if isinstance(query, str) else list(query or [])
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if what == "query" and not texts:
        raise FeatureTreeError("the query is empty: give a word or phrase, or a list of example texts")
    return texts


def _corpus_contexts(corpus, phrase: str, n: int) -> tuple[re.Pattern, list[str]]:
    from featuretree.corpus import corpus_texts

    pattern = re.compile(r"(?<!\w)" + re.escape(phrase) + r"(?!\w)", re.IGNORECASE)
    try:
        texts = corpus_texts(corpus)
    except (FeatureTreeError, OSError, ValueError):  # the corpus is gone or was a list: use the phrase alone
        return pattern, []
    return pattern, [t for t in texts if pattern.search(t)][:n]


def _rung_filter(tree, rungs) -> set[str] | None:
    if rungs is None:
        return None
    names = {str(r) if not str(r).isdigit() else f"w{r}" for r in ([rungs] if isinstance(rungs, (str, int)) else rungs)}
    known = set(tree.saes) | {str(d.get("rung")) for _, d in tree.graph.nodes(data=True) if d.get("rung")}
    unknown = sorted(names - known)
    if unknown:
        raise FeatureTreeError(f"rungs {unknown} are not in the tree: its rungs are {sorted(tree.saes, key=rung_key)}")
    return names


def find(tree, query, *, negatives=None, rungs=None, model=None, layer: int | None = None, label_weight: float = 0.5,
         n_contexts: int = 50, top: int | None = 20) -> pd.DataFrame:
    """Nodes that answer `query` best first: DataFrame (node, score, label, freq, query_rate, label_hits).

    `query` is a word/phrase or a list of example texts. A word or phrase is looked up in the tree's corpus
    first: up to `n_contexts` texts containing it become the examples, and only the phrase's own tokens in
    them count (a model sees "anthrax" in context, not alone); without a corpus hit the phrase itself is
    the example. `negatives` (optional, same forms) are texts the wanted feature should NOT fire on.
    `rungs` (names like "w512" or widths, e.g. tree.rungs[:2] for coarse features) limits the nodes ranked.
    See the module docstring for the score. `top=None` returns every node.

    Example:
        >>> hits = find(tree, "biology", rungs=["w128", "w512"])  # doctest: +SKIP
        >>> hits.iloc[0].node  # doctest: +SKIP
        'w512/148'
    """
    texts = _texts(query, "query")
    only = _rung_filter(tree, rungs)
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
        if d.get("virtual") or (only is not None and str(d.get("rung")) not in only):
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
