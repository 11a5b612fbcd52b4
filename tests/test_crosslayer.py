"""Cross-layer links on planted layers: a feature that splits, two that merge, one carried unchanged."""

import networkx as nx
import numpy as np
import pytest
import torch

from featuretree.config import FeatureTreeError

WORDS = ["dog", "cat", "violin", "guitar", "paris", "the", "a", "saw", "near", "we", "and", "big"]
FILLER = ["the", "a", "saw", "near", "we", "and", "big"]
# layer 0: animals (dog, cat), violin, guitar, paris; layer 1: dog, cat, strings (violin + guitar), paris
EARLY = [["dog", "cat"], ["violin"], ["guitar"], ["paris"]]
LATE = [["dog"], ["cat"], ["violin", "guitar"], ["paris"]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs of one tiny GPT-2 (blocks that add nothing: both layers output the token's orthonormal
    embedding) at layers 0 and 1 over the same texts, each with a planted rung w5 (four word-set features,
    one dead)."""
    from _models import tiny_gpt2

    from featuretree.config import Config
    from featuretree.export import load, save
    from featuretree.harvest import collect
    from featuretree.model import load_model
    from featuretree.sae import TopKSAE
    from featuretree.tree import FeatureTree

    module, tok = tiny_gpt2(WORDS, n_layer=2)
    vocab = tok.get_vocab()
    basis = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(0)))[0]
    with torch.no_grad():
        module.wte.weight.copy_(basis[:len(vocab)])
        module.wpe.weight.zero_()
        for block in module.h:
            for p in (*block.attn.c_proj.parameters(), *block.mlp.c_proj.parameters()):
                p.zero_()
    model = load_model((module, tok))
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.permutation([*rng.choice(FILLER, 3), *rng.choice(WORDS[:5], 2, replace=False)]))
             for _ in range(200)]
    out = []
    for layer, sets in ((0, EARLY), (1, LATE)):
        run = tmp_path_factory.mktemp(f"L{layer}")
        collect(model, layer, texts, n_tokens=10_000, out=run / "acts", batch_size=16, max_length=16,
                heldout_every=2, progress=False)
        sae = TopKSAE(32, 5, 1)
        with torch.no_grad():
            sae.W_enc.zero_()
            sae.b_enc.copy_(torch.tensor([-0.5] * 4 + [-9.0]))
            for j, ws in enumerate(sets):
                for w in ws:
                    sae.W_enc[:, j] += basis[vocab[w]]
        g = nx.DiGraph(rungs=["w5"], acts="acts")
        for j in range(5):
            g.add_node(f"w5/{j}", rung="w5", width=5, index=j, freq=0.1, fire_at=0.25, label="+".join(
                sets[j]) if j < 4 else "dead")
        out.append(load(save(FeatureTree(g, {"w5": sae}, config=Config(model="tiny-gpt2", layer=layer)), run)))
    return out


def test_link_layers_finds_split_merge_and_same(runs):
    from featuretree.crosslayer import link_layers

    g = link_layers(runs)
    kinds = {(u, v): d["kind"] for u, v, d in g.edges(data=True)}
    assert kinds == {("L0:w5/0", "L1:w5/0"): "split", ("L0:w5/0", "L1:w5/1"): "split",
                     ("L0:w5/1", "L1:w5/2"): "merge", ("L0:w5/2", "L1:w5/2"): "merge",
                     ("L0:w5/3", "L1:w5/3"): "same"}
    e = g.edges["L0:w5/0", "L1:w5/0"]
    assert e["p_earlier"] == 1.0 and 0.3 < e["p_later"] < 0.7  # all of dog's tokens are animal tokens, half of those
    assert g.nodes["L1:w5/2"]["label"] == "violin+guitar" and "L0:w5/4" not in g  # the dead feature takes no part
    primary = [(u, v) for u, v, d in g.edges(data=True) if d["primary"]]
    assert len(primary) == 4 and len({v for _, v in primary}) == 4  # one primary parent per later feature


def test_as_tree_draws_a_feature_across_layers(runs):
    from featuretree.crosslayer import as_tree, link_layers
    from featuretree.explore import sunburst

    tree = as_tree(link_layers(runs))
    assert set(tree.graph.successors("L0:w5/0")) == {"L1:w5/0", "L1:w5/1"}
    fig = sunburst(tree, root="L0:w5/0")
    assert len(fig.data[0].ids) == 3


def test_link_layers_refuses_mismatched_runs(runs):
    from featuretree.crosslayer import link_layers

    with pytest.raises(FeatureTreeError, match="strictly increasing"):
        link_layers([runs[1], runs[0]])
    with pytest.raises(FeatureTreeError, match="two or more"):
        link_layers(runs[:1])


def test_cli_layers(runs, tmp_path, capsys):
    from featuretree.__main__ import main

    assert main(["layers", str(runs[0].path), str(runs[1].path), "--graphml", str(tmp_path / "x.graphml"),
                 "--html", str(tmp_path / "x.html")]) == 0
    out = capsys.readouterr().out
    assert "L0 -> L1: same 1  split 2  merge 2  into 0" in out and "split L0:w5/0 'dog+cat' -> dog" in out
    assert (tmp_path / "x.graphml").stat().st_size > 0 and (tmp_path / "x.html").stat().st_size > 0
    assert main(["layers", str(runs[1].path), str(runs[0].path)]) == 2


@pytest.fixture(scope="module")
def circuit(tmp_path_factory):
    """A two-block GPT-2 LM whose block 1 MLP reads "cat" and writes a free direction u; the layer-1 feature
    reads u (so it fires on "cat" tokens only); at layer 0, feature 0 is "cat" and feature 1 is "dog"."""
    import transformers
    from _models import word_tokenizer

    from featuretree.config import Config
    from featuretree.sae import TopKSAE
    from featuretree.tree import FeatureTree

    tok = word_tokenizer(WORDS)
    vocab = tok.get_vocab()
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(vocab), n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    lm = transformers.GPT2LMHeadModel(cfg)
    basis = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(3)))[0]
    cat, dog, u = basis[vocab["cat"]], basis[vocab["dog"]], basis[31]  # 31: no token's direction
    with torch.no_grad():
        lm.transformer.wte.weight.copy_(basis[:len(vocab)])
        lm.transformer.wpe.weight.zero_()
        for block in lm.transformer.h:
            for p in (*block.attn.c_proj.parameters(), *block.mlp.c_fc.parameters(), *block.mlp.c_proj.parameters()):
                p.zero_()
        mlp = lm.transformer.h[1].mlp
        mlp.c_fc.weight[:, 0] = cat * 10
        mlp.c_proj.weight[0, :] = u * 0.05
    path = tmp_path_factory.mktemp("circuit") / "lm"
    lm.save_pretrained(path)
    tok.save_pretrained(path)
    trees = []
    for layer, dirs, bias in ((0, [cat, dog], [0.0, 0.0, -9.0]), (1, [u, u], [-1.0, -99.0, -99.0])):
        sae = TopKSAE(32, 3, 1)
        with torch.no_grad():
            sae.W_enc.zero_()
            sae.W_enc[:, :2] = torch.stack(dirs).t()
            sae.b_enc.copy_(torch.tensor(bias))
            sae.W_dec[:2] = torch.stack(dirs)
        g = nx.DiGraph(rungs=["w3"])
        for j in range(3):
            g.add_node(f"w3/{j}", rung="w3", width=3, index=j, freq=0.1, fire_at=0.1, label=f"L{layer}-{j}")
        trees.append(FeatureTree(g, {"w3": sae}, config=Config(model=str(path), layer=layer)))
    return trees


def test_upstream_finds_the_earlier_feature_that_drives_the_later_one(circuit):
    from featuretree.crosslayer import upstream

    texts = ["we saw the cat and a dog", "a big cat near the dog", "the dog and the cat"]
    up = upstream(circuit, "L1:w3/0", texts=texts, progress=False)
    assert up.node.iloc[0] == "L0:w3/0" and up.attribution.iloc[0] > 0 and up.share.iloc[0] == pytest.approx(1.0)
    dog = up.set_index("node").loc["L0:w3/1"]
    assert abs(dog.attribution) < 1e-6 * up.attribution.iloc[0] and dog.n_active >= 3  # active, drives nothing
    with pytest.raises(FeatureTreeError, match="no tree below"):
        upstream(circuit, "L0:w3/0", texts=texts, progress=False)
    with pytest.raises(FeatureTreeError, match="fires on none"):
        upstream(circuit, "L1:w3/0", texts=["the dog saw a dog"], progress=False)
