"""Compiled selection kernels: top-k = torch.topk's set (ties, -inf, odd widths), int8 ranking keeps the true
top-k among its candidates, dots = a gathered matmul, and everything falls back to torch without a compiler."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from featuretree import native
from featuretree.native import csr_pattern, dots, int8_candidates, quantize_int8, refine_topk, topk_indices

needs_kernels = pytest.mark.skipif(not native.available(), reason="no C++ compiler here (CI has one)")


def _same_set(pre, idx, m):
    ref = pre.topk(m, dim=1).values.sort(1).values
    got = pre.gather(1, idx).sort(1).values
    distinct = (idx.sort(1).values.diff(dim=1) > 0).all()
    return bool(distinct) and torch.equal(got, ref)


@pytest.mark.parametrize("n,width,m", [(64, 4096, 40), (33, 1000, 7), (5, 50, 50), (7, 63, 1), (300, 16384, 24)])
def test_topk_indices_matches_torch(n, width, m):
    g = torch.Generator().manual_seed(width + m)
    pre = torch.randn(n, 32, generator=g) @ torch.randn(32, width, generator=g)
    assert _same_set(pre, topk_indices(pre, m), m)


def test_ties_masks_and_negative_rows():
    g = torch.Generator().manual_seed(1)
    pre = torch.randint(-3, 4, (50, 2048), generator=g).float()  # heavy ties
    pre[:, ::3] = float("-inf")  # masked features, as AuxK does
    pre[7] = -torch.rand(2048, generator=g) - 5  # a row of negatives only
    for m in (1, 16, 600):
        assert _same_set(pre, topk_indices(pre, m), m)


@needs_kernels
def test_int8_candidates_contain_the_exact_topk():
    g = torch.Generator().manual_seed(2)
    x, W, b = torch.randn(256, 48, generator=g), torch.randn(48, 3000, generator=g) / 7, torch.randn(3000, generator=g)
    pre = x @ W + b
    exact = pre.topk(16, dim=1).indices
    cand = int8_candidates(x, W, b, 16 + 16)
    found = (exact.unsqueeze(2) == cand.unsqueeze(1)).any(2).float().mean()
    assert found > 0.999  # int8 rounding may only swap near-ties
    among = torch.rand(3000, generator=g) < 0.3
    cand = int8_candidates(x, W, b, 20, among)
    assert bool(among[cand].all())


def test_quantize_int8_roundtrip():
    t = torch.randn(40, 30)
    q, s = quantize_int8(t, dim=0)
    assert q.dtype == torch.int8 and s.shape == (1, 30)
    assert (q.float() * s - t).abs().max() <= s.max() / 2 + 1e-6
    q, s = quantize_int8(torch.zeros(3, 4), dim=1)  # all-zero rows: scale 1, not a division by zero
    assert bool((q == 0).all()) and bool((s == 1).all())


def test_dots_matches_gathered_matmul():
    g = torch.Generator().manual_seed(3)
    a, B = torch.randn(70, 37, generator=g), torch.randn(500, 37, generator=g)  # d not a multiple of 16
    idx = torch.randint(0, 500, (70, 9), generator=g)
    assert torch.allclose(dots(a, B, idx), (a @ B.T).gather(1, idx), atol=1e-4)
    with pytest.raises(ValueError, match="idx must lie"):
        dots(a, B, idx + 500)


def test_refine_topk_is_exact_over_candidates():
    g = torch.Generator().manual_seed(4)
    a, Bt, b = torch.randn(90, 40, generator=g), torch.randn(700, 40, generator=g), torch.randn(700, generator=g)
    cand = torch.stack([torch.randperm(700, generator=g)[:30] for _ in range(90)])
    among = torch.rand(700, generator=g) < 0.8
    v, i = refine_topk(a, Bt, b, cand, 12, among)
    score = (a @ Bt.T + b).masked_fill(~among, float("-inf")).gather(1, cand)
    ref_v, ref_j = score.topk(12, dim=1)
    assert torch.allclose(v.sort(1, descending=True).values, ref_v, atol=1e-4)
    assert torch.equal(i.sort(1).values, cand.gather(1, ref_j).sort(1).values)


def test_bad_arguments():
    with pytest.raises(ValueError, match="m must be"):
        topk_indices(torch.zeros(2, 5), 6)
    with pytest.raises(ValueError, match="float32"):
        topk_indices(torch.zeros(2, 5, dtype=torch.float64), 2)
    with pytest.raises(ValueError, match="k must be"):
        refine_topk(torch.zeros(2, 3), torch.zeros(5, 3), torch.zeros(5), torch.zeros(2, 2, dtype=torch.long), 3)
    if native.available():
        with pytest.raises(ValueError, match="indices must lie"):
            csr_pattern(torch.tensor([[0, 9]]), 5)
    with pytest.raises(ValueError, match="do not chain"):
        dots(torch.zeros(2, 5), torch.zeros(4, 6), torch.zeros(2, 1, dtype=torch.long))


def test_kernels_compile_here():
    """CI has a compiler (.ci/run installs g++): the fast path must really be in use there."""
    assert native.available()


def test_without_compiler_falls_back_to_torch(tmp_path):
    code = ("import torch\nfrom featuretree import native\n"
            "assert not native.available() and not native.fast_int8_matmul()\n"
            "pre = torch.randn(4, 300)\n"
            "i = native.topk_indices(pre, 5)\n"
            "assert torch.equal(i.sort(1).values, pre.topk(5, dim=1).indices.sort(1).values)\n"
            "a, B, j = torch.randn(4, 8), torch.randn(30, 8), torch.randint(0, 30, (4, 3))\n"
            "assert torch.allclose(native.dots(a, B, j), (a @ B.T).gather(1, j), atol=1e-5)\n"
            "order, crow, col = native.csr_pattern(torch.tensor([[2, 0], [2, 1]]), 3)\n"
            "assert order.tolist() == [1, 3, 0, 2] and crow.tolist() == [0, 1, 2, 4] and col.tolist() == [0, 1, 0, 1]\n"
            "v, i = native.refine_topk(a, B, torch.zeros(30), j, 2)\n"
            "assert torch.allclose(v.sort(1).values, (a @ B.T).gather(1, j).topk(2, 1).values.sort(1).values)\n"
            "from featuretree import TopKSAE\n"
            "v, i = TopKSAE(8, 2048, 4).encode(torch.randn(5, 8))\n"
            "assert i.shape == (5, 4)\n")
    env = {"PATH": "/nonexistent", "CXX": str(tmp_path / "no-compiler"), "FEATURETREE_CACHE": str(tmp_path),
           "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "using torch ops" in r.stderr


@pytest.mark.slow
def test_training_and_encoding_tests_pass_without_the_native_kernels():
    """FEATURETREE_NATIVE=0: the device-agnostic torch path (the one CUDA takes) passes the same SAE and
    training tests, gradients against the dense reference included."""
    here = Path(__file__).parent
    env = {**os.environ, "FEATURETREE_NATIVE": "0"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here / "test_sae.py"),
                        str(here / "test_train.py")], env=env, capture_output=True, text=True, timeout=600,
                       cwd=here.parent)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout
