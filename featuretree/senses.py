"""senses: how well a tree's features separate the senses of polysemous words (WordNet), rung by rung.

WordNet gives each noun its senses and the bundled corpus has one text per synset ("park, parkland: a large
area of land ...; "there are laws that protect the wildlife in this park""). An occurrence of a lemma in
the gloss or example of one of its own synsets (after the head's ':', so a causal model has read the
sense's definition first only where the text gives it) is labelled with that synset. For each chosen word,
per rung, the features firing on the occurrence's tokens (any of its subword pieces) are compared with the
senses:

    knn       leave-one-out 1-nearest-neighbour accuracy of the sense from the occurrence's feature
              activations (cosine); rung "raw" does the same from the layer's activations themselves (what
              the layer holds, for any dictionary), and chance is a random neighbour's accuracy;
    f1        per sense, the best one-vs-rest F1 of a single feature (fires on the occurrence = predicts
              the sense; only features firing on two or more of the word's occurrences, so a feature that
              happens to fire once is not a "sense feature"), averaged over the word's senses, then words
              (chosen on the same occurrences it is scored on: an upper bound);
    f1_base   the same for a feature that fires on every occurrence of the word (a pure "word" feature):
              2p / (1 + p) for a sense holding share p. f1 - f1_base is what sense-specific features add;
    ami       adjusted mutual information between the occurrence's top feature (largest summed activation
              over its pieces; "none" when nothing fires) and its sense (0: chance, 1: the top feature names
              the sense).

`sense_words` picks the words; `sense_scores` scores one tree; `featuretree eval senses RUN [RUN ...]`
prints the table by layer for runs of several layers (docs/EVAL.md).
"""

from __future__ import annotations

import logging
import re
import zlib
from collections import defaultdict

import numpy as np
import pandas as pd

from featuretree.config import FeatureTreeError

__all__ = ["sense_examples", "sense_scores", "sense_words"]

log = logging.getLogger(__name__)


def _body_start(text: str) -> int:
    """Where a WordNet text's gloss begins: after the head "lemma, lemma: " (0 when there is no head)."""
    i = text.find(": ")
    return i + 2 if i >= 0 else 0


def sense_words(corpus, *, n: int = 150, min_noun_senses: int = 3, min_senses: int = 2, min_occurrences: int = 2,
                seed: int = 0) -> pd.DataFrame:
    """Polysemous nouns with sense-labelled occurrences in the bundled WordNet corpus.

    A word qualifies when it has at least `min_noun_senses` noun synsets, and at least `min_senses` of them use
    it `min_occurrences` times or more in their own glosses and examples (only those senses' occurrences are
    kept: a sense seen once cannot be told apart from chance). Words are taken in an order fixed by a hash of
    the word and `seed` (a spread over the whole list, not the most frequent first).

    Parameters
    ----------
    corpus : Corpus
        `load_corpus("wordnet")` (its labels: id, pos, lemmas, lexname).
    n : int
        Words returned at most.
    min_noun_senses : int
        Noun synsets a word needs (its polysemy).
    min_senses : int
        Senses with enough occurrences a word needs.
    min_occurrences : int
        Occurrences a sense needs to count.
    seed : int

    Returns a DataFrame, one row per occurrence: word, text (index into corpus.texts), sense (synset id),
    lexname, start, end (the occurrence's characters in the text).

    Example:
        >>> from featuretree.corpus import load_corpus
        >>> occ = sense_words(load_corpus("wordnet"), n=5)
        >>> occ.word.nunique(), int(occ.groupby(["word", "sense"]).size().min()) >= 2
        (5, True)
    """
    labels = corpus.labels
    if labels is None or not {"id", "pos", "lemmas", "lexname"} <= set(labels.columns):
        raise FeatureTreeError("sense evaluation needs the WordNet corpus (load_corpus('wordnet')): its labels name "
                               "each text's synset and lemmas")
    if len(labels) != len(corpus.texts):
        raise FeatureTreeError("the corpus labels do not line up with its texts: load it with load_corpus('wordnet')")
    ids, lexnames, lemma_lists = (labels[c].to_numpy() for c in ("id", "lexname", "lemmas"))
    senses: dict[str, list[int]] = defaultdict(list)
    for i in np.flatnonzero(labels["pos"].to_numpy() == "n"):
        for lemma in lemma_lists[i]:
            if lemma.isalpha() and lemma.islower():
                senses[lemma].append(int(i))
    rows = []
    for word in sorted(senses, key=lambda w: (zlib.crc32(f"{seed}:{w}".encode()), w)):
        if len({ids[i] for i in senses[word]}) < min_noun_senses:
            continue
        pat = re.compile(rf"(?<![\w-]){re.escape(word)}(?![\w-])", re.IGNORECASE)
        found = []
        for i in senses[word]:
            text = corpus.texts[i]
            b = _body_start(text)
            found += [{"word": word, "text": i, "sense": ids[i], "lexname": lexnames[i], "start": m.start() + b,
                       "end": m.end() + b}
                      for m in pat.finditer(text[b:])]
        per = pd.Series([f["sense"] for f in found], dtype=object).value_counts()
        keep = set(per.index[per >= min_occurrences])
        if len(keep) >= min_senses:
            rows += [f for f in found if f["sense"] in keep]
            if len({r["word"] for r in rows}) >= n:
                break
    return pd.DataFrame(rows, columns=["word", "text", "sense", "lexname", "start", "end"])


def _occurrence_codes(tree, corpus, occ: pd.DataFrame, rungs: list[str], model, layer):
    """Per rung, a (n_occurrences, width) matrix of summed firing activation over each occurrence's tokens."""
    import scipy.sparse as sp

    from featuretree.firing import encode_all, fire_rungs, forward_texts

    text_ids = sorted(occ["text"].unique())
    local = {t: k for k, t in enumerate(text_ids)}
    x, toks, _ = forward_texts(tree, [corpus.texts[t] for t in text_ids], model=model, layer=layer)
    by_doc: dict[int, np.ndarray] = {d: g.index.to_numpy() for d, g in toks.groupby("doc_id")}
    starts, ends = toks["start"].to_numpy(), toks["end"].to_numpy()
    rows, cols = [], []
    for o, (t, a, b) in enumerate(zip(occ["text"], occ["start"], occ["end"])):
        cand = by_doc.get(local[int(t)], np.zeros(0, np.int64))
        hit = cand[(starts[cand] < b) & (ends[cand] > a)]
        rows += [o] * len(hit)
        cols += hit.tolist()
    pieces = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(len(occ), len(toks)))
    F = fire_rungs(tree, x, rungs)
    n_pieces = np.maximum(np.asarray(pieces.sum(1)).ravel(), 1)[:, None]
    out = {"raw": pieces @ x.numpy().astype(np.float32) / n_pieces}  # the layer itself: mean over the pieces
    for r in rungs:
        sae = tree.saes[r]
        v, i = encode_all(sae, iter([x[s:s + 4096] for s in range(0, len(x), 4096)]))
        dense_rows = np.repeat(np.arange(len(x)), i.shape[1])
        A = sp.csr_matrix((np.maximum(v.reshape(-1), 0), (dense_rows, i.reshape(-1))), shape=(len(x), sae.width))
        A = A.multiply(F[r] > 0).tocsr()  # activation where the feature fires by the tree's rule
        out[r] = (pieces @ A).tocsr()
    return out


def _knn(V: np.ndarray, senses: np.ndarray) -> float:
    """Leave-one-out 1-nearest-neighbour accuracy of the senses by cosine between occurrence vectors."""
    V = V / np.maximum(np.linalg.norm(V, axis=1, keepdims=True), 1e-12)
    S = V @ V.T
    np.fill_diagonal(S, -np.inf)
    return float(np.mean(senses[np.argmax(S, axis=1)] == senses))


def _word_scores(codes, senses: np.ndarray) -> dict:
    """One word's scores on one rung: knn, chance, f1, f1_base, ami, and per sense its best feature."""
    from sklearn.metrics import adjusted_mutual_info_score

    B = (codes > 0).astype(np.float32).tocsc()  # (occ, width)
    n = len(senses)
    word_feature = np.asarray(B.sum(0)).ravel() >= 2  # features that fire on at least two of the occurrences
    f1s, bases, best = [], [], []
    for s in np.unique(senses):
        y = senses == s
        tp = np.asarray(B[y].sum(0)).ravel()
        fp = np.asarray(B[~y].sum(0)).ravel()
        f1 = np.where(word_feature, 2 * tp / np.maximum(2 * tp + fp + (y.sum() - tp), 1), 0.0)
        j = int(np.argmax(f1))
        f1s.append(float(f1[j]))
        bases.append(2 * y.sum() / (y.sum() + n))
        best.append((str(s), j, float(f1[j]), int(tp[j]), int(fp[j])))
    top = np.asarray(codes.argmax(1)).ravel()
    top[np.asarray(codes.max(1).todense()).ravel() <= 0] = -1  # nothing fires: its own class
    _, n_s = np.unique(senses, return_counts=True)
    return {"knn": _knn(codes.toarray(), senses), "chance": float((n_s * (n_s - 1)).sum() / (n * (n - 1))),
            "f1": float(np.mean(f1s)), "f1_base": float(np.mean(bases)),
            "ami": float(adjusted_mutual_info_score(senses, top)), "best": best}


def sense_scores(tree, corpus, occ: pd.DataFrame, *, rungs: list[str] | None = None, model=None,
                 layer: int | None = None, progress: bool = True) -> pd.DataFrame:
    """Per word and rung: how well single features separate the word's senses (module docstring).

    Parameters
    ----------
    tree : FeatureTree
        A tree built on the WordNet corpus (any model and layer).
    corpus : Corpus
        `load_corpus("wordnet")`.
    occ : DataFrame
        The occurrences, from `sense_words`.
    rungs : list of str, optional
        The rungs to score (default: the ladder's, refined rungs left out).
    model, layer : optional
        Default: the tree's model and layer.
    progress : bool

    Returns a DataFrame: word, rung, n_occurrences, n_senses, knn, chance, f1, f1_base, gain (f1 - f1_base),
    ami, best (per sense: (synset, feature index, F1, occurrences of the sense it fires on, of other senses)).
    Rung "raw" holds the layer's own activations (knn only): what any dictionary of that layer could reach.

    Example:
        >>> from featuretree.corpus import load_corpus
        >>> c = load_corpus("wordnet")
        >>> s = sense_scores(tree, c, sense_words(c, n=50))  # doctest: +SKIP
        >>> s.groupby("rung")[["f1", "f1_base", "ami"]].mean()  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    if len(occ) == 0:
        raise FeatureTreeError("no sense-labelled occurrences: pass sense_words(load_corpus('wordnet'))")
    rungs = list(rungs) if rungs is not None else [r for r in tree.rungs if "/" not in r]
    codes = _occurrence_codes(tree, corpus, occ.reset_index(drop=True), rungs, model, layer)
    out = []
    groups = list(occ.reset_index(drop=True).groupby("word", sort=False).indices.items())
    all_senses = occ["sense"].to_numpy()
    for word, idx in groups:
        out.append({"word": word, "rung": "raw", "n_occurrences": len(idx),
                    "n_senses": len(np.unique(all_senses[idx])), "knn": _knn(codes["raw"][idx], all_senses[idx])})
    for r in tqdm(rungs, desc="sense scores", unit="rung", disable=not progress):
        for word, idx in groups:
            senses = all_senses[idx]
            sc = _word_scores(codes[r][idx], senses)
            out.append({"word": word, "rung": r, "n_occurrences": len(idx), "n_senses": len(np.unique(senses)),
                        **sc, "gain": sc["f1"] - sc["f1_base"]})
    cols = ["word", "rung", "n_occurrences", "n_senses", "knn", "chance", "f1", "f1_base", "gain", "ami", "best"]
    return pd.DataFrame(out).reindex(columns=cols)


def sense_examples(tree, scores: pd.DataFrame, corpus, *, n: int = 5, min_f1: float = 0.8) -> pd.DataFrame:
    """The words whose senses the tree separates best: per word, its best rung and each sense's feature.

    Parameters
    ----------
    tree : FeatureTree
    scores : DataFrame
        `sense_scores(...)`.
    corpus : Corpus
        For the senses' glosses.
    n : int
        Words returned.
    min_f1 : float
        A sense counts as separated when one feature fires on two or more of its occurrences and on no other
        sense's, with at least this F1, and differs from the feature of the word's other separated senses.

    Returns a DataFrame: word, rung, gain, separated (count), senses ("gloss -> node 'label' (F1)" lines).

    Example:
        >>> sense_examples(tree, scores, corpus).head()  # doctest: +SKIP
    """
    labels = corpus.labels
    gloss = dict(zip(labels["id"], corpus.texts))
    rows = []
    best_rung = scores[scores.rung != "raw"].sort_values("gain", ascending=False).drop_duplicates("word")
    for r in best_rung.itertuples():
        seen, lines = set(), []
        for sense, j, f1, tp, fp in r.best:
            node = f"{r.rung}/{j}"
            if f1 >= min_f1 and tp >= 2 and fp == 0 and j not in seen:
                seen.add(j)
                head = gloss.get(sense, sense)
                short = head[_body_start(head):][:60]
                lines.append(f"{short!r} -> {node} '{tree.graph.nodes[node].get('label', '') if node in tree.graph else ''}'"
                             f" ({f1:.2f})")
        rows.append({"word": r.word, "rung": r.rung, "gain": r.gain, "separated": len(seen), "senses": lines})
    df = pd.DataFrame(rows, columns=["word", "rung", "gain", "separated", "senses"])
    return df.sort_values(["separated", "gain"], ascending=False).head(n).reset_index(drop=True)
