"""find, search and novel: which nodes answer a query, a depth-first search down the answering branch, and
which nodes new texts make fire unusually. One scorer serves all three:

    lift(node) = log((rate + eps) / (freq + eps))

`rate` is the share of the query's tokens on which the node fires (the tree's firing rule, refined nodes
gated by their parents), `freq` its firing rate on the run's held-out tokens (the baseline), and
eps = 1 / (number of query tokens) keeps a node that never fires on the query from scoring.

Given several example texts, find scores documents instead (`level="document"`): a topical feature fires in
most of the examples, an incidental one (place names in a few glosses of species) fires hard in a few. With
`doc` the share of the examples in which the node fires on a content word and `bg` the same share of
background texts (a sample of the run's corpus),

    coverage(node) = log((doc + eps) / (bg + eps)),  eps = 1 / (number of examples)

(eps keeps a node firing in one or two examples below one firing in most of them; weighting the log by doc,
as a KL term, favoured broad function-word features and lowered find's WordNet purity from 0.28 to 0.20,
docs/EVAL.md). find adds label matches, each query word weighted by the share of the examples that contain
it (1 for a phrase), and subtracts the same score on negative examples:

    score(node) = s(query) - max(0, s(negatives)) + label_weight * (query words in its label, top tokens
                  or distinctive words),   s = lift (token level) or coverage (document level)
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import pandas as pd

from featuretree.config import FeatureTreeError, RefineConfig, settings
from featuretree.utils import rung_key

__all__ = ["SEARCH_REFINE", "background_texts", "coverage", "find", "lift", "node_scores", "novel", "query_words",
           "rung_filter", "search"]

log = logging.getLogger(__name__)


def lift(rate: float, freq: float, eps: float) -> float:
    """How much more (or less) a node fires on a query than usual: log((rate + eps) / (freq + eps)).

    Parameters
    ----------
    rate : float
        Share of the query's tokens on which the node fires.
    freq : float
        The node's usual firing rate (on the run's held-out tokens).
    eps : float
        Smoothing, 1 / (number of query tokens).

    Example:
        >>> round(lift(0.5, 0.01, 0.01), 3)
        3.239
    """
    return math.log((rate + eps) / (freq + eps))


def coverage(doc: float, bg: float, eps: float) -> float:
    """How much more often a node fires in the example texts than in background texts:
    log((doc + eps) / (bg + eps)), the document-level lift.

    The smoothing keeps a node that fires in one or two examples (an incidental word) below one that fires in
    most of them: with 20 examples, 3 of 20 against 2% of the background scores 1.05, 16 of 20 against
    10% scores 1.73.

    Parameters
    ----------
    doc : float
        Share of the example texts in which the node fires.
    bg : float
        Share of background texts in which it fires.
    eps : float
        Smoothing, 1 / (number of example texts).

    Example:
        >>> round(coverage(0.8, 0.1, 0.05), 2), round(coverage(0.15, 0.02, 0.05), 2)
        (1.73, 1.05)
    """
    return math.log((doc + eps) / (bg + eps))


def background_texts(tree, n: int = 300, *, exclude=(), seed: int = 0) -> list[str]:
    """`n` texts of the tree's corpus drawn at random (seeded), none of them in `exclude`: what document-level
    find compares example texts with. Empty when the tree has no corpus it can read.

    Parameters
    ----------
    tree : FeatureTree
    n : int
        How many.
    exclude : iterable of str
        Texts not to draw (the query's own examples).
    seed : int

    Example:
        >>> len(background_texts(tree, 100))  # doctest: +SKIP
        100
    """
    import numpy as np

    texts = _readable_corpus(tree.config.corpus) if tree.config is not None else []
    skip = set(exclude)
    pool = [t for t in texts if t not in skip and t.strip()]
    if not pool:
        return []
    pick = np.random.default_rng(seed).choice(len(pool), size=min(int(n), len(pool)), replace=False)
    return [pool[i] for i in np.sort(pick)]


_WORD = re.compile(r"[a-z][a-z-]{2,}")


def query_words(texts: list[str], share: bool = False) -> set[str] | dict[str, float]:
    """The lower-cased content words (3+ letters, no stop words) of `texts`, which find matches against labels
    (so a label of function words, "the · of · a", never matches the glosses' own "the" and "of").

    Parameters
    ----------
    texts : list of str
    share : bool
        Return {word: share of the texts that contain it} instead of a set (document-level find's label weights).

    Example:
        >>> sorted(query_words(["The anthrax bacterium", "a spore of it"]))
        ['anthrax', 'bacterium', 'spore']
        >>> query_words(["anthrax spores", "anthrax"], share=True)["spores"]
        0.5
    """
    from collections import Counter

    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    if not share:
        return set(_WORD.findall(" ".join(texts).lower())) - ENGLISH_STOP_WORDS
    counts = Counter(w for t in texts for w in set(_WORD.findall(t.lower())) - ENGLISH_STOP_WORDS)
    return {w: c / max(len(texts), 1) for w, c in counts.items()}


def _texts(query: Any, what: str) -> list[str]:
    texts = [query] if isinstance(query, str) else list(query or [])
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if what == "query" and not texts:
        raise FeatureTreeError("the query is empty: give a word or phrase, or a list of example texts")
    return texts


def _readable_corpus(corpus) -> list[str]:
    """The texts of a run's corpus, or [] when it cannot be read (gone, or it was a list)."""
    from featuretree.corpus import corpus_texts

    try:
        return corpus_texts(corpus)
    except (FeatureTreeError, OSError, ValueError):
        return []


def _corpus_contexts(corpus, phrase: str, n: int) -> tuple[re.Pattern, list[str]]:
    pattern = re.compile(r"(?<!\w)" + re.escape(phrase) + r"(?!\w)", re.IGNORECASE)
    return pattern, [t for t in _readable_corpus(corpus) if pattern.search(t)][:n]  # none: the phrase alone


def _scoring_level(level: str, query, texts: list[str]) -> str:
    """find's level: "auto" is by document for two or more example texts, by token for a word or phrase."""
    if level not in ("auto", "token", "document"):
        raise FeatureTreeError(f"level={level!r} is not one of 'auto', 'token', 'document'")
    if level == "auto":
        return "document" if not isinstance(query, str) and len(texts) >= 2 else "token"
    return level


def rung_filter(tree, rungs) -> set[str] | None:
    """The rung names `rungs` (names like "w512" or widths) stand for, checked against the tree; None for None.

    Parameters
    ----------
    tree : FeatureTree
    rungs : str, int, list of them, or None

    Example:
        >>> rung_filter(tree, [128, "w512"])  # doctest: +SKIP
        {'w128', 'w512'}
    """
    if rungs is None:
        return None
    names = {str(r) if not str(r).isdigit() else f"w{r}" for r in ([rungs] if isinstance(rungs, (str, int)) else rungs)}
    known = set(tree.saes) | {str(d.get("rung")) for _, d in tree.graph.nodes(data=True) if d.get("rung")}
    unknown = sorted(names - known)
    if unknown:
        raise FeatureTreeError(f"rungs {unknown} are not in the tree: its rungs are {sorted(tree.saes, key=rung_key)}")
    return names


def find(tree, query, *, negatives=None, rungs=None, model=None, layer: int | None = None, label_weight: float = 0.5,
         n_contexts: int = 50, top: int | None = 20, level: str = "auto", background=None,
         n_background: int = 300) -> pd.DataFrame:
    """Nodes that answer `query` best first: DataFrame (node, score, label, freq, query_rate, doc_rate,
    background_rate, label_hits).

    `query` is a word/phrase or a list of example texts. A word or phrase is looked up in the tree's corpus
    first: up to `n_contexts` texts containing it become the examples, and only the phrase's own tokens in
    them count (a model sees "anthrax" in context, not alone); without a corpus hit the phrase itself is
    the example. Several example texts are scored by document (see the module docstring): how many of them
    a node fires in against `background` texts, so a topical feature beats one that fires hard on a few.

    Parameters
    ----------
    tree : FeatureTree
    query : str or list of str
    negatives : str or list of str, optional
        Texts the wanted feature should NOT fire on.
    rungs : list, optional
        Names like "w512" or widths (e.g. tree.rungs[:2] for coarse features): only their nodes are ranked.
    model, layer : optional
        Default: the tree's config.
    label_weight : float
        Added per query word found in a node's label, top tokens or distinctive words.
    n_contexts : int
        Corpus texts a word or phrase is looked up in (0: the phrase alone).
    top : int or None
        Rows returned (None: every node).
    level : "auto", "token" or "document"
        "auto": document level for two or more example texts, token level for a word or phrase.
    background : list of str, optional
        Document level: the texts the examples are compared with (default: `n_background` of the corpus's).
    n_background : int

    Example:
        >>> hits = find(tree, "biology", rungs=["w128", "w512"])  # doctest: +SKIP
        >>> hits.iloc[0].node  # doctest: +SKIP
        'w512/148'
        >>> find(tree, biology_glosses, rungs=["w128"]).iloc[0].doc_rate  # doctest: +SKIP
        0.85
    """
    from featuretree.firing import query_firing, tree_model

    texts = _texts(query, "query")
    level = _scoring_level(level, query, texts)  # a phrase is scored by token, whatever its corpus contexts
    only = rung_filter(tree, rungs)
    model = tree_model(tree, model)  # loaded once for the query, the negatives and the background
    span = None
    if isinstance(query, str) and tree.config is not None and n_contexts > 0:
        span, found = _corpus_contexts(tree.config.corpus, query.strip(), n_contexts)
        if found:
            log.info("find %r: %d corpus texts contain it; scoring its tokens there", query, len(found))
            texts = found
        else:
            span = None
    # label matches use the query's own words (several examples: weighted by how many contain each)
    words = query_words(_texts(query, "query"), share=level == "document")
    q = query_firing(tree, texts, model=model, layer=layer, span=span)
    neg = None
    if negatives is not None and _texts(negatives, "negatives"):
        neg = query_firing(tree, _texts(negatives, "negatives"), model=model, layer=layer)
    bg_rates: dict[str, float] = {}
    if level == "document":
        bg = list(background) if background is not None else background_texts(tree, n_background, exclude=texts)
        if not bg:
            raise FeatureTreeError("document-level find needs background texts and this tree has no corpus to draw "
                                   "them from: pass background=[...] (texts like the examples, on other topics) "
                                   "or level='token'")
        bg_rates = query_firing(tree, bg, model=model, layer=layer).document_rates()
    scores = node_scores(tree, q, level=level, bg_rates=bg_rates, neg=neg, only=only, words=words,
                         label_weight=label_weight)
    log.info("find %r (%s level): %d query tokens in %d texts; best %s (score %.2f)", texts[0][:40], level,
             q.n_tokens, q.n_docs, scores.node.iloc[0] if len(scores) else None,
             scores.score.iloc[0] if len(scores) else float("nan"))
    return scores.head(top) if top is not None else scores


def node_scores(tree, q, *, level: str, bg_rates: dict[str, float], neg=None, only: set[str] | None = None,
                words: set[str] = frozenset(), label_weight: float = 0.5) -> pd.DataFrame:
    """find's table, best first, from where the nodes fire on the query (and negatives, and background).

    Parameters
    ----------
    tree : FeatureTree
    q : featuretree.firing.QueryFiring
        Firing on the query's texts.
    level : "token" or "document"
    bg_rates : dict
        Document level: {node: share of background texts it fires in}.
    neg : QueryFiring, optional
        Firing on negative examples.
    only : set of str, optional
        Rung names to rank.
    words : set of str, or dict
        The query's words, matched against labels; a dict gives each a weight (`query_words(texts, share=True)`).
    label_weight : float

    Example:
        >>> node_scores(tree, query_firing(tree, texts), level="token", bg_rates={})  # doctest: +SKIP
    """
    rates, docs = q.token_rates(), q.document_rates()
    eps, eps_doc = 1.0 / max(q.n_tokens, 1), 1.0 / max(q.n_docs, 1)
    neg_rates = (neg.token_rates() if level == "token" else neg.document_rates()) if neg is not None else {}
    rows = []
    for n, d in tree.graph.nodes(data=True):
        if d.get("virtual") or (only is not None and str(d.get("rung")) not in only):
            continue
        freq = float(d.get("freq") or 0.0)
        rate, doc, bg = rates.get(n, 0.0), docs.get(n, 0.0), bg_rates.get(n, 0.0)
        if level == "token":
            score = lift(rate, freq, eps)
            if neg is not None:
                score -= max(0.0, lift(neg_rates.get(n, 0.0), freq, eps))
        else:
            score = coverage(doc, bg, eps_doc)
            if neg is not None:
                score -= max(0.0, coverage(neg_rates.get(n, 0.0), bg, 1.0 / max(neg.n_docs, 1)))
        text = " ".join([str(d.get("label", "")), *map(str, d.get("top_tokens") or []), *map(str, d.get("words") or [])])
        hits = (sum(words.get(w, 0.0) for w in set(_WORD.findall(text.lower()))) if isinstance(words, dict)
                else len(words & set(_WORD.findall(text.lower()))))
        rows.append({"node": n, "score": score + label_weight * hits, "label": d.get("label", n), "freq": freq,
                     "query_rate": rate, "doc_rate": doc, "background_rate": bg, "label_hits": hits})
    cols = ["node", "score", "label", "freq", "query_rate", "doc_rate", "background_rate", "label_hits"]
    df = pd.DataFrame(rows, columns=cols)
    return df.sort_values(["score", "query_rate"], ascending=False, kind="stable").reset_index(drop=True)


def _children(tree, n: str) -> list[str]:
    from featuretree.tree import ROOT

    if n == ROOT:
        return tree.roots()
    return [c for c in tree.graph.successors(n) if not tree.graph.nodes[c].get("virtual")]


SEARCH_REFINE = RefineConfig(min_tokens=300)
"""How search refines a node none of whose children answers: depth 1, and regions from 300 tokens (a query's
branch narrows fast, so leaves are smaller than the nodes one refines by hand)."""


def search(tree, query, config: RefineConfig | None = None, *, start: str | None = None, max_depth: int = 6,
           negatives=None, refine_leaves: bool = True, texts=None, model=None, layer: int | None = None,
           level: str = "auto", progress: bool = True, **overrides) -> pd.DataFrame:
    """Targeted depth-first search: from the top, step to the child that answers `query` best, refining leaves.

    At each step the children of the current node (the tree's top-level features first, or `start`'s
    children) that fire on the query more than they usually do (`find`'s score > 0) are candidates, and the
    one whose branch leads to the best score (through such nodes) is taken: a broad ancestor of a very
    specific feature wins over a sibling that only scores well itself. A node none of whose children answers
    (a leaf, or one whose ladder children miss the query) is refined (depth 1) when `refine_leaves`, so the
    search goes below the ladder only along the branch it follows. Stops after `max_depth` steps, when no
    child answers, or when a leaf has too few tokens to refine.

    Parameters
    ----------
    tree : FeatureTree
    query : str or list of str
        A word or phrase (looked up in the corpus, as `find` does), or example texts.
    config : RefineConfig, optional
        How leaves are refined (default SEARCH_REFINE); `overrides` (width=, k=, min_tokens=, ...) replace fields.
    start : str, optional
        A node to search under (e.g. a "biology" feature); it is then the path's first row.
    max_depth : int
        Steps down at most.
    negatives : str or list of str, optional
        Texts the wanted feature should not fire on.
    refine_leaves : bool
        False only walks the existing tree.
    texts : list of str, optional
        What refinement streams instead of the run's corpus.
    model, layer : optional
        Default: the tree's config.
    level : "auto", "token" or "document"
        How nodes are scored, as in `find` (several example texts: by document, against the corpus).
    progress : bool

    Returns
    -------
    DataFrame
        The path (step, node, label, score, query_rate, freq, refined); `path.attrs["tree"]` is the tree with
        the refinements made.

    Example (the default run; the last step is a feature of a dictionary trained where w8192/8012 fires):
        >>> path = search(tree, "malaria")  # doctest: +SKIP
        >>> path[["node", "label"]].values.tolist()[-1]  # doctest: +SKIP
        ['w8192/8012/r64/51', 'parasite · malaria · parasites | mosquito']
    """
    rc = settings(RefineConfig, config if config is not None else SEARCH_REFINE, **overrides)
    from featuretree.firing import tree_layer, tree_model
    from featuretree.refine import refine
    from featuretree.tree import ROOT

    model = tree_model(tree, model)
    layer = tree_layer(tree, layer)
    background = None  # document level: one background sample for every step
    if _scoring_level(level, query, _texts(query, "query")) == "document":
        background = background_texts(tree, exclude=_texts(query, "query")) or None

    def score(t) -> tuple[pd.DataFrame, dict[str, float]]:  # every node's score, and where each branch leads
        s = find(t, query, negatives=negatives, model=model, layer=layer, top=None, level=level,
                 background=background).set_index("node")
        return s, branch_reach(t, s)

    scores, reach = score(tree)
    rows, current = [], ROOT
    if start is not None and start != ROOT:
        tree.node(start)  # an unknown id is a clear error
        r = scores.loc[start] if start in scores.index else None
        rows.append({"step": 0, "node": start, "label": tree.graph.nodes[start].get("label", start),
                     "score": float(r["score"]) if r is not None else float("nan"),
                     "query_rate": float(r["query_rate"]) if r is not None else 0.0,
                     "freq": float(tree.graph.nodes[start].get("freq") or 0.0),
                     "refined": bool(tree.graph.nodes[start].get("refined", False))})
        current = start
    refined_here: set[str] = set()
    for step in range(len(rows), len(rows) + int(max_depth)):
        kids = _children(tree, current)
        answer = answering(kids, scores)
        if not answer and refine_leaves and current != ROOT and current not in refined_here:
            # no finer level answers (none, or the ladder's children miss the query): make one where it fires
            refined_here.add(current)
            try:
                tree = refine(tree, current, rc, depth=1, texts=texts, model=model, layer=layer, progress=progress)
            except FeatureTreeError as e:
                log.info("search stops at %s: %s", current, e)
                break
            scores, reach = score(tree)
            kids = _children(tree, current)
            answer = answering(kids, scores)
        if not answer:
            log.info("search stops at %s: none of its %d children answers %r", current, len(kids), query)
            break
        best = max(answer, key=lambda c: (reach[c], scores.at[c, "score"], scores.at[c, "query_rate"]))
        r = scores.loc[best]
        rows.append({"step": step, "node": best, "label": r["label"], "score": float(r["score"]),
                     "query_rate": float(r["query_rate"]), "freq": float(r["freq"]),
                     "refined": bool(tree.graph.nodes[best].get("refined", False))})
        current = best
    path = pd.DataFrame(rows, columns=["step", "node", "label", "score", "query_rate", "freq", "refined"])
    path.attrs["tree"] = tree
    return path


def answering(nodes: list[str], scores: pd.DataFrame) -> list[str]:
    """The nodes that fire on the query more than they usually do (score > 0, query rate > 0)."""
    return [c for c in nodes if c in scores.index and scores.at[c, "score"] > 0 and scores.at[c, "query_rate"] > 0]


def branch_reach(tree, scores: pd.DataFrame) -> dict[str, float]:
    """For every answering node, the best score in its subtree reachable through answering nodes only.

    Choosing the child with the best reach instead of the best own score finds a specific feature the
    greedy walk misses when its branch starts with a broad, weaker-scoring ancestor.
    """
    import networkx as nx

    g = tree.graph
    ok = set(answering(list(g.nodes), scores))
    reach: dict[str, float] = {}
    for n in reversed(list(nx.topological_sort(g))):
        if n in ok:
            below = [reach[c] for c in g.successors(n) if c in reach]
            reach[n] = max([float(scores.at[n, "score"]), *below])
    return reach


def novel(tree, texts, *, model=None, layer: int | None = None, top: int | None = 20,
          min_rate: float = 1e-3) -> pd.DataFrame:
    """Nodes whose firing rate on `texts` departs most from their corpus rate, most over-firing first.

    DataFrame (node, label, freq, rate, log_ratio, direction): `rate` is the share of the texts' content
    tokens on which the node fires (`featuretree.firing.query_rates`), `freq` its corpus rate, log_ratio =
    log((rate + eps) / (freq + eps)) with eps = 1 / (content tokens), direction "up" or "down". Nodes below
    `min_rate` both in the texts and in the corpus are left out; `top` keeps the nodes of largest
    |log_ratio| (None: all), still sorted by log_ratio descending. `model` / `layer` default to the tree's config.

    Example:
        >>> novel(tree, ["a zebra crossed the savanna"]).iloc[0].direction  # doctest: +SKIP
        'up'
    """
    from featuretree.firing import query_rates

    texts = [texts] if isinstance(texts, str) else [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise FeatureTreeError("no texts to compare with the corpus: pass a list of non-empty strings")
    rates = query_rates(tree, texts, model=model, layer=layer)
    n_tokens = rates.pop("_n_tokens")
    eps = 1.0 / n_tokens
    rows = []
    for n, d in tree.graph.nodes(data=True):
        if d.get("virtual"):
            continue
        freq, rate = float(d.get("freq") or 0.0), rates.get(n, 0.0)
        if max(freq, rate) < min_rate:
            continue
        ratio = lift(rate, freq, eps)
        rows.append({"node": n, "label": d.get("label", n), "freq": freq, "rate": rate, "log_ratio": ratio,
                     "direction": "up" if ratio > 0 else "down"})
    df = pd.DataFrame(rows, columns=["node", "label", "freq", "rate", "log_ratio", "direction"])
    if top is not None:
        df = df.loc[df["log_ratio"].abs().sort_values(ascending=False, kind="stable").index[:top]]
    df = df.sort_values(["log_ratio", "rate"], ascending=False, kind="stable").reset_index(drop=True)
    log.info("novel: %d content tokens; %s", int(n_tokens),
             f"{df.node.iloc[0]} fires {df.rate.iloc[0]:.1%} vs {df.freq.iloc[0]:.2%} usually" if len(df) else "no nodes")
    return df


