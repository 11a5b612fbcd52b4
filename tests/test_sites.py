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
