"""Labels: distinctive words name what a child adds to its parent; pluggable labelers, incl. a local causal LM."""

import networkx as nx
import numpy as np
import pytest

from featuretree.label import CausalLMLabeler, family_words, label_tree, labeler_prompt, node_facts
from featuretree.tree import ROOT, FeatureTree, add_virtual_root


def _family_tree():
    g = nx.DiGraph()
    for n, rung, freq, label in [("w2/0", "w2", 0.4, "animal"), ("w2/1", "w2", 0.3, "plant"),
                                 ("w8/0", "w8", 0.1, "dog"), ("w8/1", "w8", 0.1, "cat"), ("w8/2", "w8", 0.05, "odd")]:
        g.add_node(n, rung=rung, freq=freq, label=label, top_tokens=[label], top_contexts=[f"a «{label}» here"])
    g.add_edge("w2/0", "w8/0", coverage=0.9)
    g.add_edge("w2/0", "w8/1", coverage=0.9)
    add_virtual_root(g, "w2")  # w8/2 has no parent: novel
    return FeatureTree(g)


def test_family_words_name_what_the_child_adds():
    docs = {
        "w2/0": ["an animal species", "a mammal kept as a pet animal", "animal species", "a wild animal"],
        "w8/0": ["the dog barked", "a dog puppy in the kennel", "animal species dog", "a dog zebra"],
        "w8/1": ["the cat purr loudly", "a cat kitten", "animal species cat litter", "cat purr"],
        "w2/1": ["a plant leaf", "the flower of a plant", "plant root", "species of plant"],
    }
    parent = {"w2/0": ROOT, "w2/1": ROOT, "w8/0": "w2/0", "w8/1": "w2/0"}
    w = family_words(docs, parent, n_words=3)
    assert w["w8/0"][0] == "dog" and w["w8/1"][:2] == ["cat", "purr"]
    assert not {"animal", "species"} & set(w["w8/0"] + w["w8/1"])  # shared with the parent: not distinctive
    assert "zebra" not in w["w8/0"] and "kennel" not in w["w8/0"]  # in one context only: an accident
    assert w["w2/1"][0] == "plant" and w["w2/0"][0] == "animal"  # top level: against each other


def test_label_tree_with_a_callable_labels_parents_first():
    tree = _family_tree()
    seen = []

    def labeler(f):
        seen.append(f["node"])
        return f"{f['parent_label'] or 'top'} > {f['top_tokens'][0]}"

    assert label_tree(tree, labeler, progress=False) == 5
    g = tree.graph
    assert g.nodes["w8/0"]["label"] == "top > animal > dog"
    assert g.nodes["w8/0"]["auto_label"] == "dog" and g.nodes["w8/2"]["label"] == "top > odd"
    assert seen.index("w2/0") < seen.index("w8/0")
    assert ROOT not in seen
    with pytest.raises(ValueError, match="unknown nodes"):
        label_tree(tree, labeler, nodes=["w9/9"], progress=False)


def test_causal_lm_labeler_with_a_tiny_in_process_model():
    from _models import tiny_gpt2_lm

    words = ("a short name few words for what this feature detects below are text snippets where one of "
             "language model fires on the word in most frequent firing typical these it is more specific "
             "version dog cat animal here none canine").split()
    model, tok = tiny_gpt2_lm(words, says="canine")
    labeler = CausalLMLabeler(model, tok, max_new_tokens=3)
    tree = _family_tree()
    facts = node_facts(tree, "w8/0")
    assert facts["parent_label"] == "animal" and facts["top_contexts"] == ["a «dog» here"]
    prompt = labeler.prompt_for(facts)
    assert "'animal'" in prompt and "Snippets: a «dog» here\nLabel:" in prompt and prompt == labeler_prompt(facts)
    assert labeler(facts) == "canine canine canine"  # the model's greedy continuation, one line
    label_tree(tree, labeler, nodes=["w8/0", "w2/0"], progress=False)
    assert tree.graph.nodes["w8/0"]["label"] == "canine canine canine"
    assert tree.graph.nodes["w8/0"]["auto_label"] == "dog" and tree.graph.nodes["w8/1"]["label"] == "cat"
    with pytest.raises(ValueError, match="cannot generate"):
        CausalLMLabeler(object(), tok)


def test_causal_lm_labeler_from_a_local_directory(tmp_path):
    from _models import tiny_gpt2_lm

    model, tok = tiny_gpt2_lm("dog cat animal".split(), says="cat")
    model.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    labeler = CausalLMLabeler.from_pretrained(str(tmp_path / "lm"), max_new_tokens=3)
    assert labeler(node_facts(_family_tree(), "w8/1")) == "cat cat cat"
    with pytest.raises(ValueError, match="offline"):
        CausalLMLabeler.from_pretrained(str(tmp_path / "missing"))


def test_labels_show_a_piece_as_its_word_or_as_a_piece():
    """Feature 0 fires on "ant" mostly inside "anthrax": labelled "anthrax". Feature 1 fires on "al" across many
    words, none holding most of it: labelled "-al", never a bare fragment."""
    import numpy as np
    import pandas as pd

    from featuretree.label import annotate
    from featuretree.tree import FeatureTree

    texts = {0: "the anthrax spores", 1: "anthrax and ants", 2: "dialectal tonal vocal"}

    class Acts:
        def texts(self):
            return texts

        def token_strings(self, ids):
            return [{7: "ant", 8: "and", 9: "al"}[i] for i in ids]

    tokens = pd.DataFrame({"token_id": [7, 7, 8, 7, 9, 9, 9], "doc_id": [0, 1, 1, 1, 2, 2, 2],
                           "start": [4, 0, 8, 12, 7, 13, 19], "end": [7, 3, 11, 15, 9, 15, 21]})
    values = np.array([[3.0, 0.0], [2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 2.0], [0.0, 2.0], [0.0, 2.0]])
    indices = np.array([[0, 1]] * 7)
    g = nx.DiGraph()
    g.add_node("w2/0", rung="w2", index=0, freq=0.5)
    g.add_node("w2/1", rung="w2", index=1, freq=0.2)
    tree = FeatureTree(g)
    annotate(tree, {"w2": (values, indices)}, tokens, Acts())
    a, b = tree.graph.nodes["w2/0"], tree.graph.nodes["w2/1"]
    assert a["top_tokens"] == ["ant"] and a["top_words"] == ["anthrax"] and a["label"].startswith("anthrax")
    assert b["top_tokens"] == ["al", "and"] and b["top_words"] == ["-al", "and"] and b["label"].startswith("-al · and")


def test_contexts_carry_the_parents_activation_piece_by_piece():
    """A child ("dogs", w4/2) fires on "dog"; its parent ("animals", w2/0) on "dog" and "cat": each of the child's
    shaded contexts carries the parent's activation on the same pieces, from the parent's rung (`codes`) or,
    for a rung not labelled here, from `others`; a top-level feature gets none."""
    import numpy as np
    import pandas as pd

    from featuretree.label import annotate
    from featuretree.tree import FeatureTree

    texts = {0: "a dog and a cat", 1: "the dog ran"}

    class Acts:
        def texts(self):
            return texts

        def token_strings(self, ids):
            return [{1: "a", 2: "dog", 3: "and", 4: "cat", 5: "the", 6: "ran"}[i] for i in ids]

    tokens = pd.DataFrame({"token_id": [1, 2, 3, 1, 4, 5, 2, 6], "doc_id": [0, 0, 0, 0, 0, 1, 1, 1],
                           "start": [0, 2, 6, 10, 12, 0, 4, 8], "end": [1, 5, 9, 11, 15, 3, 7, 11]})
    parent = np.array([[0.0], [2.0], [0.0], [0.0], [1.5], [0.0], [2.5], [0.0]])  # w2/0 on dog, cat, dog
    child = np.array([[0.0], [3.0], [0.0], [0.0], [0.0], [0.0], [1.0], [0.0]])  # w4/2 on dog only
    zeros = np.zeros((8, 1), dtype=np.int64)
    g = nx.DiGraph()
    g.add_node("w2/0", rung="w2", index=0, freq=0.4)
    g.add_node("w4/2", rung="w4", index=2, freq=0.2)
    g.add_edge("w2/0", "w4/2", coverage=1.0)
    for codes, others in (({"w2": (parent, zeros), "w4": (child, zeros + 2)}, None),
                          ({"w4": (child, zeros + 2)}, {"w2": (parent, zeros)})):
        tree = FeatureTree(g.copy())
        annotate(tree, codes, tokens, Acts(), others=others)
        kid = tree.graph.nodes["w4/2"]
        assert len(kid["context_acts"]) == len(kid["parent_context_acts"]) == 2
        for pieces, mine in zip(kid["context_acts"], kid["parent_context_acts"]):
            assert len(pieces) == len(mine)
            theirs = dict(zip((p for p, _ in pieces), mine))
            assert theirs["dog"] > 0 and all(v == 0 for p, v in theirs.items() if p.strip() in ("a", "and", "the", "ran"))
        # one segmentation for both: "cat" is its own piece because the parent fires there, though the child does not
        assert kid["context_acts"][0] == [["a ", 0.0], ["dog", 3.0], [" and a ", 0.0], ["cat", 0.0]]
        assert kid["parent_context_acts"][0] == [0.0, 2.0, 0.0, 1.5]
        assert "parent_context_acts" not in tree.graph.nodes["w2/0"]


def test_a_token_feature_is_named_by_its_context_pattern():
    """Feature 0 fires on "of" only after kind / type / sort: labelled "'of' after ..." with those words.
    Feature 1 fires on every "of": it is the token, no pattern. Feature 2 fires on content words: no pattern."""
    import numpy as np
    import pandas as pd

    from featuretree.label import annotate
    from featuretree.tree import FeatureTree

    phrases = ["a kind of tea"] * 12 + ["a type of dog"] * 10 + ["some sort of game"] * 8 + \
        ["a cup of tea", "the top of a hill", "the end of the day", "a lot of water, really"] * 25
    texts = dict(enumerate(phrases))
    vocab: dict[str, int] = {}
    rows = []
    for d, text in texts.items():
        pos = 0
        for w in text.replace(",", " ,").split():
            start = text.index(w, pos)
            pos = start + len(w)
            rows.append((vocab.setdefault(w, len(vocab)), d, start, pos, w))
    tokens = pd.DataFrame(rows, columns=["token_id", "doc_id", "start", "end", "w"])
    prev = tokens.groupby("doc_id")["w"].shift(1)
    is_of = (tokens.w == "of").to_numpy()
    after_kind = is_of & prev.isin(["kind", "type", "sort"]).to_numpy()
    content = tokens.w.isin(["tea", "dog", "game", "water", "hill"]).to_numpy()
    values = np.stack([np.where(after_kind, 2.0, 0.0), np.where(is_of, 1.0, 0.0), np.where(content, 1.5, 0.0)], 1)
    indices = np.tile([0, 1, 2], (len(tokens), 1))
    names = {i: w for w, i in vocab.items()}

    class Acts:
        def texts(self):
            return texts

        def token_strings(self, ids):
            return [names[i] for i in ids]

    g = nx.DiGraph()
    for j in range(3):
        g.add_node(f"w3/{j}", rung="w3", index=j, freq=0.1, fire_at=0.5)
    tree = FeatureTree(g)
    annotate(tree, {"w3": (values, indices)}, tokens[["token_id", "doc_id", "start", "end"]], Acts())
    a, b, c = (tree.graph.nodes[f"w3/{j}"] for j in range(3))
    assert a["pattern"]["side"] == "after" and set(a["pattern"]["words"]) == {"kind", "type", "sort"}
    assert a["pattern"]["share"] == 1.0 and a["pattern"]["base"] == 0.231  # 30 of the 130 "of"s
    assert a["label"].startswith("'of' after ") and "pattern" not in b and "pattern" not in c
    assert b["label"].startswith("of")


def test_neighbour_words_skip_punctuation_and_read_the_text():
    from featuretree.label import neighbour_words

    text = "a cup, of tea. Anthrax spores"
    assert neighbour_words(text, 7, 9) == ("cup", "tea")          # "of": the comma is skipped
    assert neighbour_words(text, 15, 18) == ("tea", "spores")     # "Ant" of "Anthrax": the whole word's neighbours
    assert neighbour_words(text, 0, 1) == ("", "cup") and neighbour_words(text, 23, 29) == ("anthrax", "")


# ---- label scores on a planted layer: block 0 outputs each word's own orthonormal direction ----------------
CONCEPTS = {"animals dog cat horse cow": ["dog", "cat", "horse", "cow"],
            "music violin guitar piano flute": ["violin", "guitar", "piano", "flute"],
            "cities paris london rome tokyo": ["paris", "london", "rome", "tokyo"]}
FILLER = ["the", "a", "saw", "played", "visited", "near", "big", "old", "we", "and"]


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """A saved run whose w4 rung has one feature per concept (firing exactly on the concept's words) and a dead
    fourth, over an activation store harvested from a tiny GPT-2 rigged so block 0 outputs the token's own
    orthonormal embedding: where each feature fires is known, so a label's score can be checked."""
    import torch
    from _models import tiny_gpt2

    from featuretree.export import save
    from featuretree.harvest import collect
    from featuretree.model import load_model
    from featuretree.sae import TopKSAE
    from featuretree.tree import FeatureTree

    words = [w for ws in CONCEPTS.values() for w in ws] + FILLER
    module, tok = tiny_gpt2(words, n_layer=1)
    vocab = tok.get_vocab()
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(32, 32, generator=gen))[0]  # orthonormal rows
    with torch.no_grad():
        module.wte.weight.copy_(basis[:len(vocab)])
        module.wpe.weight.zero_()
        for p in (*module.h[0].attn.c_proj.parameters(), *module.h[0].mlp.c_proj.parameters()):
            p.zero_()  # the block adds nothing: its output is the token embedding
    sae = TopKSAE(32, 4, 1)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.copy_(torch.tensor([-0.5, -0.5, -0.5, -9.0]))
        for j, ws in enumerate(CONCEPTS.values()):
            for w in ws:
                sae.W_enc[:, j] += basis[vocab[w]]
        sae.W_dec.copy_(torch.nn.functional.normalize(sae.W_enc.t().clone(), dim=1).nan_to_num())
    rng = np.random.default_rng(0)
    texts = []
    for i in range(120):
        ws = list(CONCEPTS.values())[i % 3]
        body = [*rng.choice(FILLER, 3), *rng.choice(ws, 2, replace=False), *rng.choice(FILLER, 2)]
        texts.append(" ".join(rng.permutation(body)))
    run = tmp_path_factory.mktemp("planted_run")
    collect(load_model((module, tok)), 0, texts, n_tokens=10_000, out=run / "acts", batch_size=16, max_length=16,
            heldout_every=4, progress=False)
    g = nx.DiGraph(rungs=["w4"], acts="acts")
    for j, label in enumerate([*CONCEPTS, "unused"]):
        g.add_node(f"w4/{j}", rung="w4", width=4, index=j, freq=0.1 if j < 3 else 0.0, label=label)
    return save(FeatureTree(g, {"w4": sae}), run)


def test_label_scores_rank_true_labels_above_shuffled_ones(planted_run):
    """Each concept feature's own label scores near 1 on detection and fuzzing; the same labels rotated one
    feature along score at or below chance; the dead feature fires nowhere and gets no score."""
    from featuretree.activations import Activations
    from featuretree.export import load
    from featuretree.label import label_scores, score_labels

    tree = load(planted_run)
    acts = Activations(planted_run / "acts")
    s = label_scores(tree, acts, progress=False).set_index("node")
    assert (s.loc[["w4/0", "w4/1", "w4/2"], "n_docs"] == 10).all(), s  # a third of the 30 held-out texts each
    assert (s.loc[["w4/0", "w4/1", "w4/2"], ["detection", "fuzzing"]] > 0.9).all().all(), s
    assert s.n_docs["w4/3"] == 0 and np.isnan(s.label_score["w4/3"])
    labels = [tree.graph.nodes[f"w4/{j}"]["label"] for j in range(3)]
    for j in range(3):
        tree.graph.nodes[f"w4/{j}"]["label"] = labels[(j + 1) % 3]
    wrong = score_labels(tree, acts, progress=False).set_index("node")
    assert (wrong.label_score[:3] < 0.6).all(), wrong
    assert tree.graph.nodes["w4/0"]["label_score"] == wrong.label_score["w4/0"]


def test_cli_label_scores_saves_and_info_reports(planted_run, capsys):
    from featuretree.__main__ import main
    from featuretree.export import load

    assert main(["-q", "label", str(planted_run), "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("4 labels scored")
    tree = load(planted_run)
    assert tree.graph.nodes["w4/1"]["label_score"] > 0.9
    assert main(["info", str(planted_run)]) == 0
    assert "label score" in capsys.readouterr().out
    assert main(["-q", "label", str(planted_run), "--nodes", "w9/9"]) == 2
    assert "unknown nodes" in capsys.readouterr().err
