"""The CUDA path: the same dictionaries, gradients and trees on a GPU as on the CPU (skipped without CUDA).

Run on a machine with a GPU: `python -m pytest -q tests/test_gpu.py` (benchmarks/gpu_session.sh does, with
the GPU benchmark). On CPU-only machines every test here is skipped; the device-agnostic torch path they
exercise also runs on the CPU with FEATURETREE_NATIVE=0 (tests/test_native.py).
"""

import pytest
import torch

from featuretree import TopKSAE, link, train_ladder
from featuretree.eval import edge_scores, planted_hierarchy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def planted():
    return planted_hierarchy(n_roots=8, branching=3, depth=2, d_model=64, n_tokens=40_000, p_root=0.08,
                             p_child=0.9, child_cos=0.5, seed=2)


def test_encode_on_cuda_equals_cpu():
    sae = TopKSAE(64, 4096, 16, seed=0)
    x = torch.randn(2048, 64)
    v_cpu, i_cpu = sae.encode(x)
    sae_gpu = TopKSAE(64, 4096, 16, seed=0).cuda()
    v_gpu, i_gpu = sae_gpu.encode(x.cuda())
    same = (i_cpu.sort(1).values == i_gpu.cpu().sort(1).values).all(1).float().mean()
    assert same > 0.99  # near-ties may order differently
    assert torch.allclose(v_cpu.sort(1).values, v_gpu.cpu().sort(1).values, atol=1e-4)


def test_sparse_backward_on_cuda_matches_dense_autograd():
    torch.manual_seed(0)
    sae = TopKSAE(32, 512, 8, seed=1).cuda()
    x = torch.randn(256, 32, device="cuda")
    loss = (x - sae(x)).pow(2).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    dense = TopKSAE(32, 512, 8, seed=1).cuda()
    pre = (x - dense.b_dec) @ dense.W_enc + dense.b_enc
    _, idx = sae.encode(x)
    codes = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx).relu())
    ((x - (codes @ dense.W_dec + dense.b_dec)).pow(2).sum()).backward()
    for n, p in dense.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-3, rtol=1e-3), n


def test_ladder_on_cuda_learns_like_the_cpu_and_links_the_same_truth(planted):
    kw = dict(k=2, epochs=3, batch_size=512, progress=False, seed=0)
    cpu = train_ladder(planted.acts, (8, 32), **kw)
    gpu = train_ladder(planted.acts, (8, 32), device="cuda", **kw)
    assert {p.device.type for s in gpu.values() for p in s.parameters()} == {"cuda"}
    for w in (8, 32):
        assert abs(cpu[w].metrics["fvu"] - gpu[w].metrics["fvu"]) < 0.03
    on_cpu = {w: s.cpu() for w, s in gpu.items()}
    a, b = edge_scores(link(cpu, planted.acts), planted), edge_scores(link(on_cpu, planted.acts), planted)
    assert b["precision"] >= a["precision"] - 0.1 and b["recall"] >= a["recall"] - 0.1
