"""Formats users already have: SAELens and sparsify dictionaries load (and link) exactly; pickles are refused
without being unpickled; GraphML and pandas tables round-trip every node and edge attribute of a real tree."""

import json
import pickle
import re

import networkx as nx
import pytest
import torch
from safetensors.torch import save_file

import featuretree as ft
from featuretree import FeatureTreeError, TopKSAE
from featuretree.export import from_frame, from_graphml, to_graphml


@pytest.fixture(scope="module")
def ladder():
    x = torch.randn(4000, 24, generator=torch.Generator().manual_seed(0))
    return x, ft.train_ladder(x, (16, 48), k=3, epochs=2, batch_size=256, progress=False)


def _codes(sae, x):
    v, i = sae.encode(x)
    return torch.zeros(len(x), sae.width).scatter_(1, i, v)


def write_sparsify(sae, path, **cfg):
    """A directory laid out as sparsify's SparseCoder.save_to_disk writes it (cfg.json + sae.safetensors)."""
    path.mkdir(parents=True)
    save_file({"encoder.weight": sae.W_enc.detach().t().contiguous(), "encoder.bias": sae.b_enc.detach(),
               "W_dec": sae.W_dec.detach().contiguous(), "b_dec": sae.b_dec.detach()}, str(path / "sae.safetensors"))
    (path / "cfg.json").write_text(json.dumps({"activation": "topk", "expansion_factor": 32, "normalize_decoder": True,
                                               "num_latents": sae.width, "k": sae.k, "multi_topk": False,
                                               "skip_connection": False, "transcode": False, "d_in": sae.d_model,
                                               **cfg}))
    return path


def test_sparsify_layout_loads_exactly_and_links(ladder, tmp_path):
    x, saes = ladder
    loaded = [TopKSAE.load(write_sparsify(saes[w], tmp_path / f"layers.3.w{w}")) for w in (16, 48)]
    for w, sae in zip((16, 48), loaded):
        assert torch.equal(_codes(sae, x), _codes(saes[w], x)) and sae.metadata["source"] == "sparsify"
    tree = ft.link(loaded, x)  # a pretrained ladder from elsewhere
    ours = ft.link(saes, x)
    assert set(tree.graph.edges) == set(ours.graph.edges)
    with pytest.raises(FeatureTreeError, match="transcode=true"):
        TopKSAE.load(write_sparsify(saes[16], tmp_path / "tc", transcode=True))
    with pytest.raises(FeatureTreeError, match="skip_connection=true"):
        TopKSAE.load(write_sparsify(saes[16], tmp_path / "skip", skip_connection=True))


def test_saelens_layout_round_trips_and_folds_b_dec(ladder, tmp_path):
    x, saes = ladder
    sae = saes[48]
    d = sae.save(tmp_path / "w48")
    cfg = json.loads((d / "cfg.json").read_text())
    assert {"architecture", "d_in", "d_sae", "k", "dtype", "apply_b_dec_to_input", "normalize_activations",
            "metadata"} <= set(cfg) and cfg["architecture"] == "topk"
    back = TopKSAE.load(d)
    assert all(torch.equal(a, b) for a, b in zip(sae.parameters(), back.parameters()))
    # a SAELens TopK SAE that does not subtract b_dec from its input reads as the same function
    cfg["apply_b_dec_to_input"] = False
    alt = tmp_path / "alt"
    alt.mkdir()
    (alt / "cfg.json").write_text(json.dumps(cfg))
    save_file({n: getattr(sae, n).detach().contiguous() for n in ("W_enc", "b_enc", "W_dec", "b_dec")},
              str(alt / "sae_weights.safetensors"))
    folded = TopKSAE.load(alt)
    pre = x @ sae.W_enc.detach() + sae.b_enc.detach()  # SAELens' encoder without b_dec on the input
    top = pre.topk(sae.k, dim=1)
    expect = torch.zeros_like(pre).scatter_(1, top.indices, top.values.relu())
    assert torch.allclose(_codes(folded, x), expect, atol=1e-4)
    for key, value, match in (("architecture", "jumprelu", "not a TopK SAE"),
                              ("normalize_activations", "expected_average_only_in", "rescaled inputs"),
                              ("d_sae", 49, "W_enc has shape")):
        bad = tmp_path / f"bad-{key}"
        bad.mkdir()
        (bad / "cfg.json").write_text(json.dumps({**cfg, key: value}))
        (bad / "sae_weights.safetensors").write_bytes((alt / "sae_weights.safetensors").read_bytes())
        with pytest.raises(FeatureTreeError, match=match):
            TopKSAE.load(bad)


@pytest.mark.parametrize("payload, message", [
    (pickle.dumps({"W_enc": [1.0]}), "is a pickle file, not safetensors: featuretree reads only safetensors"),
    (b"PK\x03\x04" + b"\0" * 64, "is a torch.save (zip) file, not safetensors: featuretree reads only safetensors"),
    (b"", "is empty: a write was cut short"),
    (b"\x10\0\0\0\0\0\0\0{\"a", "is truncated or not a safetensors file: a write was cut short"),
])
def test_pickles_and_broken_files_are_refused_unread(ladder, tmp_path, payload, message, monkeypatch):
    _, saes = ladder
    d = saes[16].save(tmp_path / "w16")
    (d / "sae_weights.safetensors").write_bytes(payload)
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("featuretree unpickled a file"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("featuretree called torch.load"))
    with pytest.raises(FeatureTreeError, match=re.escape(message)):
        TopKSAE.load(d)


def test_a_directory_of_pt_files_says_how_to_convert(tmp_path):
    (tmp_path / "cfg.json").write_text(json.dumps({"d_in": 4, "d_sae": 8, "k": 2}))
    (tmp_path / "sae_weights.pt").write_bytes(pickle.dumps({}))
    with pytest.raises(FeatureTreeError, match="sae_weights.pt but no sae_weights.safetensors.*never unpickles"):
        TopKSAE.load(tmp_path)


def test_real_tree_round_trips_through_tables_and_graphml(tmp_path):
    texts = ["the dog barked at the cat all night", "a small bird sang in the tall oak tree",
             "the doctor treated the patient for a fever", "the court ruled that the contract was void"] * 20
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"{t} ({i})" for i, t in enumerate(texts)))
    tree = ft.build(ft.Config(corpus=str(corpus), n_tokens=900, widths=(8, 32), k=2, epochs=2, batch_size=128),
                    out=tmp_path / "run", progress=False)
    g = tree.graph
    h = from_frame(ft.to_frame(tree, virtual=True), ft.to_frame(tree, edges=True), g.graph)
    assert dict(h.nodes(data=True)) == dict(g.nodes(data=True))
    assert {(p, c): d for p, c, d in h.edges(data=True)} == {(p, c): d for p, c, d in g.edges(data=True)}
    assert h.graph == g.graph
    k = from_graphml(to_graphml(tree, tmp_path / "t.graphml"))
    assert nx.utils.graphs_equal(k, g)
    assert dict(k.nodes(data=True)) == dict(g.nodes(data=True))
