"""Dictionaries researchers already have as rungs (issue 18): each architecture's encoding equals the formula
its library uses (checked by hand here, and against SAELens itself when sae_lens is installed), files in
SAELens' / Gemma Scope's layouts load, Matryoshka prefixes become rungs, a mixed ladder (JumpReLU + TopK)
links a planted hierarchy as truly as an all-TopK one, and releases resolve from a fake local Hugging Face
cache, never the network."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from featuretree.config import FeatureTreeError
from featuretree.dictionaries import ThresholdSAE, load_dictionary
from featuretree.eval import edge_scores, planted_hierarchy
from featuretree.firing import fire
from featuretree.ladders import load_ladder, measure, to_jumprelu
from featuretree.train import train_ladder
from featuretree.tree import link
from featuretree.utils import save_tensors


def random_weights(d: int, w: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(d, w, generator=g) / d ** 0.5, "b_enc": torch.randn(w, generator=g) * 0.1,
            "W_dec": torch.randn(w, d, generator=g), "b_dec": torch.randn(d, generator=g) * 0.1,
            "threshold": torch.rand(w, generator=g) * 0.3}


def write_saelens(path, arch: str, weights: dict, *, apply_b_dec: bool = True, extra: dict | None = None):
    """A dictionary as SAELens' save_model writes it: cfg.json + sae_weights.safetensors."""
    d, w = weights["W_enc"].shape
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"architecture": arch, "d_in": d, "d_sae": w, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": apply_b_dec, "normalize_activations": "none", "hook_name": "blocks.3.hook_resid_post",
           "metadata": {"model_name": "tiny"}, **(extra or {})}
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_tensors(path / "sae_weights.safetensors", weights)
    return path


def saelens_formula(arch: str, w: dict, x: torch.Tensor, apply_b_dec: bool = True, topk_threshold=None):
    """SAELens' encode, written out: hidden_pre = (x - b_dec * apply_b_dec) @ W_enc + b_enc, then
    standard: relu; jumprelu: relu(pre) * (pre > threshold); batchtopk at inference: jumprelu at one threshold."""
    pre = (x - w["b_dec"] * float(apply_b_dec)) @ w["W_enc"] + w["b_enc"]
    if arch == "standard":
        return torch.relu(pre)
    t = w["threshold"] if topk_threshold is None else torch.full_like(w["b_enc"], topk_threshold)
    return torch.relu(pre) * (pre > t)


def dense(sae, x):
    v, i = sae.encode(x)
    return torch.zeros(x.shape[0], sae.width).scatter_(1, i, v)


@pytest.mark.parametrize("arch,apply_b_dec", [("jumprelu", True), ("jumprelu", False), ("standard", True),
                                              ("batchtopk", True), ("matryoshka_batchtopk", True)])
def test_saelens_layouts_encode_as_saelens_does(tmp_path, arch, apply_b_dec):
    w = random_weights(16, 48, seed=1)
    x = torch.randn(200, 16)
    saved = dict(w)
    extra_t = None
    if arch == "standard":
        saved.pop("threshold")
    if "batchtopk" in arch:  # the training layout: one scalar threshold
        saved.pop("threshold")
        saved["topk_threshold"] = torch.tensor(0.15)
        extra_t = 0.15
    extra = {"matryoshka_widths": [16, 48]} if arch.startswith("matryoshka") else None
    d = write_saelens(tmp_path / arch, arch, saved, apply_b_dec=apply_b_dec, extra=extra)
    sae = load_dictionary(d, max_codes=47)
    if extra:  # its prefixes are a ladder
        assert list(load_ladder(d)) == ["w16", "w48"]
    assert isinstance(sae, ThresholdSAE)
    want = saelens_formula(arch, w, x, apply_b_dec, extra_t)
    got = dense(sae, x)
    assert (want > 0).any() and (want == 0).any()
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
    again = load_dictionary(sae.save(tmp_path / "resaved"))  # featuretree's own save reads back the same
    assert torch.equal(dense(again, x), got) and again.architecture == sae.architecture


def test_gemma_scope_npz_and_refusals(tmp_path):
    w = random_weights(8, 24, seed=2)
    (tmp_path / "gs").mkdir()
    np.savez(tmp_path / "gs" / "params.npz", **{k: v.numpy() for k, v in w.items()})
    sae = load_dictionary(tmp_path / "gs")
    x = torch.randn(50, 8)
    assert torch.allclose(dense(sae, x), saelens_formula("jumprelu", w, x, apply_b_dec=False), atol=1e-5)
    with pytest.raises(FeatureTreeError, match=r"W_skip has shape missing, expected \(8, 8\)"):
        load_dictionary(write_saelens(tmp_path / "tc", "skip_transcoder", w))
    with pytest.raises(FeatureTreeError, match="from d_in 8 to d_out 16"):
        load_dictionary(write_saelens(tmp_path / "t16", "transcoder", w, extra={"d_out": 16}))
    with pytest.raises(FeatureTreeError, match="architecture 'crosscoder' is not one featuretree reads"):
        load_dictionary(write_saelens(tmp_path / "cc", "crosscoder", w))
    with pytest.raises(FeatureTreeError, match="needs a 'threshold'"):
        load_dictionary(write_saelens(tmp_path / "j", "jumprelu", {k: v for k, v in w.items() if k != "threshold"}))
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / "cfg.json").write_text("{}")
    (tmp_path / "dl" / "ae.pt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(FeatureTreeError, match="never unpickles"):
        load_dictionary(tmp_path / "dl")


def test_codes_over_the_cap_keep_the_strongest():
    sae = ThresholdSAE(4, 10, 0.0, architecture="relu", max_codes=3)
    with torch.no_grad():
        sae.W_enc.copy_(torch.ones(4, 10) * torch.arange(1, 11).float() / 10)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    v, i = sae.encode(torch.ones(2, 4))
    assert sorted(i[0].tolist()) == [7, 8, 9] and sae.over_cap == 2


def test_matryoshka_prefixes_are_rungs(tmp_path):
    w = random_weights(8, 64, seed=3)
    d = write_saelens(tmp_path / "m", "jumprelu", w, extra={"matryoshka_widths": [16, 32]})
    ladder = load_ladder(d)
    assert list(ladder) == ["w16", "w32", "w64"]
    x = torch.randn(30, 8)
    full = dense(ladder["w64"], x)
    assert torch.allclose(dense(ladder["w16"], x), full[:, :16])  # a prefix fires as its features do in the whole
    assert list(load_ladder(d, prefixes=[8, 48])) == ["w8", "w48", "w64"]
    with pytest.raises(FeatureTreeError, match="do not fit"):
        load_ladder(d, prefixes=[128])


def test_mixed_ladder_links_a_planted_hierarchy_like_topk(tmp_path):
    """The narrow rung as JumpReLU (the TopK rung's weights, thresholds at its firing thresholds), the wide
    ones TopK: the tree recovers the planted edges about as well as the all-TopK ladder."""
    p = planted_hierarchy(n_roots=8, branching=3, depth=2, d_model=32, n_tokens=40_000, seed=0)
    train, held = p.split(30_000)
    saes = train_ladder(train.acts, (12, 48), k=4, epochs=4, batch_size=512, seed=0, progress=False)
    topk = link(saes, held.acts)
    _, _, _, at = fire(saes[12], held.acts, with_thresholds=True)
    jump = to_jumprelu(saes[12], torch.as_tensor(at, dtype=torch.float32))
    mixed_dirs = [jump.save(tmp_path / "j12"), saes[48].save(tmp_path / "t48")]
    ladder = load_ladder(mixed_dirs)
    assert [type(s).__name__ for s in ladder.values()] == ["ThresholdSAE", "TopKSAE"]
    metrics = measure(ladder, held.acts)
    assert metrics["w12"]["l0"] > 0 and 0 < metrics["w48"]["fvu"] < 1
    mixed = link(ladder, held.acts)
    a, b = edge_scores(topk, held), edge_scores(mixed, held)
    assert b["precision"] >= 0.8 and b["recall"] >= a["recall"] - 0.15, (a, b)
    with pytest.raises(FeatureTreeError, match="d_model"):
        measure(ladder, torch.randn(10, 16))


def fake_cache(root, repo: str, files: dict[str, bytes]):
    """A Hugging Face hub cache holding `files` of `repo` at one snapshot (what huggingface-cli download leaves)."""
    base = root / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / ("a" * 40)
    for rel, data in files.items():
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        (snap / rel).write_bytes(data)
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text("a" * 40)
    return root


def test_releases_resolve_from_the_local_cache_only(tmp_path, monkeypatch):
    import featuretree.ladders as L

    src = {}
    for width in ("16k", "65k"):
        d = write_saelens(tmp_path / "src" / width, "jumprelu", random_weights(8, 16 if width == "16k" else 64, 4))
        for f in d.iterdir():
            src[f"layer_3/width_{width}/average_l0_20/{f.name}"] = f.read_bytes()
    cache = fake_cache(tmp_path / "hub", "org/scope", src)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ladder = load_ladder("org-scope", repo_id="org/scope", cache_dir=cache,
                         sae_ids=["layer_3/width_16k/average_l0_20", "layer_3/width_65k/average_l0_20"])
    assert list(ladder) == ["w16", "w64"]
    ids = {f"layer_{n}/width_{w}/canonical": f"layer_{n}/width_{w}/average_l0_20" for n in (3, 13) for w in ("16k", "65k")}
    table = {"org-scope-res": ("org/scope", ids, "gemma-2-2b"), "org-scope-mlp": ("org/scope", ids, "gemma-2-2b")}
    monkeypatch.setattr(L, "_release_table", lambda: table)  # what sae_lens' pretrained_saes.yaml would say
    ladder = load_ladder("org-scope-res", layer=3, widths=["16k", "65k"], cache_dir=cache)
    assert list(ladder) == ["w16", "w64"]
    # where it reads: the file's cfg says blocks.3.hook_resid_post; the release names the model
    assert L.ladder_site(ladder) == {"hook_name": "blocks.3.hook_resid_post", "layer": 3, "kind": "resid_post",
                                     "path": None, "model_name": "tiny", "out": None}
    # a release whose files do not say (Gemma Scope's params.npz): its folder's name does
    assert L._release_hook("org-scope-res", "layer_3/width_16k/average_l0_20") == "blocks.3.hook_resid_post"
    assert L._release_hook("jb", "gemma_2b_blocks.12.hook_resid_post_16384") == "blocks.12.hook_resid_post"
    mlp = L._release_hook("org-scope-mlp", "layer_3/width_16k/average_l0_20")
    assert mlp == "blocks.3.hook_mlp_out" and L.ladder_site({"w16": ThresholdSAE(8, 16, metadata={"hook_name": mlp})})[
        "kind"] == "mlp_out"
    with pytest.raises(FeatureTreeError, match="per-head hook_z"):
        L.ladder_site({"w16": ThresholdSAE(8, 16, metadata={"hook_name": L._release_hook("org-scope-att", "layer_3/x")})})
    with pytest.raises(FeatureTreeError, match=r"huggingface-cli download org/scope --include 'layer_13/width_16k"):
        load_ladder("org-scope-res", layer=13, widths=["16k"], cache_dir=cache)
    with pytest.raises(FeatureTreeError, match="not a SAELens release"):
        load_ladder("no-such-release", layer=3, cache_dir=cache)


def test_against_saelens_itself(tmp_path):
    """With sae_lens installed: dictionaries SAELens makes and saves encode the same in featuretree."""
    sl = pytest.importorskip("sae_lens")
    from sae_lens import SAE

    torch.manual_seed(0)
    x = torch.randn(300, 16)
    for arch, cls_cfg in (("jumprelu", "JumpReLUSAEConfig"), ("standard", "StandardSAEConfig"),
                          ("topk", "TopKSAEConfig"), ("gated", "GatedSAEConfig"), ("transcoder", "TranscoderConfig"),
                          ("jumprelu_transcoder", "JumpReLUTranscoderConfig"),
                          ("jumprelu_skip_transcoder", "JumpReLUSkipTranscoderConfig")):
        cfg_cls = getattr(sl, cls_cfg)
        kw = {"k": 8} if arch == "topk" else {"d_out": 16, "apply_b_dec_to_input": False} if "transcoder" in arch else {}
        sae = SAE.from_dict(cfg_cls(d_in=16, d_sae=64, **kw).to_dict())
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(torch.randn_like(p) * 0.3)
        sae.save_model(str(tmp_path / arch))
        ours = load_dictionary(tmp_path / arch, max_codes=63)
        with torch.no_grad():
            assert float((dense(ours, x) - sae.encode(x)).abs().max()) < 1e-4, arch


def test_hook_names_map_to_block_outputs():
    import featuretree.ladders as L

    assert [L.hook_layer(h) for h in ("blocks.12.hook_resid_post", "blocks.12.hook_resid_pre", "model.layers.7",
                                      "transformer.h.6", "layers.2", "encoder.layer.3", "resid_post_layer_5")] == [
        12, 11, 7, 6, 2, 3, 5]
    assert [L.hook_site(h)["kind"] for h in ("blocks.4.hook_mlp_out", "blocks.4.hook_attn_out", "model.layers.4.mlp")] \
        == ["mlp_out", "attn_out", "path"] and L.hook_site("transformer.h.4.mlp")["path"] == "mlp"
    assert L.hook_site("blocks.4.ln2.hook_normalized") == {"layer": 4, "kind": "mlp_in", "path": None}
    for bad, why in (("blocks.0.hook_resid_pre", "embeddings"), ("blocks.4.attn.hook_z", "hook_z"),
                     ("blocks.4.hook_resid_mid", "not a module's output")):
        with pytest.raises(FeatureTreeError, match=why):
            L.hook_layer(bad)
    with pytest.raises(FeatureTreeError, match="different hook_names"):
        L.ladder_site({"w16": ThresholdSAE(8, 16, metadata={"hook_name": "blocks.1.hook_resid_post"}),
                       "w32": ThresholdSAE(8, 32, metadata={"hook_name": "blocks.2.hook_resid_post"})})
    assert L.hf_model_name("pythia-70m-deduped") == "EleutherAI/pythia-70m-deduped"
    assert L.hf_model_name("smollm2") == "smollm2" and L.hf_model_name("all-MiniLM-L6-v2") == "all-MiniLM-L6-v2"


FAKE_SAE_LENS = '''
"""A stand-in for sae_lens' release directory (pretrained_saes.yaml), with one release."""
from dataclasses import dataclass, field


@dataclass
class PretrainedSAELookup:
    release: str
    repo_id: str
    model: str
    conversion_func: str | None = None
    saes_map: dict = field(default_factory=dict)


def get_pretrained_saes_directory():
    ids = {f"layer_2/width_{w}/canonical": f"layer_2/width_{w}/average_l0_9" for w in (16, 64)}
    return {"org-scope-res": PretrainedSAELookup("org-scope-res", "org/scope", "org/tiny-gpt", None, ids)}
'''


def test_build_a_release_by_name_offline(tmp_path):
    """`featuretree build --ladder RELEASE --release-ids ...` with nothing else: sae_lens' directory names the repo
    and the model, the dictionaries' cfg names the hook (blocks.2.hook_resid_post -> layer 2), the dictionaries
    and the model come from the local Hugging Face cache only, and the run is linked without training."""
    import os
    import subprocess
    import sys

    from _models import tiny_gpt2

    from featuretree.export import load
    from featuretree.sae import TopKSAE

    words = "the cat sat on a mat while dogs ran in parks and birds sang over green trees".split()
    model, tok = tiny_gpt2(words, n_layer=3)
    files = {}
    for w in (16, 64):
        d = TopKSAE(32, w, 4, seed=w, metadata={"hook_name": "blocks.2.hook_resid_post"}).save(tmp_path / f"s{w}")
        files.update({f"layer_2/width_{w}/average_l0_9/{f.name}": f.read_bytes() for f in d.iterdir()})
    cache = fake_cache(tmp_path / "hub", "org/scope", files)
    (tmp_path / "m").mkdir()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    fake_cache(cache, "org/tiny-gpt", {f.name: f.read_bytes() for f in (tmp_path / "m").iterdir() if f.is_file()})
    pkg = tmp_path / "fake" / "sae_lens" / "loading"
    pkg.mkdir(parents=True)
    (pkg.parent / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "pretrained_saes_directory.py").write_text(FAKE_SAE_LENS)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(words[i:] + words[:i]) for i in range(len(words))) * 3)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "fake"), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "featuretree", "-q", "build", "--ladder", "org-scope-res", "--release-ids",
           "layer_2/width_16/canonical", "layer_2/width_64/canonical", "--corpus", str(corpus), "--n-tokens", "400",
           "--out", str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    tree = load(out)
    assert tree.config.model == "org/tiny-gpt" and tree.config.layer == 2 and tree.rungs[:2] == ["w16", "w64"]
    assert tree.saes["w64"].metadata["release"] == "org-scope-res"
    r = subprocess.run(cmd[:-1] + [str(tmp_path / "run2"), "--layer", "1"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "--layer 1, but the dictionaries read blocks.2.hook_resid_post" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "run2").exists()
