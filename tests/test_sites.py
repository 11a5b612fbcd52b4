"""Dictionaries of a module inside a block (issue 18: hook names mapped to module paths): a harvest at a site
reads exactly that module's output, a ladder whose files say hook_mlp_out builds a run at the MLP's output
(harvest, faithfulness spliced there, find and refine reading the same module), on a tiny in-process GPT-2."""

from __future__ import annotations

import json

import pytest
import torch
from _models import tiny_gpt2_lm

import featuretree as ft
from featuretree.config import FeatureTreeError
from featuretree.harvest import collect
from featuretree.model import load_model, site_of

WORDS = ("the cat sat on a mat while dogs ran in parks and birds sang over green trees near old red barns "
         "under grey skies").split()


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    lm, tok = tiny_gpt2_lm(WORDS, n_layer=3)
    d = tmp_path_factory.mktemp("lm")
    lm.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def texts(n: int = 60) -> list[str]:
    return [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(6 + i % 5)) for i in range(n)]


def test_a_site_harvest_reads_that_module_exactly(lm_dir):
    from featuretree.model import find_layers, get_tokenizer

    model = load_model(str(lm_dir))
    assert site_of(model, 1, "mlp_out") == "mlp" and site_of(model, 1, "attn_out") == "attn"
    module, tok = model._module, get_tokenizer(model)
    for text in texts(3):
        acts = collect(model, 1, [text], progress=False, site="mlp")
        assert acts.meta["hook_name"].endswith("h.1.mlp") and acts.meta["site"] == "mlp"
        seen: list = []
        handle = find_layers(model)[1][1].mlp.register_forward_hook(lambda m, a, out, seen=seen: seen.append(out.detach()))
        try:
            with torch.no_grad():
                enc = tok(text, return_tensors="pt")
                module(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        finally:
            handle.remove()
        want = seen[0][0][enc["input_ids"][0] != 0]  # the BOS (id 0) is dropped from harvests
        x = acts.load("all")
        assert want.shape == x.shape and torch.allclose(x, want, atol=1e-5)
        assert not torch.allclose(collect(model, 1, [text], progress=False).load("all"), x)  # not the block's output


def test_a_ladder_of_mlp_out_dictionaries_builds_at_the_mlp(lm_dir, tmp_path):
    model = load_model(str(lm_dir))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(texts(200)))
    acts = collect(model, 1, texts(200), progress=False, site="mlp")
    saes = ft.train_ladder(acts, (8, 24), k=2, epochs=2, batch_size=256, progress=False)
    for s in saes.values():
        s.metadata["hook_name"] = "blocks.1.hook_mlp_out"
    out = tmp_path / "run"
    tree = ft.build(model=str(lm_dir), layer=1, corpus=str(corpus), n_tokens=1500, ladder=saes, out=out,
                    progress=False)
    assert tree.config.site == "mlp" and json.loads((out / "acts" / "meta.json").read_text())["site"] == "mlp"
    faith = json.loads((out / "faithfulness.json").read_text())
    assert faith["site"] == "mlp" and all(r["loss_recovered"] is not None for r in faith["rungs"])
    hits = ft.find(tree, "birds")
    assert len(hits)
    node = max((n for n, d in tree.graph.nodes(data=True) if d.get("rung") == "w8"),
               key=lambda n: tree.graph.nodes[n]["freq"])
    deep = ft.refine(tree, node, width=4, k=1, min_tokens=20)
    assert any(c.startswith(f"{node}/r4/") for c in deep.graph.successors(node))
    with pytest.raises(FeatureTreeError, match="has no submodule 'nope'"):
        ft.build(model=str(lm_dir), layer=1, corpus=str(corpus), n_tokens=500, site="nope", out=tmp_path / "bad",
                 progress=False)
    assert not (tmp_path / "bad").exists()


def test_a_normalized_site_reads_the_norm_without_its_gain(lm_dir):
    """ln_2:normalized = (x - mean) / std of the MLP's input, the norm's weight and bias taken out (what
    TransformerLens' ln2.hook_normalized and Gemma Scope's transcoders read)."""
    from featuretree.model import find_layers

    model = load_model(str(lm_dir))
    ln = find_layers(model)[1][1].ln_2
    with torch.no_grad():  # a gain and bias that are not the identity, so taking them out shows
        ln.weight.uniform_(0.5, 2.0)
        ln.bias.uniform_(-1.0, 1.0)
    from featuretree.model import get_tokenizer

    text = texts(3)[0]
    acts = collect(model, 1, [text], progress=False, site="ln_2:normalized")
    seen: list = []
    handle = ln.register_forward_hook(lambda m, a, out, seen=seen: seen.append(a[0].detach()))
    try:
        with torch.no_grad():
            enc = get_tokenizer(model)(text, return_tensors="pt")
            model._module(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    finally:
        handle.remove()
    x = seen[0][0][1:]  # the BOS dropped
    want = torch.nn.functional.layer_norm(x, (x.shape[-1],), eps=ln.eps)
    assert torch.allclose(acts.load("all"), want, atol=1e-4)


def test_a_ladder_of_transcoders_reads_the_mlp_input_and_is_scored_on_its_output(lm_dir, tmp_path):
    """Transcoders whose files say ln2.hook_normalized -> hook_mlp_out: the run harvests the MLP's normalised
    input (their firing), and their FVU is against the MLP's output on the same tokens (by hand here)."""
    from test_ladders import random_weights, write_saelens

    from featuretree.activations import Activations
    from featuretree.ladders import load_ladder

    dirs = []
    for w in (16, 48):
        weights = random_weights(32, w, seed=w)
        weights["threshold"] = weights["threshold"] * 0.1
        dirs.append(write_saelens(tmp_path / f"t{w}", "jumprelu_transcoder", weights, apply_b_dec=False,
                                  extra={"d_out": 32, "hook_name": "blocks.1.ln2.hook_normalized",
                                         "hook_name_out": "blocks.1.hook_mlp_out"}))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(texts(200)))
    out = tmp_path / "run"
    tree = ft.build(model=str(lm_dir), layer=1, corpus=str(corpus), n_tokens=1500, ladder=load_ladder(dirs), out=out,
                    progress=False)
    assert tree.config.site == "ln_2:normalized" and not (out / "faithfulness.json").exists()
    x = Activations(out / "acts").load("heldout")
    y = Activations(out / "acts_out").load("heldout")
    assert Activations(out / "acts_out").meta["site"] == "mlp" and x.shape == y.shape
    for rung, sae in tree.saes.items():
        v, i = sae.encode(x)
        fvu = float((y - sae.decode(v, i)).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
        assert sae.metrics["fvu"] == pytest.approx(fvu, rel=1e-4), rung
    assert len(ft.find(tree, "birds"))
    with pytest.raises(FeatureTreeError, match="effects are not supported"):
        from featuretree.effect import effects

        effects(tree, next(n for n in tree.graph if n.startswith("w16/")), texts=texts(4), progress=False)
