"""Labels say what fires (one token, a subword piece, a topic) and are scored on contexts no label saw.

Every test builds a planted store on disk: documents of known tokens (WordPiece "##" pieces joined to the
token before), one activation dimension per planted feature, and an identity dictionary, so each feature
fires exactly where it was planted.
"""

import json
import random

import networkx as nx
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from featuretree.activations import Activations
from featuretree.firing import fire
from featuretree.label import SCORE_EVERY, OverlapScorer, annotate, score_labels
from featuretree.sae import TopKSAE
from featuretree.tree import FeatureTree, add_virtual_root

ANIMALS = ["cat", "dog", "horse", "cow", "sheep", "goat"]
FILLER = ["the", "a", "big", "small", "one", "saw", "near", "house", "river", "and", "then", "left", "today"]


def _store(path, docs, planted, width):
    """Write a store of `docs` (lists of tokens; "##x" continues the word before): row activation =
    2 x the sum of the unit vectors of the features `planted(doc_index, token_index, tokens)` returns."""
    vocab, ids = [], {}
    cols = {k: [] for k in ("token_ids", "doc_ids", "positions", "starts", "ends")}
    rows, texts = [], []
    gen = torch.Generator().manual_seed(0)
    for d, toks in enumerate(docs):
        text = ""
        for i, t in enumerate(toks):
            piece = t.startswith("##")
            if text and not piece:
                text += " "
            s = len(text)
            text += t[2:] if piece else t
            if t not in ids:
                ids[t] = len(vocab)
                vocab.append(t)
            for k, v in zip(cols, (ids[t], d, i, s, len(text))):
                cols[k].append(v)
            x = torch.zeros(width)
            for f in planted(d, i, toks):
                x[f] += 2.0
            rows.append(x + 0.01 * torch.randn(width, generator=gen))
        texts.append(text)
    path.mkdir(parents=True)
    save_file({"acts": torch.stack(rows), **{k: torch.tensor(v, dtype=torch.int64) for k, v in cols.items()}},
              str(path / "shard_00000.safetensors"))
    with open(path / "docs.jsonl", "w", encoding="utf-8") as f:
        for d, text in enumerate(texts):
            f.write(json.dumps({"doc_id": d, "text": text}) + "\n")
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "meta.json").write_text(json.dumps({"d_model": width, "n_tokens": len(rows), "heldout_every": 10,
                                                "shards": ["shard_00000.safetensors"], "shard_sizes": [len(rows)]}))
    return Activations(path)


def _tree(width, k=2):
    sae = TopKSAE(width, width, k)
    with torch.no_grad():  # feature j reads dimension j
        sae.W_enc.copy_(torch.eye(width))
        sae.W_dec.copy_(torch.eye(width))
    g = nx.DiGraph()
    for j in range(width):
        g.add_node(f"w{width}/{j}", rung=f"w{width}", width=width, index=j, fire_at=1.0, freq=0.1, label=str(j))
    add_virtual_root(g, f"w{width}")
    return FeatureTree(g, {f"w{width}": sae})


def _label(tree, acts):
    x, tok = acts.load("all"), acts.tokens("all")
    (rung,) = tree.saes
    v, i, _ = fire(tree.saes[rung], x, at=np.ones(tree.saes[rung].width))
    annotate(tree, {rung: (v, i)}, tok, acts)
    return tree.graph.nodes


def _corpus(n=300, seed=0):
    """Documents with "of" (after "number" in most), the piece "##hra" (only in anthrax), "##emia" (in
    several words), animals (a topic) and filler; feature 0 = of, 1 = ##hra, 2 = ##emia, 3 = animals."""
    rng = random.Random(seed)
    docs = []
    for d in range(n):
        toks = [rng.choice(FILLER) for _ in range(3)]
        toks += ["number", "of"] if rng.random() < 0.8 else ["kind", "of"]
        toks += [rng.choice(FILLER), rng.choice(ANIMALS), rng.choice(FILLER)]
        if d % 3 == 0:
            toks += ["the", "ant", "##hra", "##x", "spores"]
        if d % 3 == 1:
            toks += rng.choice([["an", "##emia"], ["leuk", "##emia"], ["sept", "##ic", "##emia"], ["ur", "##emia"],
                                ["hyp", "##ox", "##emia"], ["isch", "##emia"], ["tox", "##emia"]])
        docs.append(toks + [rng.choice(FILLER)])

    def planted(d, i, toks):
        t = toks[i]
        return [f for f, hit in ((0, t == "of"), (1, t == "##hra"), (2, t == "##emia"), (3, t in ANIMALS)) if hit]
    return docs, planted


def test_a_feature_firing_on_one_token_is_labelled_by_it_with_its_context(tmp_path):
    docs, planted = _corpus()
    nodes = _label(_tree(4), _store(tmp_path / "acts", docs, planted, 4))
    of = nodes["w4/0"]
    assert of["label"] == "«of» after «number»" and of["label_kind"] == "word"  # a function word that IS the feature
    assert of["top_tokens"][0] == "of" and of["top_words"][0] == "of"


def test_subword_pieces_read_as_the_words_they_are_part_of(tmp_path):
    docs, planted = _corpus()
    nodes = _label(_tree(4), _store(tmp_path / "acts", docs, planted, 4))
    hra = nodes["w4/1"]
    assert hra["label"].startswith("«anthrax»") and "hra" not in hra["label"].replace("anthrax", "")
    assert hra["top_tokens"][0] == "hra"  # the token itself stays in top_tokens
    assert any("ant«hra»x" in c for c in hra["top_contexts"])
    emia = nodes["w4/2"]  # one piece in many words: the piece, then the words
    assert emia["label_kind"] == "piece" and emia["label"].startswith("«-emia» in ")
    assert set(emia["label"].split(" in ", 1)[1].split(" | ")[0].split(" · ")) <= {
        "anemia", "leukemia", "septicemia", "uremia", "hypoxemia", "ischemia", "toxemia"}


def test_topical_features_are_labelled_by_content_words(tmp_path):
    docs, planted = _corpus()
    rng = random.Random(1)
    base = planted

    def planted_topic(d, i, toks):  # the animal feature also fires on a third of the filler words next to them
        near = toks[i] in FILLER and any(t in ANIMALS for t in toks[max(0, i - 1):i + 2]) and rng.random() < 0.3
        return base(d, i, toks) + ([3] if near else [])
    nodes = _label(_tree(4), _store(tmp_path / "acts", docs, planted_topic, 4))
    topic = nodes["w4/3"]
    assert topic["label_kind"] == "topic"
    head = topic["label"].split(" | ")[0].split(" · ")
    assert len(head) == 3 and set(head) <= set(ANIMALS)  # no "the", "a", "and" though they fire too


def test_annotate_leaves_the_score_documents_out(tmp_path):
    docs, planted = _corpus()
    for d in range(SCORE_EVERY // 2, len(docs), SCORE_EVERY):
        docs[d] = docs[d] + ["zebra"]  # only score documents have a zebra
    base = planted
    acts = _store(tmp_path / "acts", docs, lambda d, i, toks: base(d, i, toks) + ([4] if toks[i] == "zebra" else []), 5)
    tree = _tree(5)
    nodes = _label(tree, acts)
    assert nodes["w5/4"]["label"] == "4" and "top_tokens" not in nodes["w5/4"]  # no label saw a zebra
    assert nodes["w5/0"]["label"] == "«of» after «number»"
    assert score_labels(tree, acts, scorer="overlap", nodes=["w5/4"]).n.tolist() == [20]  # but scores see them


def _cat_store(tmp_path):
    """Half the documents mention a cat (feature 0 fires on it), the others a dog (feature 1 fires on it)."""
    rng = random.Random(0)
    docs = []
    for d in range(400):
        animal = "cat" if (d // SCORE_EVERY) % 2 else "dog"  # score documents of both kinds
        docs.append([rng.choice(FILLER) for _ in range(4)] + [animal] + [rng.choice(FILLER) for _ in range(4)])
    return _store(tmp_path / "acts", docs, lambda d, i, toks: [0] if toks[i] == "cat" else [1] if toks[i] == "dog"
                  else [], 3)


def _scores(tree, acts, scorer, labels):
    for n, lab in labels.items():
        tree.graph.nodes[n]["label"] = lab
    return score_labels(tree, acts, scorer=scorer, nodes=list(labels)).set_index("node")


def test_a_label_naming_the_firing_contexts_beats_a_wrong_one_without_a_model(tmp_path, monkeypatch):
    import featuretree.model

    monkeypatch.setattr(featuretree.model, "load_model", lambda *a, **k: pytest.fail("the overlap scorer loads no model"))
    acts, tree = _cat_store(tmp_path), _tree(3, k=1)
    right = _scores(tree, acts, "overlap", {"w3/0": "«cat»", "w3/1": "«dog»"})
    wrong = _scores(tree, acts, "overlap", {"w3/0": "«dog»", "w3/1": "«cat»"})  # the labels swapped
    for n in ("w3/0", "w3/1"):
        assert right.at[n, "n"] == 20 and right.at[n, "n_negative"] == 20
        assert right.at[n, "label_score"] == pytest.approx(1.0) and right.at[n, "detection"] == 1.0
        assert wrong.at[n, "label_score"] < 0.2 and wrong.at[n, "detection"] < 0.5
        assert 0.0 <= wrong.at[n, "label_score"] <= 1.0
    node = tree.graph.nodes["w3/0"]  # the last scores are stored on the nodes
    assert node["label_score"] == wrong.at["w3/0", "label_score"] and "label_detection" in node and "label_fuzzing" in node
    # a scorer is any callable (labels, texts) -> scores; one that knows nothing scores 0
    blind = _scores(tree, acts, lambda labels, texts: np.zeros(len(labels)), {"w3/0": "«cat»"})
    assert blind.at["w3/0", "label_score"] == 0.0 and blind.at["w3/0", "detection"] == 0.5
    # the contexts are held out: only score documents, and the same seed gives the same ones
    seen = []
    score_labels(tree, acts, scorer=lambda labels, texts: seen.extend(texts) or np.zeros(len(labels)), nodes=["w3/0"])
    texts = acts.texts()
    score_docs = [t for d, t in texts.items() if d % SCORE_EVERY == SCORE_EVERY // 2]
    contexts = [t for t in seen if " " in t]
    assert contexts and all(any(c in t for t in score_docs) for c in contexts)
    with pytest.raises(ValueError, match="scorer"):
        score_labels(tree, acts, scorer="nope")


def test_a_feature_that_never_fires_in_the_score_rows_has_no_score(tmp_path):
    acts, tree = _cat_store(tmp_path), _tree(3, k=1)
    df = score_labels(tree, acts, scorer=OverlapScorer(), nodes=["w3/2"])
    assert df.n.tolist() == [0] and df.label_score.isna().all() and "label_score" not in tree.graph.nodes["w3/2"]


@pytest.mark.slow
def test_the_embedding_scorer_prefers_the_right_label(tmp_path):
    from featuretree.label import EmbeddingScorer

    acts, tree = _cat_store(tmp_path), _tree(3, k=1)
    scorer = EmbeddingScorer()  # the embedded all-MiniLM-L6-v2
    right = _scores(tree, acts, scorer, {"w3/0": "«cat»", "w3/1": "«dog»"})
    wrong = _scores(tree, acts, scorer, {"w3/0": "«dog»", "w3/1": "«cat»"})
    unrelated = _scores(tree, acts, scorer, {"w3/0": "stock prices | market", "w3/1": "stock prices | market"})
    for n in ("w3/0", "w3/1"):
        assert right.at[n, "detection"] > 0.9 and right.at[n, "fuzzing"] == 1.0 and right.at[n, "label_score"] > 0.9
        assert wrong.at[n, "detection"] < 0.5  # "dog" is nearer dog contexts than cat contexts
        for bad in (wrong, unrelated):
            assert 0.0 <= bad.at[n, "label_score"] < right.at[n, "label_score"] - 0.3
