"""train_ladder: one pass trains every rung; metrics are right; AuxK keeps features alive."""

import pytest
import torch

from featuretree import FeatureTreeError, TopKSAE, train_ladder
from featuretree.checkpoint import Resume
from featuretree.train import evaluate


def _sparse_data(n=20_000, d=24, n_feat=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(n_feat, d, generator=g), dim=1)
    on = torch.rand(n, n_feat, generator=g) < 3 / n_feat
    coef = on * (0.5 + torch.rand(n, n_feat, generator=g))
    return coef @ dirs + 0.01 * torch.randn(n, d, generator=g)


def test_ladder_learns_and_reports_metrics(tmp_path):
    x = _sparse_data()
    saes = train_ladder(x[:16_000], (16, 64), k=4, epochs=8, batch_size=512, eval_acts=x[16_000:], progress=False,
                        out=tmp_path)
    assert sorted(saes) == [16, 64]
    m16, m64 = saes[16].metrics, saes[64].metrics
    for m in (m16, m64):
        assert {"fvu", "l0", "dead_fraction", "train_tokens"} <= set(m)
        assert m["train_tokens"] == 8 * 16_000  # every rung saw every batch of every epoch
        assert 0 < m["l0"] <= 4
    assert m64["fvu"] < 0.2, m64  # the planted dictionary is learnable at width 64
    assert m64["fvu"] < m16["fvu"]  # wider resolves more
    assert m64["dead_fraction"] < 0.2
    assert (tmp_path / "w64" / "sae_weights.safetensors").is_file() and (tmp_path / "metrics.json").is_file()
    assert torch.allclose(saes[64].W_dec.norm(dim=1), torch.ones(64), atol=1e-4)


def test_evaluate_fvu_is_exact():
    sae = TopKSAE(4, 8, 4, seed=0)
    with torch.no_grad():  # an identity-like dictionary reconstructs 4-sparse data exactly
        sae.W_dec.copy_(torch.cat([torch.eye(4), -torch.eye(4)]))
        sae.W_enc.copy_(sae.W_dec.t())
    x = torch.randn(256, 4)
    m = evaluate(sae, [x])
    assert m["fvu"] < 1e-10 and m["n_tokens"] == 256


def test_auxk_revives_dead_features():
    x = _sparse_data(n=12_000, seed=1)
    common = dict(widths=(128,), k=4, epochs=4, batch_size=512, eval_acts=x, progress=False, seed=3)
    # start with half the features pointing away from the data so they never win the top-k
    def run(alpha):
        torch.manual_seed(0)
        from featuretree import train as tr

        orig = tr.TopKSAE.__init__

        def init(self, *a, **kw):
            orig(self, *a, **kw)
            with torch.no_grad():  # weak encoders: small positive pre-activations that never make the top-k
                self.W_enc[:, 64:] *= 0.05

        tr.TopKSAE.__init__ = init
        try:
            return train_ladder(x, auxk_alpha=alpha, dead_tokens=2048, **common)[128].metrics["dead_fraction"]
        finally:
            tr.TopKSAE.__init__ = orig

    without, with_aux = run(0.0), run(1 / 32)
    assert without > 0.3  # the handicapped half stays dead without AuxK
    assert with_aux < without / 2


def test_bad_widths_and_nan():
    x = torch.randn(100, 8)
    with pytest.raises(FeatureTreeError, match="increasing"):
        train_ladder(x, (64, 32), k=4, progress=False)
    with pytest.raises(FeatureTreeError, match="below the narrowest"):
        train_ladder(x, (8, 32), k=8, progress=False)
    x[3, 2] = float("nan")
    with pytest.raises(FeatureTreeError, match="NaN"):
        train_ladder(x, (16,), k=4, batch_size=50, progress=False)


def test_callback_sees_every_step():
    x = _sparse_data(n=3000)
    seen = []
    train_ladder(x, (16, 32), k=2, epochs=2, batch_size=1000, progress=False,
                 callback=lambda step, tokens, fvu: seen.append((step, tokens, sorted(fvu))))
    assert [s for s, _, _ in seen] == list(range(1, 7))
    assert [t for _, t, _ in seen] == [1000 * i for i in range(1, 7)]
    assert all(w == [16, 32] for _, _, w in seen)


def test_nested_ladder_prefixes_share_features_and_each_reconstructs():
    """nested=True: every rung is a prefix of one dictionary, and each prefix alone reconstructs the input."""
    torch.manual_seed(0)
    x = torch.randn(6000, 16) @ torch.randn(16, 16)
    saes = train_ladder(x, (8, 32, 64), k=3, epochs=3, batch_size=256, progress=False, nested=True)
    assert sorted(saes) == [8, 32, 64]
    assert torch.equal(saes[8].W_dec, saes[64].W_dec[:8]) and torch.equal(saes[32].W_enc, saes[64].W_enc[:, :32])
    flat = train_ladder(x, (8, 64), k=3, epochs=3, batch_size=256, progress=False)
    assert saes[8].metrics["fvu"] < 0.7  # the 8-feature prefix alone is a working SAE (untrained: FVU > 1)
    assert saes[64].metrics["fvu"] < flat[64].metrics["fvu"] + 0.05  # nesting costs the wide rung little
    assert saes[8].metrics["fvu"] > saes[32].metrics["fvu"] > saes[64].metrics["fvu"]


def test_training_resumes_from_its_checkpoint_bit_for_bit(tmp_path):
    import pytest

    from featuretree import FeatureTreeError

    x = torch.randn(6000, 16, generator=torch.Generator().manual_seed(0))
    kw = dict(k=4, epochs=2, batch_size=256, progress=False)
    ref = train_ladder(x, (32, 64), **kw)
    ckpt = tmp_path / "train.safetensors"

    class Killed(Exception):
        pass

    def dies_at(n):
        def callback(step, seen, fvu):
            if step == n:
                raise Killed
        return callback

    for n in (1, 20, 40):  # killed early, mid-epoch and in the second epoch; each time resumed
        with pytest.raises(Killed):
            train_ladder(x, (32, 64), checkpoint=Resume(ckpt, every=0), callback=dies_at(n), **kw)
        assert ckpt.is_file()
    resumed = train_ladder(x, (32, 64), checkpoint=Resume(ckpt, every=0), **kw)
    for w in (32, 64):
        assert all(torch.equal(a, b) for a, b in zip(ref[w].parameters(), resumed[w].parameters()))
        assert ref[w].metrics == resumed[w].metrics
    assert not ckpt.exists()  # removed once training ended
    with pytest.raises(Killed):
        train_ladder(x, (32, 64), checkpoint=Resume(ckpt, every=0), callback=dies_at(5), **kw)
    with pytest.raises(FeatureTreeError, match="other settings or data"):
        train_ladder(x, (32, 64), checkpoint=ckpt, **{**kw, "k": 2})
    with pytest.raises(FeatureTreeError, match="other settings or data"):
        train_ladder(x + 1, (32, 64), checkpoint=ckpt, **kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_asked_for_without_one_is_one_clear_error():
    with pytest.raises(FeatureTreeError, match="sees no CUDA GPU"):
        train_ladder(torch.randn(256, 8), (16,), 2, device="cuda", progress=False)
    with pytest.raises(FeatureTreeError, match="is not a device"):
        train_ladder(torch.randn(256, 8), (16,), 2, device="gpu", progress=False)


def test_ladder_trains_on_the_cpu_device_it_was_given():
    x = torch.randn(2048, 8, generator=torch.Generator().manual_seed(0))
    a = train_ladder(x, (16, 32), 2, epochs=1, batch_size=256, progress=False)
    b = train_ladder(x, (16, 32), 2, epochs=1, batch_size=256, progress=False, device="cpu")
    assert all(torch.equal(p, q) for w in a for p, q in zip(a[w].parameters(), b[w].parameters()))
    assert {p.device.type for s in b.values() for p in s.parameters()} == {"cpu"}
