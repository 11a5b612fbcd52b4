"""Data parallel training with torch.distributed: 2 CPU processes on gloo (torchrun) match one process."""

import os
import subprocess
import sys

import pytest
import torch
from _models import tiny_gpt2

import featuretree as ft

pytestmark = pytest.mark.slow  # the quick loop (-m 'not slow') leaves it out

WORDS = ("the a cat dog bird tree river mountain house small large red runs jumps sings grows of in on with "
         "photosynthesis chlorophyll enzyme violin symphony anthrax bacterium infection geology basalt").split()
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    import random

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) for _ in range(500)]
    return ft.collect(ft.load_model(tiny_gpt2(WORDS, n_layer=1)), 0, texts, n_tokens=10_000,
                      out=tmp_path_factory.mktemp("acts"), progress=False)


def train(store, out, nproc: int) -> dict:
    args = ["-m", "featuretree", "-q", "train", str(store.path), "--widths", "16,64", "--k", "4", "--epochs", "3",
            "--batch-size", "256", "--out", str(out)]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 \
        else [sys.executable]
    done = subprocess.run([*launch, *args], env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {w: ft.TopKSAE.load(out / f"w{w}") for w in (16, 64)}, done.stdout


def test_two_gloo_processes_match_one(store, tmp_path):
    one, _ = train(store, tmp_path / "one", 1)
    two, printed = train(store, tmp_path / "two", 2)
    assert "on 2 processes" in printed
    for w in (16, 64):
        a, b = one[w], two[w]
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            pa, pb = getattr(a, name).detach(), getattr(b, name).detach()
            assert torch.allclose(pa, pb, atol=1e-4, rtol=1e-3), (w, name, float((pa - pb).abs().max()))
        assert abs(a.metrics["fvu"] - b.metrics["fvu"]) < 1e-4 and a.metrics["train_tokens"] == b.metrics["train_tokens"]
    assert not (tmp_path / "two" / "train.ckpt.safetensors").exists()  # rank 0 removed its checkpoint at the end
