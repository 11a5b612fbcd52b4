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

__all__ = ["CONTEXT_WEIGHT", "MIN_LIFT", "SEARCH_REFINE", "background_texts", "concept_query", "ConceptQuery", "coverage", "find", "lift",
           "node_scores", "novel", "query_words", "rung_filter", "Sample", "sample_texts", "search"]

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


def _phrase_hits(texts: list[str], phrase: str) -> tuple[re.Pattern, list[str]]:
    """`phrase` as a whole-word, case-blind pattern, and every one of `texts` it occurs in."""
    pattern = re.compile(r"(?<!\w)" + re.escape(phrase) + r"(?!\w)", re.IGNORECASE)
    return pattern, [t for t in texts if pattern.search(t)]


def _corpus_contexts(corpus, phrase: str, n: int) -> tuple[re.Pattern, list[str]]:
    pattern, hits = _phrase_hits(_readable_corpus(corpus), phrase)
    return pattern, hits[:n]  # none: the phrase alone


def _scoring_level(level: str, query, texts: list[str]) -> str:
    """find's level: "auto" is by document for two or more example texts, by token for a word or phrase."""
    if level not in ("auto", "token", "document", "concept"):
        raise FeatureTreeError(f"level={level!r} is not one of 'auto', 'token', 'document', 'concept'")
    if level == "concept" and not isinstance(query, str):
        raise FeatureTreeError("level='concept' scores a word or phrase: give one string, or example texts with "
                               "level='document'")
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
    level : "auto", "token", "document" or "concept"
        "auto": document level for two or more example texts, token level for a word or phrase; "concept"
        scores a word or phrase by its occurrences and how specific a node's firing is to texts near it
        in meaning (`ConceptQuery`; adds columns coverage and precision).
    background : list of str, optional
        Document and concept levels: the texts the examples are compared with (default: `n_background` of
        the corpus's; concept level: a `Sample` too).
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
    if level == "concept":
        cq = concept_query(tree, query, n_contexts=n_contexts, background=background, n_background=n_background,
                           model=model, layer=layer)
        scores = cq.scores(tree, only=only, words=query_words(texts), label_weight=label_weight)
        if (neg := _negative_firing(tree, negatives, model, layer)) is not None:
            scores = _minus_negatives(tree, scores, neg)
        return scores.head(top) if top is not None else scores
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
        hits = _label_hits(d, words)
        rows.append({"node": n, "score": score + label_weight * hits, "label": d.get("label", n), "freq": freq,
                     "query_rate": rate, "doc_rate": doc, "background_rate": bg, "label_hits": hits})
    cols = ["node", "score", "label", "freq", "query_rate", "doc_rate", "background_rate", "label_hits"]
    df = pd.DataFrame(rows, columns=cols)
    return df.sort_values(["score", "query_rate"], ascending=False, kind="stable").reset_index(drop=True)


CONTEXT_WEIGHT = 0.2
"""What a token outside the query's own span counts towards concept precision, times its text's relevance."""


class Sample:
    """Texts run once through a tree's model: activations `x`, their `tokens` (token_id, doc_id, start, end),
    and each text's unit sentence embedding (`featuretree.model.embed_texts`). Made by `sample_texts`; a
    search or an evaluation reuses one for every step or query, re-firing only the dictionaries.

    Parameters
    ----------
    texts : list of str
    x : Tensor (n, d_model)
    tokens : pandas.DataFrame
    emb : ndarray (len(texts), 384)

    Example:
        >>> bg = sample_texts(tree, background_texts(tree, 300))  # doctest: +SKIP
        >>> len(bg.texts), bg.emb.shape  # doctest: +SKIP
        (300, (300, 384))
    """

    def __init__(self, texts: list[str], x, tokens: pd.DataFrame, emb) -> None:
        self.texts, self.x, self.tokens, self.emb = list(texts), x, tokens, emb

    @property
    def doc(self):
        """The text number of each token row."""
        return self.tokens["doc_id"].to_numpy()


def sample_texts(tree, texts: list[str], *, model=None, layer: int | None = None) -> Sample:
    """Run `texts` through the tree's model (at its layer) and the sentence encoder, once: a `Sample`.

    Parameters
    ----------
    tree : FeatureTree
    texts : list of str
    model, layer : optional
        Default: the tree's config.

    Example:
        >>> s = sample_texts(tree, ["the anthrax bacterium"])  # doctest: +SKIP
        >>> s.x.shape[0] == len(s.tokens)  # doctest: +SKIP
        True
    """
    from featuretree.firing import forward_texts
    from featuretree.model import embed_texts

    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    x, toks, _ = forward_texts(tree, texts, model=model, layer=layer)
    return Sample(texts, x, toks, embed_texts(texts))


class ConceptQuery:
    """A word or phrase in its corpus contexts, and a background sample of the corpus: what concept-level
    scoring (`find(level="concept")`, the default of `search` for a word) needs. Made by `concept_query`.

    For each node it estimates, over the whole corpus,

    - coverage: the share of the query's occurrences (all subword tokens of one occurrence together) on
      whose span the node fires;
    - precision: of the tokens where the node fires, the relevance-weighted share that are the query's or in
      texts near it in meaning. A token of the query's span counts 1; any other token counts
      `context_weight` x its text's relevance, r = clip((cos - c0) / (c1 - c0), 0, 1) with cos the text's
      sentence-embedding cosine to the mean of the query's contexts, c1 the median cos of the query's
      contexts and c0 that of the background (so a feature of the contexts' other words, e.g. the Latin
      endings of a genus's gloss, counts less than one of the query word itself).
      The node's firing mass outside the query's texts is freq x (corpus tokens) minus its mass inside them
      (so a node seen rarely in the background still has its corpus-wide firing counted), with the relevance
      of its background firings shrunk towards the background's mean relevance r0;
    - score = (coverage + 1 / (occurrences + 1)) x log(precision / r0), plus label_weight per query word in
      its label or top words (the smoothing lets a node that fires in the query's texts but misses its span
      answer a little, so search can pass through it to a child that covers the span).

    A feature of a shared subword ("ant" in ants, antelope and anthrax) covers every occurrence but fires
    mostly in texts unrelated to the query, so its precision is low; a topical feature fires in texts near the
    query; the query's own feature has both.

    Parameters
    ----------
    phrase : str
    query, background : Sample
        The query's contexts (texts containing the phrase) and a background sample without the phrase.
    pattern : compiled regex
        The phrase as a whole word.
    n_query_docs, n_corpus : int
        Corpus texts containing the phrase, and corpus texts in all.
    context_weight : float
        What a token outside the query's span counts, times its text's relevance (CONTEXT_WEIGHT).

    Example:
        >>> cq = concept_query(tree, "anthrax")  # doctest: +SKIP
        >>> cq.scores(tree).iloc[0][["node", "coverage", "precision"]].tolist()  # doctest: +SKIP
        ['w2048/1337', 0.95, 0.71]
    """

    def __init__(self, phrase: str, query: Sample, background: Sample, pattern: re.Pattern, n_query_docs: int,
                 n_corpus: int, context_weight: float = CONTEXT_WEIGHT) -> None:
        import numpy as np

        from featuretree.firing import in_spans

        self.phrase, self.query, self.background, self.pattern = phrase, query, background, pattern
        self.context_weight = float(context_weight)
        self.n_query_docs, self.n_corpus = max(int(n_query_docs), len(query.texts)), int(n_corpus)
        self.occ = in_spans(query.texts, query.tokens, pattern, occurrence=True)
        if not (self.occ >= 0).any():  # the phrase alone, or a tokenizer that drops it: every token is the phrase
            self.occ = np.zeros(len(query.tokens), dtype=np.int64)
        self.n_occ = int(self.occ.max()) + 1
        centre = query.emb.mean(0)
        centre = centre / max(float(np.linalg.norm(centre)), 1e-12)
        cq, cb = query.emb @ centre, background.emb @ centre if len(background.texts) else np.zeros(0)
        c1, c0 = float(np.median(cq)), float(np.median(cb)) if len(cb) else 0.0
        scale = (lambda c: np.clip((c - c0) / (c1 - c0), 0.0, 1.0)) if c1 > c0 + 1e-6 else (lambda c: np.clip(c, 0, 1))
        self.doc_relevance_q, self.doc_relevance_b = scale(cq), scale(cb)
        w = self.context_weight  # a token outside the query's span counts its text's relevance times this
        self.rel_q = np.where(self.occ >= 0, 1.0, w * self.doc_relevance_q[query.doc])
        self.rel_b = w * self.doc_relevance_b[background.doc] if len(background.texts) else np.zeros(0)
        n_b = max(len(background.texts), 1)
        self.w_q = self.n_query_docs / max(len(query.texts), 1)  # corpus texts each sampled one stands for
        self.w_b = max(self.n_corpus - self.n_query_docs, 0) / n_b
        self.n_tokens = len(query.tokens) * self.w_q + len(background.tokens) * self.w_b  # corpus tokens
        mass = self.rel_q.sum() * self.w_q + self.rel_b.sum() * self.w_b
        self.r0 = float(mass / max(self.n_tokens, 1e-12)) or 1e-6

    def scores(self, tree, *, only: set[str] | None = None, words=frozenset(), label_weight: float = 0.5,
               prior: float = 5.0) -> pd.DataFrame:
        """Every node's concept score, best first: DataFrame (node, score, label, freq, query_rate, coverage,
        precision, label_hits); query_rate is the share of the query's span tokens the node fires on.

        Parameters
        ----------
        tree : FeatureTree
            Its dictionaries fire on the samples (a refined tree scores its new nodes too).
        only : set of str, optional
            Rung names to rank.
        words : set of str
            Query words matched against labels (`query_words`).
        label_weight : float
        prior : float
            Pseudo-count of background firings at the background's mean relevance.

        Example:
            >>> concept_query(tree, "anthrax").scores(tree, only={"w128"}).head(3)  # doctest: +SKIP
        """
        import numpy as np
        import scipy.sparse as sp
        import torch

        from featuretree.firing import fire_rungs

        n_q = len(self.query.tokens)
        F_all = fire_rungs(tree, torch.cat([self.query.x, self.background.x]))
        span = self.occ >= 0
        occ_m = sp.csr_matrix((np.ones(int(span.sum()), np.float32), (self.occ[span], np.flatnonzero(span))),
                              shape=(self.n_occ, n_q))
        stats = {}
        for rung, F in F_all.items():
            Fq, Fb = F[:n_q], F[n_q:]
            stats[rung] = (np.asarray(Fq.sum(0)).ravel(), Fq.T @ self.rel_q, np.asarray(Fb.sum(0)).ravel(),
                           Fb.T @ self.rel_b if Fb.shape[0] else np.zeros(F.shape[1]),
                           np.asarray(((occ_m @ Fq) > 0).sum(0)).ravel() / max(self.n_occ, 1),
                           np.asarray(Fq[span].sum(0)).ravel() / max(int(span.sum()), 1))
        rows = []
        for n, d in tree.graph.nodes(data=True):
            rung = str(d.get("rung"))
            if d.get("virtual") or rung not in stats or (only is not None and rung not in only):
                continue
            j, freq = int(d["index"]), float(d.get("freq") or 0.0)
            fq, fq_rel, fb, fb_rel, cov, rate = (a[j] for a in stats[rung])
            m_q, r_q = fq * self.w_q, fq_rel * self.w_q
            m_o = max(freq * self.n_tokens - m_q, fb * self.w_b)
            r_o = (fb_rel + prior * self.r0) / (fb + prior)
            precision = (r_q + m_o * r_o) / (m_q + m_o) if m_q + m_o > 0 else self.r0
            hits = _label_hits(d, words)
            # coverage smoothed by one occurrence: a node specific to the query's texts that misses its
            # span still answers a little, so search can pass through it to a child that covers the span
            score = (float(cov) + 1.0 / (self.n_occ + 1)) * math.log(max(precision, 1e-12) / self.r0) \
                + label_weight * hits
            rows.append({"node": n, "score": score, "label": d.get("label", n), "freq": freq,
                         "query_rate": float(rate), "coverage": float(cov), "precision": float(precision),
                         "label_hits": hits})
        cols = ["node", "score", "label", "freq", "query_rate", "coverage", "precision", "label_hits"]
        df = pd.DataFrame(rows, columns=cols)
        return df.sort_values(["score", "coverage"], ascending=False, kind="stable").reset_index(drop=True)


def concept_query(tree, phrase: str, *, n_contexts: int = 50, background=None, n_background: int = 300,
                  model=None, layer: int | None = None, seed: int = 0,
                  context_weight: float = CONTEXT_WEIGHT) -> ConceptQuery:
    """A `ConceptQuery` for `phrase`: up to `n_contexts` corpus texts containing it (as a whole word), and a
    background of `n_background` corpus texts without it, run through the tree's model once.

    Parameters
    ----------
    tree : FeatureTree
    phrase : str
    n_contexts : int
        Query contexts sampled (seeded) from the corpus texts containing the phrase.
    background : Sample or list of str, optional
        Texts the query is compared with (default: drawn from the corpus). A Sample is reused as it is;
        texts containing the phrase are dropped from a list.
    n_background : int
    model, layer : optional
        Default: the tree's config.
    seed : int
    context_weight : float
        See `ConceptQuery`.

    Example:
        >>> cq = concept_query(tree, "anthrax")  # doctest: +SKIP
        >>> cq.n_query_docs, cq.n_occ  # doctest: +SKIP
        (29, 31)
    """
    import numpy as np

    from featuretree.firing import tree_model

    phrase = phrase.strip()
    if not phrase:
        raise FeatureTreeError("the query is empty: give a word or phrase")
    model = tree_model(tree, model)  # loaded once for the query and the background
    corpus = _readable_corpus(tree.config.corpus) if tree.config is not None else []
    pattern, hits = _phrase_hits(corpus, phrase)
    rng = np.random.default_rng(seed)
    found = [hits[i] for i in np.sort(rng.choice(len(hits), size=min(n_contexts, len(hits)), replace=False))] \
        if hits and n_contexts > 0 else [phrase]
    if not isinstance(background, Sample):
        if background is None:
            background = [t for t in background_texts(tree, n_background + 50, seed=seed) if not pattern.search(t)]
            background = background[:n_background]
        else:
            background = [t for t in background if isinstance(t, str) and not pattern.search(t)]
        if not background:
            raise FeatureTreeError("concept scoring needs background texts and this tree has no corpus to draw them "
                                   "from: pass background=[...] (texts on other topics) or level='token'")
        background = sample_texts(tree, background, model=model, layer=layer)
    log.info("concept query %r: %d of %d corpus texts contain it; %d sampled, %d background texts", phrase,
             len(hits), len(corpus), len(found), len(background.texts))
    query = sample_texts(tree, found, model=model, layer=layer)
    return ConceptQuery(phrase, query, background, pattern, len(hits) or 1,
                        len(corpus) or len(background.texts) + len(found), context_weight)


def _label_hits(d: dict, words) -> float:
    """Query words in a node's label, top tokens, top words or distinctive words (weighted when a dict)."""
    text = " ".join([str(d.get("label", "")), *map(str, d.get("top_tokens") or []),
                     *map(str, d.get("top_words") or []), *map(str, d.get("words") or [])])
    found = set(_WORD.findall(text.lower()))
    return float(sum(words.get(w, 0.0) for w in found)) if isinstance(words, dict) else float(len(words & found))


def _children(tree, n: str) -> list[str]:
    from featuretree.tree import ROOT

    if n == ROOT:  # the top-level features, and the novel ones no narrower feature covers
        return list(dict.fromkeys([*tree.roots(), *tree.novel_features()]))
    return [c for c in tree.graph.successors(n) if not tree.graph.nodes[c].get("virtual")]


SEARCH_REFINE = RefineConfig(min_tokens=300)
"""How search refines a node none of whose children answers: depth 1, and regions from 300 tokens (a query's
branch narrows fast, so leaves are smaller than the nodes one refines by hand)."""


def search(tree, query, config: RefineConfig | None = None, *, start: str | None = None, max_depth: int = 6,
           negatives=None, refine_leaves: bool = True, texts=None, model=None, layer: int | None = None,
           level: str = "auto", label_weight: float = 0.5, background=None, n_contexts: int = 50,
           progress: bool = True, min_lift: float | None = None, **overrides) -> pd.DataFrame:
    """Targeted depth-first search: from the top, step to the child that answers `query` best, refining leaves.

    A word or phrase is scored as a concept (`ConceptQuery`, the default): each candidate by how many of the
    query's occurrences it fires on (all their subword tokens) times how specific its firing is to the
    query's texts and texts near them in meaning, so a feature of a shared subword ("ant" in ants and
    anthrax) loses to one about the query's topic. Several example texts are scored by document, as `find`
    does. At each step the children of the current node (the tree's top-level features first, or `start`'s
    children) with a positive score whose branch leads above the current node's own score are candidates,
    and the one whose branch leads to the best score (through such nodes) is taken: a broad ancestor of a
    very specific feature wins over a sibling that only scores well itself. A node none of whose children
    does better (a leaf, or one whose ladder children miss the query) is refined (depth 1) when
    `refine_leaves`, on a region that holds the query's contexts first, so the search goes below the ladder
    only along the branch it follows. Stops after `max_depth` steps, when no child does better, or when a
    leaf has too few tokens to refine. A node whose branch leads further down but whose own firing is not
    about the query (concept precision under e^min_lift times the corpus's: a broad 'cell · cells' on the
    way to 'bacteria') is passed over: the path lists the nodes about the query, coarse to fine, and each
    row's `passed` names the nodes stepped through to reach it.

    Parameters
    ----------
    tree : FeatureTree
    query : str, list of str, or ConceptQuery
        A word or phrase (looked up in the corpus), example texts, or a `concept_query` already made.
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
    level : "auto", "concept", "token" or "document"
        How nodes are scored: "auto" is "concept" for a word or phrase (token level when the tree has no
        corpus to draw a background from and none is given), "document" for example texts.
    label_weight : float
        Added per query word in a node's label or top words.
    background : Sample or list of str, optional
        Concept and document levels: what the query is compared with (default: drawn from the corpus).
    n_contexts : int
        Corpus texts containing a word or phrase that are sampled as its contexts.
    progress : bool
    min_lift : float, optional
        Concept scoring: pass over a node (to the child its branch's best lies under) whose firing is less than
        e^min_lift times as specific to the query's texts as the corpus's; 0 keeps every node. Default MIN_LIFT.

    Returns
    -------
    DataFrame
        The path (step, node, label, score, coverage, precision, query_rate, freq, confidence, n_candidates,
        refined, passed). `confidence` is the chosen child's share of exp(branch score) among the candidates (1: it
        was the only one). `path.attrs["candidates"]` lists every candidate of every step (step, node,
        label, score, reach, coverage, precision, chosen); `path.attrs["tree"]` is the tree with the
        refinements made (take it with `path.attrs.pop("tree")`: pandas deep-copies attrs on every operation
        on the frame, which for a whole tree takes about a second).

    Example (the default run):
        >>> path = search(tree, "anthrax")  # doctest: +SKIP
        >>> path[["node", "label", "confidence"]].values.tolist()[-1]  # doctest: +SKIP
    """
    import numpy as np

    rc = settings(RefineConfig, config if config is not None else SEARCH_REFINE, **overrides)
    lift_floor = MIN_LIFT if min_lift is None else float(min_lift)
    if not lift_floor >= 0:
        raise FeatureTreeError(f"min_lift={min_lift} must be >= 0 (0 keeps every node search steps through)")
    from featuretree.firing import tree_layer, tree_model
    from featuretree.refine import refine
    from featuretree.tree import ROOT

    model = tree_model(tree, model)
    layer = tree_layer(tree, layer)
    prepared = query if isinstance(query, ConceptQuery) else None
    if prepared is not None:  # made by concept_query already (an evaluation reuses it)
        query, level = prepared.phrase, "concept"
    q_texts = _texts(query, "query")
    if level == "auto" and isinstance(query, str):  # concept scoring needs a background: the corpus, or given
        level = "concept" if background is not None or background_texts(tree, 1) else "token"
    resolved = _scoring_level(level, query, q_texts)  # find's rule (and its errors)
    if resolved == "concept":
        cq = prepared or concept_query(tree, query, n_contexts=n_contexts, background=background, model=model,
                                       layer=layer)
        focus, words = cq.query.texts, query_words(q_texts)
        neg = _negative_firing(tree, negatives, model, layer)

        def score(t) -> tuple[pd.DataFrame, dict[str, float]]:
            s = cq.scores(t, words=words, label_weight=label_weight)
            if neg is not None:
                s = _minus_negatives(t, s, neg)
            s = s.set_index("node")
            s.attrs["r0"] = cq.r0
            return s, branch_reach(t, s)
    else:
        focus = None
        if resolved == "document" and background is None:
            background = background_texts(tree, exclude=q_texts) or None

        def score(t) -> tuple[pd.DataFrame, dict[str, float]]:
            s = find(t, query, negatives=negatives, model=model, layer=layer, top=None, level=level,
                     background=background, label_weight=label_weight, n_contexts=n_contexts).set_index("node")
            return s, branch_reach(t, s)

    def row(step: int, node: str, r, confidence: float, n_cand: int) -> dict:
        d = tree.graph.nodes[node]
        def get(c: str, v: float = float("nan")) -> float:
            return float(r[c]) if r is not None and c in r.index else v

        return {"step": step, "node": node, "label": d.get("label", node), "score": get("score"),
                "coverage": get("coverage"), "precision": get("precision"), "query_rate": get("query_rate", 0.0),
                "freq": float(d.get("freq") or 0.0), "confidence": confidence, "n_candidates": n_cand,
                "refined": bool(d.get("refined", False))}

    scores, reach = score(tree)
    rows, cands, current = [], [], ROOT
    if start is not None and start != ROOT:
        tree.node(start)  # an unknown id is a clear error
        rows.append({**row(0, start, scores.loc[start] if start in scores.index else None, float("nan"), 0),
                     "passed": ""})
        current = start
    refined_here: set[str] = set()
    for step in range(len(rows), len(rows) + int(max_depth)):
        kids = _children(tree, current)
        answer = better(current, kids, scores, reach)
        if not answer and refine_leaves and current != ROOT and current not in refined_here:
            # no finer level answers (none, or the ladder's children miss the query): make one where it fires,
            # on a region that holds the query's own contexts first
            refined_here.add(current)
            try:
                tree = refine(tree, current, rc, depth=1, texts=texts, focus=focus, model=model, layer=layer,
                              progress=progress)
            except FeatureTreeError as e:
                log.info("search stops at %s: %s", current, e)
                break
            scores, reach = score(tree)
            kids = _children(tree, current)
            answer = better(current, kids, scores, reach)
        if not answer:
            log.info("search stops at %s: none of its %d children answers %r", current, len(kids), query)
            break
        answer.sort(key=lambda c: (reach[c], scores.at[c, "score"], scores.at[c, "query_rate"]), reverse=True)
        best, passed = answer[0], []
        while lift_floor > 0 and _weak(best, scores, reach, lift_floor):  # not about the query; its branch's best is below
            below = sorted((c for c in answering(_children(tree, best), scores) if reach.get(c) == reach[best]),
                           key=lambda c: scores.at[c, "score"], reverse=True)
            if not below:
                break
            passed.append(best)
            best = below[0]
        r = np.array([reach[c] for c in answer])
        confidence = float(1.0 / np.exp(r - r[0]).sum())
        for c in answer:
            cands.append({"step": step, "node": c, "label": scores.at[c, "label"], "score": float(scores.at[c, "score"]),
                          "reach": float(reach[c]), "coverage": float(scores.get("coverage", pd.Series()).get(c, np.nan)),
                          "precision": float(scores.get("precision", pd.Series()).get(c, np.nan)), "chosen": c == best})
        rows.append({**row(step, best, scores.loc[best], confidence, len(answer)), "passed": " > ".join(passed)})
        current = best
    path = pd.DataFrame(rows, columns=["step", "node", "label", "score", "coverage", "precision", "query_rate", "freq",
                                       "confidence", "n_candidates", "refined", "passed"])
    path.attrs["candidates"] = pd.DataFrame(cands, columns=["step", "node", "label", "score", "reach", "coverage",
                                                            "precision", "chosen"])
    path.attrs["tree"] = tree
    return path


MIN_LIFT = 0.5
"""search passes over a node whose concept precision is under e^MIN_LIFT x the corpus's (the relevance of a token
at random) when its branch's best lies below it: chosen on the tuning half of `featuretree eval search`
(docs/EVAL.md, "Passing over nodes not about the query")."""


def _weak(node: str, scores: pd.DataFrame, reach: dict[str, float], min_lift: float) -> bool:
    """A node search passes over: its branch's best score lies below it and its own firing is less than
    e^min_lift times as specific to the query's texts as the corpus's (concept scores only)."""
    if "precision" not in scores.columns or reach.get(node, -math.inf) <= float(scores.at[node, "score"]):
        return False
    r0 = scores.attrs.get("r0")
    return r0 is not None and math.log(max(float(scores.at[node, "precision"]), 1e-12) / r0) < min_lift


def _negative_firing(tree, negatives, model, layer):
    """Firing on negative example texts, or None when there are none."""
    from featuretree.firing import query_firing

    texts = _texts(negatives, "negatives") if negatives is not None else []
    return query_firing(tree, texts, model=model, layer=layer) if texts else None


def _minus_negatives(tree, s: pd.DataFrame, neg) -> pd.DataFrame:
    """Scores less each node's positive lift on the negatives (its firing there above its usual rate)."""
    rates, eps = neg.token_rates(), 1.0 / max(neg.n_tokens, 1)
    s = s.copy()
    s["score"] -= [max(0.0, lift(rates.get(n, 0.0), f, eps)) for n, f in zip(s["node"], s["freq"])]
    return s.sort_values(["score", "coverage"], ascending=False, kind="stable").reset_index(drop=True)


def better(current: str, kids: list[str], scores: pd.DataFrame, reach: dict[str, float]) -> list[str]:
    """The answering children whose branch leads above `current`'s own score: where search may step down
    (at the top, every answering top-level feature)."""
    from featuretree.tree import ROOT

    floor = float(scores.at[current, "score"]) if current != ROOT and current in scores.index else -math.inf
    return [c for c in answering(kids, scores) if reach[c] > floor]


def answering(nodes: list[str], scores: pd.DataFrame) -> list[str]:
    """The nodes that answer the query: score > 0, and (token and document levels) firing on it at all;
    concept scores (which have a precision column) count a node specific to the query's texts that misses
    its span."""
    concept = "precision" in scores.columns
    return [c for c in nodes if c in scores.index and scores.at[c, "score"] > 0
            and (concept or scores.at[c, "query_rate"] > 0)]


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


