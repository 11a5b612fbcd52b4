"""Gated SAEs and dictionary_learning's files as rungs (issue 18): each encodes as its library's own `encode`
does (written out here; checked against SAELens / dictionary_learning themselves where they are installed),
saves and loads back, refuses pickles and transcoders with the fix, and links in a mixed ladder."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from test_ladders import dense, random_weights, write_saelens

from featuretree.config import FeatureTreeError
from featuretree.dictionaries import DL_CONVERT, GatedSAE, ThresholdSAE, load_dictionary
from featuretree.eval import edge_scores, planted_hierarchy
from featuretree.ladders import load_ladder
from featuretree.sae import TopKSAE
from featuretree.train import train_ladder
from featuretree.tree import link
from featuretree.utils import save_tensors


def gated_weights(d: int, w: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(d, w, generator=g) / d ** 0.5, "b_gate": torch.randn(w, generator=g) * 0.2,
            "r_mag": torch.randn(w, generator=g) * 0.3, "b_mag": torch.randn(w, generator=g) * 0.2,
            "W_dec": torch.randn(w, d, generator=g), "b_dec": torch.randn(d, generator=g) * 0.1}


def gated_formula(w: dict, x: torch.Tensor, apply_b_dec: bool = True) -> torch.Tensor:
    """SAELens' GatedSAE.encode: gate = sae_in @ W_enc + b_gate > 0; magnitude relu(sae_in @ (W_enc * exp(r_mag)) + b_mag)."""
    sae_in = x - w["b_dec"] * float(apply_b_dec)
    active = (sae_in @ w["W_enc"] + w["b_gate"]) > 0
    return active * torch.relu(sae_in @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"])


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_gated_saelens_layout_encodes_as_saelens_does(tmp_path, apply_b_dec):
    w = gated_weights(16, 48, seed=5)
    x = torch.randn(300, 16)
    sae = load_dictionary(write_saelens(tmp_path / "g", "gated", w, apply_b_dec=apply_b_dec), max_codes=47)
    assert isinstance(sae, GatedSAE) and sae.metadata["hook_name"] == "blocks.3.hook_resid_post"
    want, got = gated_formula(w, x, apply_b_dec), dense(sae, x)
    assert (want > 0).any() and (want == 0).any()
    # the gate opens where the magnitude is negative too: those tokens do not fire (a value of 0)
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
    again = load_dictionary(sae.save(tmp_path / "resaved"))
    assert isinstance(again, GatedSAE) and torch.allclose(dense(again, x), got, atol=1e-6)
    saved = json.loads((tmp_path / "resaved" / "cfg.json").read_text())
    assert saved["architecture"] == "gated"
    from safetensors.torch import load_file

    assert sorted(load_file(str(tmp_path / "resaved" / "sae_weights.safetensors"))) == sorted(w)  # SAELens' names
    assert torch.allclose(sae.prefix(16).activations(x), sae.activations(x)[:, :16], atol=1e-6)


# ---- dictionary_learning: its classes' state_dict names, and each class's encode written out -------------------
def dl_state(cls: str, d: int, w: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=1.0):
        return torch.randn(*shape, generator=g) * s

    if cls in ("AutoEncoder", "AutoEncoderNew"):
        out = {"encoder.weight": r(w, d, s=d ** -0.5), "encoder.bias": r(w, s=0.1), "decoder.weight": r(d, w, s=0.5)}
        out["bias" if cls == "AutoEncoder" else "decoder.bias"] = r(d, s=0.1)
        return out
    if cls == "GatedAutoEncoder":
        return {"decoder_bias": r(d, s=0.1), "encoder.weight": r(w, d, s=d ** -0.5), "r_mag": r(w, s=0.3),
                "gate_bias": r(w, s=0.2), "mag_bias": r(w, s=0.2), "decoder.weight": r(d, w)}
    if cls == "JumpReluAutoEncoder":
        return {"W_enc": r(d, w, s=d ** -0.5), "b_enc": r(w, s=0.1), "W_dec": r(w, d), "b_dec": r(d, s=0.1),
                "threshold": torch.rand(w, generator=g) * 0.3}
    base = {"k": torch.tensor(6, dtype=torch.int32), "threshold": torch.tensor(0.2)}
    if cls == "MatryoshkaBatchTopKSAE":
        return {**base, "group_sizes": torch.tensor([8, 8, 16, 16]), "W_enc": r(d, w, s=d ** -0.5), "b_enc": r(w, s=0.1),
                "W_dec": r(w, d), "b_dec": r(d, s=0.1)}
    return {**base, "decoder.weight": r(d, w), "encoder.weight": r(w, d, s=d ** -0.5), "encoder.bias": r(w, s=0.1),
            "b_dec": r(d, s=0.1)}


def dl_formula(cls: str, s: dict, x: torch.Tensor) -> torch.Tensor:
    """What dictionary_learning's `encode` returns after its from_pretrained (AutoEncoder normalises its decoder)."""
    relu = torch.relu
    if cls == "AutoEncoder":
        norms = s["decoder.weight"].norm(dim=0)
        return relu((x - s["bias"]) @ (s["encoder.weight"] * norms[:, None]).T + s["encoder.bias"] * norms)
    if cls == "AutoEncoderNew":
        return relu(x @ s["encoder.weight"].T + s["encoder.bias"])
    if cls == "GatedAutoEncoder":
        x_enc = (x - s["decoder_bias"]) @ s["encoder.weight"].T
        return ((x_enc + s["gate_bias"]) > 0) * relu(s["r_mag"].exp() * x_enc + s["mag_bias"])
    if cls == "JumpReluAutoEncoder":
        pre = x @ s["W_enc"] + s["b_enc"]
        return relu(pre * (pre > s["threshold"]))
    if cls == "MatryoshkaBatchTopKSAE":
        post = relu((x - s["b_dec"]) @ s["W_enc"] + s["b_enc"])
        return post * (post > s["threshold"])
    post = relu((x - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"])
    if cls == "BatchTopKSAE":
        return post * (post > s["threshold"])
    top = post.topk(int(s["k"]), dim=-1)  # AutoEncoderTopK
    return torch.zeros_like(post).scatter_(-1, top.indices, top.values)


def write_dl(path, cls: str, state: dict, *, convert: bool = True, **trainer):
    """A dictionary_learning save (config.json + ae.pt), with ae.pt converted to ae.safetensors as the README says."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"trainer": {"dict_class": cls, "lm_name": "tiny", "layer": 3,
                                                              "submodule_name": "resid_post_layer_3", **trainer},
                                                  "buffer": {"d_submodule": 16}}))
    if convert:
        save_tensors(path / "ae.safetensors", state)
    else:
        (path / "ae.pt").write_bytes(b"\x80\x04pickle")
    return path


DL_CLASSES = ("AutoEncoder", "AutoEncoderNew", "GatedAutoEncoder", "JumpReluAutoEncoder", "AutoEncoderTopK",
              "BatchTopKSAE", "MatryoshkaBatchTopKSAE")


@pytest.mark.parametrize("cls", DL_CLASSES)
def test_dictionary_learning_layouts_encode_as_it_does(tmp_path, cls):
    state = dl_state(cls, 16, 48, seed=7)
    x = torch.randn(300, 16)
    sae = load_dictionary(write_dl(tmp_path / cls, cls, state), max_codes=47)
    want, got = dl_formula(cls, state, x), dense(sae, x)
    assert (want > 0).any() and (want == 0).any()
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
    assert sae.metadata["source"] == "dictionary_learning" and sae.metadata["hook_name"] == "blocks.3.hook_resid_post"
    kind = {"AutoEncoderTopK": TopKSAE, "GatedAutoEncoder": GatedSAE}.get(cls, ThresholdSAE)
    assert type(sae) is kind
    if cls == "MatryoshkaBatchTopKSAE":  # its group sizes are the prefixes: a ladder of four rungs
        ladder = load_ladder(tmp_path / cls)
        assert list(ladder) == ["w8", "w16", "w32", "w48"]
        assert torch.allclose(dense(ladder["w16"], x), dense(ladder["w48"], x)[:, :16])


def test_dictionary_learning_refusals(tmp_path):
    with pytest.raises(FeatureTreeError, match=r"ae.pt but no ae.safetensors: featuretree never unpickles.*save_file"):
        load_dictionary(write_dl(tmp_path / "p", "AutoEncoderTopK", {}, convert=False))
    with pytest.raises(FeatureTreeError, match="dict_class 'CrossCoder' is not one featuretree reads"):
        load_dictionary(write_dl(tmp_path / "c", "CrossCoder", dl_state("AutoEncoder", 8, 16, 0)))
    state = dl_state("AutoEncoderTopK", 8, 16, 0)
    state["decoder.weight"] = state["decoder.weight"][:, :12]
    with pytest.raises(FeatureTreeError, match=r"decoder.weight has shape \(8, 12\), expected \(8, 16\)"):
        load_dictionary(write_dl(tmp_path / "s", "AutoEncoderTopK", state))
    m = dl_state("MatryoshkaBatchTopKSAE", 16, 48, 0)
    m["group_sizes"] = torch.tensor([8, 8])
    with pytest.raises(FeatureTreeError, match="group_sizes"):
        load_dictionary(write_dl(tmp_path / "m", "MatryoshkaBatchTopKSAE", m))
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text("{}")
    with pytest.raises(FeatureTreeError, match="no trainer.dict_class"):
        load_dictionary(tmp_path / "x")


def test_a_gated_and_topk_ladder_links_a_planted_hierarchy(tmp_path):
    """A gated narrow rung (the TopK rung's weights, gate biases set so each feature opens where it fires in
    TopK, magnitudes unscaled) and a TopK wide rung: the tree still recovers the planted edges."""
    from featuretree.firing import fire

    p = planted_hierarchy(n_roots=8, branching=3, depth=2, d_model=32, n_tokens=40_000, seed=0)
    train, held = p.split(30_000)
    saes = train_ladder(train.acts, (12, 48), k=4, epochs=4, batch_size=512, seed=0, progress=False)
    _, _, _, at = fire(saes[12], held.acts, with_thresholds=True)
    g = GatedSAE(32, 12)
    with torch.no_grad():
        g.W_enc.copy_(saes[12].W_enc)
        g.W_dec.copy_(saes[12].W_dec)
        g.b_dec.copy_(saes[12].b_dec)
        g.b_enc.copy_(saes[12].b_enc - torch.as_tensor(at, dtype=torch.float32))  # gate: pre > fire_at
        g.b_mag.copy_(saes[12].b_enc)  # magnitude: the TopK pre-activation itself
    ladder = load_ladder([g.save(tmp_path / "g12"), saes[48].save(tmp_path / "t48")])
    assert [type(s).__name__ for s in ladder.values()] == ["GatedSAE", "TopKSAE"]
    scores = edge_scores(link(ladder, held.acts), held)
    assert scores["precision"] >= 0.8 and scores["recall"] >= 0.6, scores


def test_against_dictionary_learning_itself(tmp_path):
    """With dictionary_learning installed: its own classes with random weights, saved as it saves them (ae.pt +
    config.json), loaded by its own load_dictionary and by featuretree after the README's one-line conversion."""
    dl = pytest.importorskip("dictionary_learning")
    import dictionary_learning.dictionary as dd
    import dictionary_learning.trainers as tr
    from dictionary_learning.utils import load_dictionary as dl_load

    torch.manual_seed(0)
    x = torch.randn(300, 16)
    made = {"AutoEncoder": lambda: dd.AutoEncoder(16, 64), "AutoEncoderNew": lambda: dd.AutoEncoderNew(16, 64),
            "GatedAutoEncoder": lambda: dd.GatedAutoEncoder(16, 64),
            "JumpReluAutoEncoder": lambda: dd.JumpReluAutoEncoder(16, 64),
            "AutoEncoderTopK": lambda: tr.top_k.AutoEncoderTopK(16, 64, 8),
            "BatchTopKSAE": lambda: tr.BatchTopKSAE(16, 64, 8)}
    if hasattr(tr, "MatryoshkaBatchTopKSAE"):
        made["MatryoshkaBatchTopKSAE"] = lambda: tr.MatryoshkaBatchTopKSAE(16, 64, 8, [16, 16, 32])
    for cls, make in made.items():
        ae = make()
        with torch.no_grad():
            for prm in ae.parameters():
                prm.copy_(torch.randn_like(prm) * 0.3)
            if hasattr(ae, "threshold") and ae.threshold.dim() == 0:
                ae.threshold.fill_(0.1)
        d = write_dl(tmp_path / cls, cls, {}, convert=False, k=8)
        torch.save(ae.state_dict(), d / "ae.pt")
        line = DL_CONVERT.replace("python", sys.executable, 1)  # the README's line, as the error prints it
        subprocess.run(line, shell=True, cwd=d, check=True)
        theirs, _ = dl_load(str(d), "cpu")
        with torch.no_grad():
            want = theirs.encode(x).detach()
        got = dense(load_dictionary(d, max_codes=63), x)
        assert (want > 0).any() and float((got - want).abs().max()) < 1e-4, (cls, dl.__name__)


@pytest.mark.parametrize("arch", ["transcoder", "jumprelu_transcoder"])
def test_saelens_transcoders_encode_without_centring_and_round_trip(tmp_path, arch):
    """SAELens' Transcoder.encode: relu(x @ W_enc + b_enc) (JumpReLU: times pre > threshold), never x - b_dec; its
    decoder writes hook_name_out. featuretree's save is SAELens' layout again (b_enc un-folded)."""
    w = random_weights(16, 48, seed=9)
    saved = dict(w) if arch == "jumprelu_transcoder" else {k: v for k, v in w.items() if k != "threshold"}
    d = write_saelens(tmp_path / arch, arch, saved, apply_b_dec=False,
                      extra={"d_out": 16, "hook_name": "blocks.2.ln2.hook_normalized",
                             "hook_name_out": "blocks.2.hook_mlp_out"})
    x = torch.randn(300, 16)
    sae = load_dictionary(d, max_codes=47)
    pre = x @ w["W_enc"] + w["b_enc"]
    want = torch.relu(pre) * (pre > w["threshold"]) if arch == "jumprelu_transcoder" else torch.relu(pre)
    assert torch.allclose(dense(sae, x), want, atol=1e-5)
    assert sae.metadata["transcoder"] and sae.metadata["hook_name_out"] == "blocks.2.hook_mlp_out"
    v, i = sae.encode(x)
    assert torch.allclose(sae.decode(v, i), want @ w["W_dec"] + w["b_dec"], atol=1e-4)  # in the output's space
    again = sae.save(tmp_path / "resaved")
    cfg = json.loads((again / "cfg.json").read_text())
    assert cfg["architecture"] == arch and cfg["apply_b_dec_to_input"] is False and cfg["d_out"] == 16
    from safetensors.torch import load_file

    assert torch.allclose(load_file(str(again / "sae_weights.safetensors"))["b_enc"], w["b_enc"], atol=1e-5)
    assert torch.allclose(dense(load_dictionary(again), x), want, atol=1e-5)


def test_a_ladder_is_all_transcoders_or_none():
    from featuretree.ladders import ladder_site

    t = ThresholdSAE(8, 16, metadata={"hook_name": "blocks.1.ln2.hook_normalized", "transcoder": True,
                                      "hook_name_out": "blocks.1.hook_mlp_out"})
    site = ladder_site({"w16": t})
    assert site["kind"] == "mlp_in" and site["out"] == {"hook_name": "blocks.1.hook_mlp_out", "layer": 1,
                                                        "kind": "mlp_out", "path": None}
    with pytest.raises(FeatureTreeError, match="mixes transcoders and SAEs"):
        ladder_site({"w16": t, "w32": ThresholdSAE(8, 32, metadata={"hook_name": "blocks.1.ln2.hook_normalized"})})


def test_a_skip_transcoder_fires_as_a_transcoder_and_its_skip_path_counts_in_the_fvu(tmp_path):
    """SAELens' SkipTranscoder: output = decode(encode(x)) + x @ W_skip.T; the skip path is not a feature, so
    the codes are the transcoder's and only the reconstruction (FVU against the output) includes it."""
    from featuretree.ladders import measure

    w = random_weights(16, 48, seed=11)
    w["W_skip"] = torch.randn(16, 16) * 0.2
    d = write_saelens(tmp_path / "skip", "jumprelu_skip_transcoder", w, apply_b_dec=False,
                      extra={"d_out": 16, "hook_name": "blocks.2.ln2.hook_normalized",
                             "hook_name_out": "blocks.2.hook_mlp_out"})
    sae = load_dictionary(d, max_codes=47)
    x, y = torch.randn(400, 16), torch.randn(400, 16)
    pre = x @ w["W_enc"] + w["b_enc"]
    codes = torch.relu(pre) * (pre > w["threshold"])
    assert torch.allclose(dense(sae, x), codes, atol=1e-5)
    out = codes @ w["W_dec"] + w["b_dec"] + x @ w["W_skip"].T
    fvu = float((y - out).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert measure({"w48": sae}, x, targets=y)["w48"]["fvu"] == pytest.approx(fvu, rel=1e-4)
    again = load_dictionary(sae.save(tmp_path / "resaved"))
    assert json.loads((tmp_path / "resaved" / "cfg.json").read_text())["architecture"] == "jumprelu_skip_transcoder"
    assert torch.equal(again.W_skip, sae.W_skip) and torch.allclose(dense(again, x), codes, atol=1e-5)
