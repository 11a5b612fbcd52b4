"""effects on a planted causal LM: a feature wired to one output token is named by every view of it."""

import networkx as nx
import pytest
import torch

from featuretree.config import FeatureTreeError

WORDS = ["we", "saw", "the", "a", "big", "old", "dog", "canine", "cat", "and", "near", "house"]


@pytest.fixture(scope="module")
def planted():
    """A one-block GPT-2 whose block adds nothing (its output is the token embedding, orthonormal rows), with an
    untied LM head reading each direction as its own token, except that "dog"'s embedding also carries 3x the
    direction of "canine": after "dog" the model predicts "canine". Rung w2's feature 0 reads and writes that
    direction (it fires on "dog", weakly on "canine"); feature 1 is dead. Feature 0 has a child in w4 doing the same."""
    import transformers
    from _models import word_tokenizer

    from featuretree.model import load_model
    from featuretree.sae import TopKSAE
    from featuretree.tree import FeatureTree

    tok = word_tokenizer(WORDS)
    vocab = tok.get_vocab()
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(vocab), n_positions=64,
                                  bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    lm = transformers.GPT2LMHeadModel(cfg)
    basis = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(1)))[0][:len(vocab)]
    target = basis[vocab["canine"]]
    with torch.no_grad():
        lm.transformer.wte.weight.copy_(basis)
        lm.transformer.wte.weight[vocab["dog"]] += 3 * target
        lm.transformer.wpe.weight.zero_()
        for p in (*lm.transformer.h[0].attn.c_proj.parameters(), *lm.transformer.h[0].mlp.c_proj.parameters()):
            p.zero_()
        lm.lm_head.weight.copy_(basis * 4)
    lm.eval()
    saes = {}
    for w in (2, 4):
        sae = TopKSAE(32, w, 1)
        with torch.no_grad():
            sae.W_enc.zero_()
            sae.W_enc[:, 0] = target
            sae.b_enc.copy_(torch.tensor([0.0] + [-9.0] * (w - 1)))
            sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(w, 32), dim=1))
            sae.W_dec[0] = target
        saes[f"w{w}"] = sae
    g = nx.DiGraph(rungs=["w2", "w4"], fire_rel=0.25)
    for w in (2, 4):
        for j in range(w):
            g.add_node(f"w{w}/{j}", rung=f"w{w}", width=w, index=j, freq=0.1, fire_at=0.5, label=f"f{j}")
    g.add_edge("w2/0", "w4/0", kind="same", coverage=1.0, cos=1.0)
    return FeatureTree(g, saes), load_model((lm, tok))


TEXTS = ["we saw the dog canine near the house", "a big dog canine and a cat", "the old dog canine saw a cat"]


def test_effects_name_the_wired_token(planted):
    from featuretree.effect import effects

    tree, model = planted
    e = effects(tree, "w2/0", TEXTS, model=model, layer=0, prompt="we saw the", scale=2.0, progress=False)
    # fires on each "dog" (activation 3) and each "canine" (1): 6 positions, mean activation 2
    assert e.summary["n_firing"] == 6 and e.summary["activation"] == pytest.approx(2.0, abs=1e-4)
    assert e.summary["loss_change"] > 1.0  # without it, "canine" after "dog" is no longer predicted
    assert (e.docs.loss_change > 1.0).all() and len(e.docs) == 3
    promoted = e.logits[e.logits.direction == "promoted"]
    lens = promoted[promoted.by == "lens"]
    assert lens.token.iloc[0] == "canine" and lens.lens.iloc[0] == pytest.approx(4.0)  # the head reads 4x it
    assert (lens.lens.iloc[1:].abs() < 1e-4).all()  # the only token the direction writes
    by_measure = promoted[promoted.by == "measured"]
    assert by_measure.token.iloc[0] == "canine" and (by_measure.measured > 0).all()
    suppressed = e.logits[(e.logits.direction == "suppressed") & (e.logits.by == "measured")]
    assert (suppressed.measured < 0).all() and len(suppressed)  # the mass "canine" took, given back
    assert e.steering.token.iloc[0] == "canine" and e.steering.p_steered.iloc[0] > e.steering.p_clean.iloc[0]
    assert list(e.subtree.rung) == ["w4"] and e.subtree.loss_change.iloc[0] == pytest.approx(e.summary["loss_change"], rel=1e-5)  # float32 sums in two orders
    assert "canine" in str(e)


def test_effects_refuse_what_they_cannot_measure(planted):
    from featuretree.effect import effects

    tree, model = planted
    with pytest.raises(FeatureTreeError, match="fires on none"):
        effects(tree, "w2/1", TEXTS, model=model, layer=0, progress=False)
    with pytest.raises(FeatureTreeError, match="not a feature"):
        effects(tree, "w9/9", TEXTS, model=model, layer=0, progress=False)
    with pytest.raises(FeatureTreeError, match="causal LM"):
        effects(tree, "w2/0", TEXTS, model=_encoder(), layer=0, progress=False)


def _encoder():
    from featuretree.model import load_model

    return load_model()


def test_cli_effects_prints_and_saves(planted, tmp_path, capsys):
    import json

    from featuretree.__main__ import main
    from featuretree.config import Config
    from featuretree.export import save

    tree, model = planted
    tree.config = Config(model=str(tmp_path / "lm"), layer=0)
    module, tok = model._module, tok_of(model)
    module.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    run = save(tree, tmp_path / "run")
    args = ["-q", "effects", str(run), "w2/0", "--prompt", "we saw the"] + sum((["--text", t] for t in TEXTS), [])
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "fires at 6 positions of 3 texts" in out and "'canine'" in out
    saved = json.loads((run / "effects" / "w2_0.json").read_text())
    assert saved["steering"][0]["token"] == "canine" and saved["summary"]["loss_change"] > 1.0
    assert main(["-q", "effects", str(run), "w2/1", "--no-save"]) == 2  # no store, no texts: one line, status 2
    assert "pass texts" in capsys.readouterr().err


def tok_of(model):
    from featuretree.model import get_tokenizer

    return get_tokenizer(model)
