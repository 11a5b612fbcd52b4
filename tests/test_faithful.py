"""Tests for featuretree.faithful: loss recovered and KL against a hand computation on a tiny GPT-2."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing may touch the network

import json  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _models import tiny_gpt2, tiny_gpt2_lm  # noqa: E402

from featuretree.config import FeatureTreeError  # noqa: E402
from featuretree.faithful import FAITHFUL_FILE, faithfulness, is_causal_lm  # noqa: E402
from featuretree.model import load_model  # noqa: E402
from featuretree.sae import TopKSAE  # noqa: E402

WORDS = "the a cat dog bird tree river sat runs sings on in under small red , .".split()
TEXTS = ["the cat sat on the small red tree .", "a dog runs", "the bird sings , the river runs under a tree"]
LAYER, D = 1, 32


@pytest.fixture(scope="module")
def lm():
    return tiny_gpt2_lm(WORDS, n_layer=2)


@pytest.fixture(scope="module")
def model(lm):
    return load_model(lm)


class Stub:
    """A dictionary with TopKSAE's encode / decode interface: the identity, or the zero map."""

    def __init__(self, zero=False):
        self.d_model, self.zero = D, zero

    def encode(self, x):
        return x, None

    def decode(self, values, indices):
        return torch.zeros_like(values) if self.zero else values


def _by_hand(lm, tok, sae, texts):
    """CE clean / zero / sae and KL(clean || sae), computed with a plain hook and F.cross_entropy on one batch."""
    module = lm[0]
    enc = tok(texts, padding=True, return_tensors="pt", return_special_tokens_mask=True, padding_side="right")
    attn = enc["attention_mask"].bool()
    splice = attn & ~enc["special_tokens_mask"].bool()  # the word tokenizer's only special token is BOS
    valid = attn[:, :-1] & attn[:, 1:]
    labels = enc["input_ids"][:, 1:][valid]

    def logits(replace):
        def hook(mod, args, out):
            h = out[0] if isinstance(out, tuple) else out
            h = h.clone()
            h[splice] = replace(h[splice])
            return (h, *out[1:]) if isinstance(out, tuple) else h

        handle = module.transformer.h[LAYER].register_forward_hook(hook) if replace else None
        try:
            with torch.no_grad():
                out = module(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        finally:
            if handle is not None:
                handle.remove()
        return out[:, :-1][valid].float()

    clean, zero, spliced = logits(None), logits(torch.zeros_like), logits(lambda x: sae.decode(*sae.encode(x)))
    ce = {k: float(F.cross_entropy(v, labels)) for k, v in (("clean", clean), ("zero", zero), ("sae", spliced))}
    kl = float(F.kl_div(F.log_softmax(spliced, -1), F.log_softmax(clean, -1), log_target=True,
                        reduction="batchmean"))
    return ce, kl, int(valid.sum())


def test_matches_a_hand_computation(lm, model):
    sae = TopKSAE(D, 64, 4, seed=0)
    ce, kl, n = _by_hand(lm, lm[1], sae, TEXTS)
    df = faithfulness(model, LAYER, {64: sae}, TEXTS, batch_size=2, progress=False)  # two batches, padded apart
    row = df.iloc[0]
    assert row.rung == "w64" and row.n_tokens == n == 9 + 3 + 10
    assert row.ce_clean == pytest.approx(ce["clean"], abs=1e-5)
    assert row.ce_zero == pytest.approx(ce["zero"], abs=1e-5)
    assert row.ce_sae == pytest.approx(ce["sae"], abs=1e-5)
    assert row.loss_recovered == pytest.approx((ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]), abs=1e-5)
    assert row.kl == pytest.approx(kl, abs=1e-5) and row.kl > 0


def test_identity_recovers_everything_and_zero_nothing(lm, model):
    df = faithfulness(model, LAYER, {"id": Stub(), "zero": Stub(zero=True), "w64": TopKSAE(D, 64, 4)}, TEXTS,
                      progress=False).set_index("rung")
    ce, _, _ = _by_hand(lm, lm[1], Stub(zero=True), TEXTS)  # a rung called "zero" is not the zero ablation
    assert (df.ce_zero == df.ce_zero.iloc[0]).all() and df.ce_zero.iloc[0] == pytest.approx(ce["zero"], abs=1e-5)
    assert df.loc["id", "loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert df.loc["id", "kl"] == pytest.approx(0.0, abs=1e-6)
    assert df.loc["id", "ce_sae"] == pytest.approx(df.loc["id", "ce_clean"], abs=1e-6)
    assert df.loc["zero", "loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert df.loc["zero", "ce_sae"] == pytest.approx(df.loc["zero", "ce_zero"], abs=1e-6)
    assert df.ce_clean.nunique() == 1 and (df.n_tokens == 22).all()


def test_max_tokens_caps_the_predictions(lm, model):
    df = faithfulness(model, LAYER, Stub(), TEXTS, max_tokens=10, progress=False)  # cut inside one batch
    assert df.n_tokens.tolist() == [10]
    ce, _, n = _by_hand(lm, lm[1], Stub(), TEXTS[:1])
    first = faithfulness(model, LAYER, Stub(), TEXTS[:1] + ["the cat"], max_tokens=n, batch_size=1, progress=False)
    assert first.n_tokens[0] == n == 9 and first.ce_clean[0] == pytest.approx(ce["clean"], abs=1e-5)


def test_refuses_encoders_and_mismatched_dictionaries(model):
    with pytest.raises(FeatureTreeError, match="causal LM with an LM head"):
        faithfulness(load_model(tiny_gpt2(WORDS)), 0, Stub(), TEXTS, progress=False)  # GPT2Model: no head
    with pytest.raises(FeatureTreeError, match="causal LM with an LM head"):
        faithfulness(load_model(), 3, TopKSAE(384, 64, 4), TEXTS, progress=False)  # the embedded MiniLM
    assert not is_causal_lm(load_model()) and is_causal_lm(model)
    with pytest.raises(FeatureTreeError, match="d_model 16 .* 32"):
        faithfulness(model, LAYER, {64: TopKSAE(16, 64, 4)}, TEXTS, progress=False)
    with pytest.raises(FeatureTreeError, match="layer 5 is out of range"):
        faithfulness(model, 5, Stub(), TEXTS, progress=False)
    with pytest.raises(FeatureTreeError, match="texts"):
        faithfulness(model, LAYER, Stub(), [], progress=False)


@pytest.fixture(scope="module")
def lm_dir(lm, tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2-lm")
    lm[0].save_pretrained(d)
    lm[1].save_pretrained(d)
    return d


def test_a_base_model_loaded_from_a_directory_gets_its_head(lm_dir, model):
    base = load_model(str(lm_dir))  # AutoModel: GPT2Model, no head; the checkpoint is a GPT2LMHeadModel
    assert type(base._module).__name__ == "GPT2Model" and is_causal_lm(base)
    sae = TopKSAE(D, 64, 4)
    a = faithfulness(base, LAYER, sae, TEXTS, progress=False)
    b = faithfulness(model, LAYER, sae, TEXTS, progress=False)
    assert a.drop(columns="rung").to_numpy() == pytest.approx(b.drop(columns="rung").to_numpy(), abs=1e-6)


def test_build_records_faithfulness_and_the_cli_prints_it(lm_dir, tmp_path, capsys):
    import featuretree as ft
    from featuretree.__main__ import main

    rng = random.Random(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))) for _ in range(80))
                      + "\n")
    run = tmp_path / "run"
    ft.build(ft.Config(model=str(lm_dir), corpus=str(corpus), layer=LAYER, n_tokens=600, widths=(8, 16), k=2,
                       epochs=1, batch_size=64), out=run, progress=False)
    table = json.loads((run / FAITHFUL_FILE).read_text())
    assert [r["rung"] for r in table["rungs"]] == ["w8", "w16"] and table["layer"] == LAYER
    for r in table["rungs"]:
        saved = json.loads((run / "saes" / r["rung"] / "cfg.json").read_text())["metadata"]["featuretree_metrics"]
        assert saved["loss_recovered"] == pytest.approx(r["loss_recovered"]) and saved["kl"] == pytest.approx(r["kl"])
        assert {"ce_clean", "ce_sae", "ce_zero", "fvu"} <= set(saved) and r["n_tokens"] > 0
    assert main(["-q", "info", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.count("loss recovered") == 2 and "KL" in out
    (run / FAITHFUL_FILE).unlink()
    assert main(["-q", "faithful", str(run), "--max-tokens", "40"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["rung", "ce_clean", "ce_zero", "ce_sae", "loss_recovered", "kl", "n_tokens"]
    assert [ln.split()[0] for ln in lines[1:3]] == ["w8", "w16"] and lines[1].split()[-1] == "40"
    assert json.loads((run / FAITHFUL_FILE).read_text())["rungs"][0]["n_tokens"] == 40
    assert main(["-q", "faithful", str(run), "--max-tokens", "0"]) == 2
    assert main(["-q", "faithful", str(tmp_path / "no-run")]) == 2
    err = [e for e in capsys.readouterr().err.splitlines() if e.startswith("featuretree: error:")]
    assert len(err) == 2 and "max_tokens=0" in err[0] and "no-run" in err[1]
