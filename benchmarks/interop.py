"""Interop check, run in benchmarks/.venv (SAELens and sparsify installed): each library loads the other's files.

    bash benchmarks/setup_env.sh && benchmarks/.venv/bin/pip install sae-lens torch==2.13.0
    benchmarks/.venv/bin/python benchmarks/interop.py

1. featuretree harvests MiniLM layer 3 and trains a TopK dictionary, saves it (cfg.json + sae_weights.safetensors);
   SAELens' `SAE.load_from_disk` loads it and must encode and decode the held-out tokens as featuretree does.
2. SAELens saves a TopK SAE (`save_model`); featuretree's `TopKSAE.load` must read it and agree.
3. sparsify saves a SparseCoder (cfg.json + sae.safetensors); featuretree's `TopKSAE.load` must read it and agree;
   a list of such dictionaries links into a tree with `ft.link`.
"""

import importlib.metadata as md
import tempfile
from pathlib import Path

import torch

import featuretree as ft


def same(a, b) -> bool:
    return bool(torch.allclose(a, b, atol=1e-5, rtol=1e-5))


def main() -> None:
    from sae_lens import SAE
    from sparsify import SparseCoder, SparseCoderConfig

    tmp = Path(tempfile.mkdtemp(prefix="featuretree-interop-"))
    acts = ft.collect(ft.load_model(), 3, ft.load_corpus("wordnet", limit=2000), n_tokens=20_000, out=tmp / "acts",
                      progress=False)
    x = acts.load("heldout")
    saes = ft.train_ladder(acts, (128, 512), k=8, epochs=2, batch_size=512, progress=False)
    ours = saes[512]
    ours.save(tmp / "ft-w512")
    theirs = SAE.load_from_disk(str(tmp / "ft-w512"), device="cpu")
    with torch.no_grad():
        v, i = ours.encode(x)
        dense = torch.zeros(len(x), ours.width).scatter_(1, i, v)
        codes = theirs.encode(x)
        print(f"1. SAELens {md.version('sae-lens')} loads featuretree's w512 ({type(theirs).__name__}, "
              f"d_in {theirs.cfg.d_in}, d_sae {theirs.cfg.d_sae}, k {theirs.cfg.k}); on {len(x)} held-out tokens "
              f"encode equal: {same(codes, dense)}, decode equal: {same(theirs.decode(codes), ours.decode(v, i))}")

        theirs.save_model(str(tmp / "saelens-w512"))
        back = ft.TopKSAE.load(tmp / "saelens-w512")
        v2, i2 = back.encode(x)
        print(f"2. featuretree loads SAELens' save_model output: encode equal: "
              f"{same(torch.zeros_like(dense).scatter_(1, i2, v2), dense)}")

        coders = []
        for w in (128, 512):
            sc = SparseCoder(acts.d_model, SparseCoderConfig(num_latents=w, k=8), device="cpu")
            src = saes[w]
            sc.encoder.weight.copy_(src.W_enc.t())
            sc.encoder.bias.copy_(src.b_enc)
            sc.W_dec.copy_(src.W_dec)
            sc.b_dec.copy_(src.b_dec)
            sc.save_to_disk(tmp / f"sparsify/layers.3.w{w}")
            coders.append(sc)
        loaded = [ft.TopKSAE.load(tmp / f"sparsify/layers.3.w{w}") for w in (128, 512)]
        out = coders[1].encode(x)
        a = torch.zeros_like(dense).scatter_(1, out.top_indices, out.top_acts)
        v3, i3 = loaded[1].encode(x)
        tree = ft.link(loaded, acts)
        print(f"3. featuretree loads sparsify {md.version('eai-sparsify')}'s save_to_disk output: encode equal: "
              f"{same(a, torch.zeros_like(dense).scatter_(1, i3, v3))}; ft.link on the two loaded dictionaries: "
              f"{tree.graph.number_of_nodes() - 1} nodes, {sum(1 for *_, d in tree.graph.edges(data=True) if d['kind'] in ('split', 'same'))} "
              "feature-to-feature edges")


if __name__ == "__main__":
    main()
