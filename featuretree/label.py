"""Model-free labels: each feature's top tokens, top contexts (firing token marked) and distinctive words.

Top tokens are ranked by summed activation over held-out tokens; contexts are the strongest firings,
shown as the surrounding text with the firing token in «guillemets»; distinctive words are TF-IDF terms
of a feature's contexts against all features' contexts (scikit-learn), which names what sets it apart.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import pandas as pd

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


def _clean_token(tok: str) -> str:
    return tok.replace("##", "").replace("Ġ", " ").replace("▁", " ").strip() or tok


def feature_table(values: np.ndarray, indices: np.ndarray) -> pd.DataFrame:
    """Long table of firings: one row per (token row, feature) with value > 0.

    Example:
        >>> feature_table(np.array([[2.0, 0.0]]), np.array([[5, 1]])).to_dict("list")
        {'row': [0], 'feature': [5], 'value': [2.0]}
    """
    n, k = indices.shape
    on = values.reshape(-1) > 0
    return pd.DataFrame({"row": np.repeat(np.arange(n), k)[on], "feature": indices.reshape(-1)[on],
                         "value": values.reshape(-1)[on]})


def distinctive_words(docs: dict[str, str], n_words: int = 4) -> dict[str, list[str]]:
    """TF-IDF top words of each document against the others (one document per feature).

    Example:
        >>> d = distinctive_words({"a": "dog dog cat", "b": "cat cat fish fish", "c": "cat"}, 1)
        >>> d["a"], d["b"]
        (['dog'], ['fish'])
    """
    from sklearn.feature_extraction.text import TfidfVectorizer

    keys = [k for k, v in docs.items() if v.strip()]
    if len(keys) < 2:
        return {k: [] for k in docs}
    vec = TfidfVectorizer(stop_words="english", token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z-]{2,}\b", sublinear_tf=True,
                          max_df=0.5)
    try:
        m = vec.fit_transform([docs[k] for k in keys]).tocsr()
    except ValueError:  # every word was a stop word or too common
        return {k: [] for k in docs}
    vocab = np.asarray(vec.get_feature_names_out())
    out = {k: [] for k in docs}
    for r, key in enumerate(keys):
        row = m.getrow(r)
        top = np.argsort(-row.data, kind="stable")[:n_words]
        out[key] = vocab[row.indices[top]].tolist()
    return out


def annotate(tree, codes: dict, tokens: pd.DataFrame, acts, *, n_contexts: int = 5, n_tokens: int = 5) -> None:
    """Fill each node's `top_tokens`, `top_contexts`, `words` and `label` from held-out firings (in place).

    `codes` maps rung -> (values (n, k), indices (n, k)) for the rows of `tokens` (columns token_id,
    doc_id, start, end); `acts` supplies `texts()` and `token_strings()`.

    Example:
        >>> annotate(tree, codes, acts.tokens("heldout"), acts)  # doctest: +SKIP
    """
    g = tree.graph
    texts = acts.texts()
    token_ids = tokens["token_id"].to_numpy()
    doc_ids, starts, ends = (tokens[c].to_numpy() for c in ("doc_id", "start", "end"))
    for rung, (values, indices) in codes.items():
        ft = feature_table(values, indices)
        if ft.empty:
            continue
        ft["token"] = token_ids[ft["row"].to_numpy()]
        # top tokens by summed activation
        tok = ft.groupby(["feature", "token"], sort=False)["value"].sum().reset_index()
        tok = tok.sort_values(["feature", "value"], ascending=[True, False], kind="stable")
        top_tok = tok.groupby("feature", sort=False).head(n_tokens)
        strings = dict(zip(top_tok["token"].tolist(), acts.token_strings(top_tok["token"].tolist())))
        tokens_of = {f: [_clean_token(strings[t]) for t in grp["token"]] for f, grp in top_tok.groupby("feature")}
        # strongest firings -> contexts; up to 40 per feature feed the distinctive-word TF-IDF
        ft = ft.sort_values(["feature", "value"], ascending=[True, False], kind="stable")
        best = ft.groupby("feature", sort=False).head(40)
        ctx_of: dict[int, list[str]] = {}
        words_docs: dict[str, str] = {}
        for f, grp in best.groupby("feature", sort=False):
            rows = grp["row"].to_numpy()
            ctxs = [context(texts.get(int(doc_ids[r]), ""), int(starts[r]), int(ends[r])) for r in rows]
            ctx_of[int(f)] = [c for c in ctxs if c][:n_contexts]
            words_docs[f"{rung}/{int(f)}"] = " ".join(ctxs).replace("«", " ").replace("»", " ")
        words = distinctive_words(words_docs)
        for f in tokens_of:
            nid = f"{rung}/{int(f)}"
            if nid not in g:
                continue
            node = g.nodes[nid]
            node["top_tokens"] = tokens_of[f]
            node["top_contexts"] = ctx_of.get(int(f), [])
            node["words"] = words.get(nid, [])
            node["label"] = make_label(tokens_of[f], node["words"])
    log.info("labelled %d nodes", g.number_of_nodes())


def make_label(top_tokens: list[str], words: list[str], n: int = 3) -> str:
    """A short label: the top firing tokens, then distinctive context words not already among them.

    Example:
        >>> make_label(["dog", "dogs", "hound"], ["canine", "dog"])
        'dog · dogs · hound | canine'
    """
    toks = list(dict.fromkeys(t for t in top_tokens if t))[:n]
    extra = [w for w in words if w not in {t.lower() for t in toks}][:2]
    return " · ".join(toks) + (" | " + ", ".join(extra) if extra else "")
