"""Sense splitting on a planted dictionary: features that are the senses' own directions separate them."""

import networkx as nx
import numpy as np
import pandas as pd
import pytest

from featuretree.corpus import Corpus

# a tiny WordNet-shaped corpus: "bank" and "bat" in two senses each, each sense with three texts that use it
SENSES = {
    ("bank", "n1", "noun.object"): ["bank: sloping land beside a river; the bank of the river was muddy",
                                     "bank: the river bank where the fish swim near the water",
                                     "bank: we walked along the grassy bank of the stream"],
    ("bank", "n2", "noun.group"): ["bank: an institution for money; she put her money in the bank",
                                   "bank: the bank lent him money for a loan at interest",
                                   "bank: the bank charged a fee on every deposit and withdrawal"],
    ("bat", "n3", "noun.animal"): ["bat: a flying mammal; the bat flew out of the cave at night",
                                   "bat: a bat hunts insects in the dark using echoes",
                                   "bat: the little bat hung upside down from the roof of the cave"],
    ("bat", "n4", "noun.artifact"): ["bat: a club for hitting a ball; he swung the bat at the ball",
                                     "bat: a cricket bat is made of willow wood",
                                     "bat: she gripped the bat and hit the baseball hard"],
}
EXTRA = {"bank": ("n5", "noun.act"), "bat": ("n6", "noun.act")}  # a third sense each, never used in a gloss


@pytest.fixture(scope="module")
def corpus():
    texts, rows = [], []
    for (word, sid, lex), ts in SENSES.items():
        for t in ts:
            texts.append(t)
            rows.append({"id": sid, "pos": "n", "lexname": lex, "lemmas": [word]})
    for word, (sid, lex) in EXTRA.items():
        texts.append(f"{word}: a sense whose gloss does not use the word")
        rows.append({"id": sid, "pos": "n", "lexname": lex, "lemmas": [word]})
    return Corpus(texts=texts, labels=pd.DataFrame(rows))


def test_sense_words_labels_each_occurrence_in_its_own_gloss(corpus):
    from featuretree.senses import sense_words

    occ = sense_words(corpus)
    assert sorted(occ.word.unique()) == ["bank", "bat"]
    assert occ.groupby("word").sense.nunique().tolist() == [2, 2]  # the unused third sense is dropped
    assert all(corpus.texts[t][a:b].lower() == w for w, t, a, b in zip(occ.word, occ.text, occ.start, occ.end))
    assert (occ.start > corpus.texts[0].index(":")).all()  # never the head "bank:", only the gloss
    assert len(sense_words(corpus, min_noun_senses=4)) == 0


def test_planted_sense_features_separate_and_a_word_feature_does_not(corpus):
    """Rung w4's features are the senses' mean activations at the word (minus the word's mean): each fires on
    one sense, so knn, F1 and AMI are perfect. Rung w3 has one feature per word (fires on all its occurrences):
    F1 equals the always-fire baseline and AMI is 0."""
    import torch

    from featuretree.config import Config
    from featuretree.firing import forward_texts
    from featuretree.sae import TopKSAE
    from featuretree.senses import sense_scores, sense_words
    from featuretree.tree import FeatureTree

    occ = sense_words(corpus)
    probe = FeatureTree(nx.DiGraph(), {}, config=Config())
    x, toks, _ = forward_texts(probe, corpus.texts)
    vec = {}
    for w, s, t, a, b in zip(occ.word, occ.sense, occ.text, occ.start, occ.end):
        rows = toks.index[(toks.doc_id == t) & (toks.start < b) & (toks.end > a)]
        vec.setdefault((w, s), []).append(x[rows].mean(0))
    cent = {k: torch.stack(v).mean(0) for k, v in vec.items()}
    word_mean = {w: torch.stack([c for (w2, _), c in cent.items() if w2 == w]).mean(0) for w in ("bank", "bat")}
    keys = sorted(cent)
    sense_dirs = torch.stack([torch.nn.functional.normalize(cent[k] - word_mean[k[0]], dim=0) for k in keys])
    word_dirs = torch.stack([torch.nn.functional.normalize(word_mean[w], dim=0) for w in ("bank", "bat")])

    def sae(dirs, bias):
        d = TopKSAE(384, len(dirs) + 1, 1)
        with torch.no_grad():
            d.W_enc.zero_()
            d.W_enc[:, :len(dirs)] = dirs.t()
            d.b_enc.copy_(torch.tensor([*bias, -1e4]))
            d.W_dec.copy_(torch.cat([dirs, torch.nn.functional.normalize(torch.ones(1, 384), dim=1)]))
        return d

    g = nx.DiGraph(rungs=["w3", "w5"])
    saes = {"w3": sae(word_dirs, [0.0, 0.0]), "w5": sae(sense_dirs, [0.0] * 4)}
    for r, s_ in saes.items():
        for j in range(s_.width):
            g.add_node(f"{r}/{j}", rung=r, width=s_.width, index=j, fire_at=1e-6, label=f"{r}-{j}")
    tree = FeatureTree(g, saes, config=Config())
    sc = sense_scores(tree, corpus, occ, progress=False).set_index(["rung", "word"])
    sense_rung, word_rung = sc.loc["w5"], sc.loc["w3"]
    assert (sense_rung.knn == 1.0).all() and (sense_rung.f1 == 1.0).all() and (sense_rung.ami > 0.99).all()
    assert np.allclose(word_rung.f1, word_rung.f1_base) and (word_rung.ami.abs() < 1e-9).all()
    assert (sc.loc["raw"].knn >= 0.8).all()  # MiniLM layer 3 itself mostly tells them apart (bat: 5 of 6)
    assert sense_rung.chance.tolist() == pytest.approx([2 / 5, 2 / 5])  # a random other occurrence: 2 of 5 share the sense
