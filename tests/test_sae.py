"""Conformance of TopKSAE: exactly k active, unit-norm rows, decode(encode(x)) == forward, sparse grads exact."""

import json

import pytest
import torch
import torch.nn.functional as F

from featuretree import FeatureTreeError, TopKSAE


def _sae(seed=0):
    torch.manual_seed(seed)
    sae = TopKSAE(d_model=12, width=48, k=5, seed=seed)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5)
        sae.b_dec.normal_(0, 0.5)
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
    return sae


def test_exactly_k_active_and_unit_rows():
    sae = _sae()
    x = torch.randn(64, 12) * 3
    values, indices = sae.encode(x)
    assert values.shape == indices.shape == (64, 5)
    assert (values >= 0).all()
    # k distinct indices per row, and they are the k largest pre-activations
    assert all(len(set(r.tolist())) == 5 for r in indices)
    pre = sae.preacts(x)
    kth = pre.topk(5, dim=1).values[:, -1:]
    assert (pre.gather(1, indices) >= kth - 1e-5).all()
    assert torch.allclose(values, F.relu(pre.gather(1, indices)), atol=1e-5)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(48), atol=1e-5)
    assert int((sae.dense_codes(x) != 0).sum(1).max()) <= 5


def test_decode_encode_is_forward_and_matches_dense_maths():
    sae = _sae(1)
    x = torch.randn(32, 12)
    v, i = sae.encode(x)
    assert torch.allclose(sae.decode(v, i), sae(x))
    dense = sae.dense_codes(x) @ sae.W_dec + sae.b_dec
    assert torch.allclose(sae(x), dense, atol=1e-5)


def test_sparse_backward_matches_dense_autograd():
    sae = _sae(2)
    x = torch.randn(40, 12)
    ((sae(x) - x) ** 2).sum().backward()
    fast = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    top, idx = pre.topk(5, dim=1)
    z = torch.zeros_like(pre).scatter(1, idx, F.relu(top))
    ((z @ sae.W_dec + sae.b_dec - x) ** 2).sum().backward()
    for n, p in sae.named_parameters():
        assert torch.allclose(p.grad, fast[n], rtol=1e-4, atol=1e-4), n


def test_masked_encode_picks_only_allowed_features():
    sae = _sae(3)
    among = torch.zeros(48, dtype=torch.bool)
    among[10:20] = True
    _, idx = sae.encode(torch.randn(16, 12), k=3, among=among)
    assert ((idx >= 10) & (idx < 20)).all()


def test_save_load_roundtrip_saelens_layout(tmp_path):
    sae = _sae(4)
    sae.metrics = {"fvu": 0.25}
    d = sae.save(tmp_path / "w48")
    cfg = json.loads((d / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["d_in"] == 12 and cfg["d_sae"] == 48 and cfg["k"] == 5
    back = TopKSAE.load(d)
    for n, p in sae.state_dict().items():
        assert torch.equal(p, back.state_dict()[n]), n
    assert back.metrics == {"fvu": 0.25}
    x = torch.randn(8, 12)
    assert torch.equal(sae(x), back(x))


def test_bad_arguments_and_files(tmp_path):
    with pytest.raises(FeatureTreeError, match="below width"):
        TopKSAE(8, 16, 16)
    with pytest.raises(FeatureTreeError, match="not a saved dictionary"):
        TopKSAE.load(tmp_path)
    d = _sae().save(tmp_path / "s")
    cfg = json.loads((d / "cfg.json").read_text())
    cfg["d_sae"] = 49
    (d / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(FeatureTreeError, match="shape"):
        TopKSAE.load(d)
    (d / "sae_weights.safetensors").write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(FeatureTreeError, match="safetensors"):
        TopKSAE.load(d)


def _wide_sae(width=2048, d=32, k=8, seed=5):
    torch.manual_seed(seed)
    sae = TopKSAE(d_model=d, width=width, k=k, seed=seed)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae


def test_int8_selection_matches_exact_fp32_topk():
    """Wide dictionaries rank features with an int8 matmul; the chosen set and values match fp32's."""
    sae = _wide_sae()
    sae.int8_select = True  # whatever this CPU would choose
    x = torch.randn(512, 32)
    v_fast, i_fast = sae.encode(x)
    sae.int8_select = False
    v_ref, i_ref = sae.encode(x)
    same = (i_fast.sort(1).values == i_ref.sort(1).values).all(1).float().mean()
    assert same > 0.99  # only exact near-ties may differ
    rows = (i_fast.sort(1).values == i_ref.sort(1).values).all(1)
    assert torch.allclose(v_fast.sort(1).values[rows], v_ref.sort(1).values[rows], atol=1e-5)  # values are fp32


@pytest.mark.parametrize("int8", [True, False])
def test_fast_path_gradients_match_dense_reference_when_wide(int8):
    sae = _wide_sae(seed=6)
    sae.int8_select = int8
    x = torch.randn(64, 32)
    values, indices = sae.encode(x)
    ((sae.decode(values, indices) - x) ** 2).sum().backward()
    fast = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    z = torch.zeros_like(pre).scatter(1, indices, F.relu(pre.gather(1, indices)))  # same chosen set
    ((z @ sae.W_dec + sae.b_dec - x) ** 2).sum().backward()
    for n, p in sae.named_parameters():
        assert torch.allclose(p.grad, fast[n], rtol=1e-4, atol=1e-4), n


def test_sampled_dots_and_csr_pattern():
    from featuretree.native import csr_pattern, sampled_dots

    a, B = torch.randn(50, 16), torch.randn(16, 300)
    idx = torch.stack([torch.randperm(300)[:7] for _ in range(50)])
    assert torch.allclose(sampled_dots(a, B, idx), (a @ B).gather(1, idx), atol=1e-5)
    order, crow, col = csr_pattern(idx, 300)
    flat = idx.reshape(-1)[order]
    assert (flat[1:] >= flat[:-1]).all() and crow[-1] == idx.numel()
    assert torch.equal(torch.bincount(idx.reshape(-1), minlength=300), crow[1:] - crow[:-1])
    assert torch.equal(idx[col, order % 7], flat)
    assert torch.equal(order, idx.reshape(-1).argsort(stable=True))  # stable: equal features keep token order
