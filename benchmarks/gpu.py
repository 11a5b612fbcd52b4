"""GPU training speed: featuretree's train_ladder vs sparsify on the same cached batches, one process.

    python benchmarks/gpu.py                                   # CUDA: d_model 768 and 2304, widths 16384 65536, k 32
    python benchmarks/gpu.py --d-models 768 --widths 16384     # the issue's target point
    python benchmarks/gpu.py --device cpu --smoke              # a tiny run anywhere (what tests/test_examples.py runs)

Data: synthetic activations from a sparse ground truth (8 x d_model true directions, ~32 active per token
with exponential magnitudes, plus 5% Gaussian noise), generated once on the device and cut into batches;
both trainers see the same batches in the same order. Timed: the steps after `--warmup` warm-up steps,
between two torch.cuda.synchronize() calls. Printed per (d_model, width): tokens/s, the ratio to sparsify,
FVU on held-out rows of the same distribution, and peak GPU memory (torch.cuda.max_memory_allocated) of each
trainer's phase. Targets (issue 14): >= 1M tokens/s at d_model 768, width 16,384, k 32 on one H100/H200-class
GPU, and >= 2x sparsify in the same run. sparsify uses its Triton decoder when triton is installed.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

AUXK_ALPHA = 1 / 32


def synthetic(n: int, d: int, device, seed: int = 0, k_true: int = 32) -> torch.Tensor:
    """(n, d) float32 rows: sparse non-negative combinations of 8 * d unit directions plus 5% noise."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    D = torch.randn(8 * d, d, generator=gen)
    D = (D / D.norm(dim=1, keepdim=True)).to(device)
    out = torch.empty(n, d, device=device)
    chunk = 65536
    g = torch.Generator(device=device).manual_seed(seed + 1)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        idx = torch.randint(0, 8 * d, (m, k_true), device=device, generator=g)
        val = torch.empty(m, k_true, device=device).exponential_(generator=g)
        x = torch.nn.functional.embedding_bag(idx, D, per_sample_weights=val, mode="sum")
        out[s:s + m] = x + 0.05 * x.std() * torch.randn(m, d, device=device, generator=g)
    return out


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


@torch.no_grad()
def fvu(encode, decode, x_eval: torch.Tensor, batch: int = 8192) -> float:
    sse = 0.0
    for i in range(0, len(x_eval), batch):
        x = x_eval[i:i + batch]
        sse += float((x - decode(*encode(x))).double().pow(2).sum())
    xd = x_eval.double()
    return sse / float((xd - xd.mean(0)).pow(2).sum())


def run_featuretree(x: torch.Tensor, x_eval: torch.Tensor, width: int, k: int, batch: int, warmup: int, device):
    from featuretree.train import train_ladder

    marks: dict[str, float] = {}
    last = -(-len(x) // batch)  # steps in the one epoch

    def callback(step, tokens, _fvu):  # after step `step` (1-based)
        if step == warmup:
            _sync(device)
            marks["start"], marks["tokens0"] = time.perf_counter(), tokens
        if step == last:  # before train_ladder's own held-out evaluation
            _sync(device)
            marks["end"], marks["tokens"] = time.perf_counter(), tokens

    saes = train_ladder(x, (width,), k, epochs=1, batch_size=batch, shuffle=False, progress=False,
                        eval_acts=x_eval[:batch], callback=callback, device=str(device))
    sae = saes[width]
    return marks, sae.encode, sae.decode


def run_sparsify(x: torch.Tensor, x_eval: torch.Tensor, width: int, k: int, batch: int, warmup: int, device):
    """sparsify's SparseCoder and the body of its Trainer.fit (loss fvu, Adam, AuxK), on the same batches."""
    from sparsify import SparseCoder, SparseCoderConfig

    d = x.shape[1]
    torch.manual_seed(0)
    sae = SparseCoder(d, SparseCoderConfig(num_latents=width, k=k), device, dtype=torch.float32)
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / (width / 2**14) ** 0.5)
    dead_tokens = max(batch, len(x) // 5)
    since_fired = torch.zeros(width, dtype=torch.long, device=device)
    did_fire = torch.zeros(width, dtype=torch.bool, device=device)
    marks: dict[str, float] = {}
    torch.set_float32_matmul_precision("high")  # as Trainer.fit does
    tokens = 0
    for i, xb in enumerate(x.split(batch)):
        if i == warmup:
            _sync(device)
            marks["start"], marks["tokens0"] = time.perf_counter(), tokens
        if i == 0:
            sae.b_dec.data = xb.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x=xb, y=xb, dead_mask=since_fired > dead_tokens, total_variance=(xb - xb.mean(0)).pow(2).sum())
        did_fire[out.latent_indices.flatten()] = True
        loss = out.fvu + AUXK_ALPHA * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            since_fired += len(xb)
            since_fired[did_fire] = 0
            did_fire.zero_()
        tokens += len(xb)
    _sync(device)
    marks["end"], marks["tokens"] = time.perf_counter(), tokens
    torch.set_float32_matmul_precision("highest")
    sae.eval()

    def encode(xe):
        o = sae.encode(xe)
        return o.top_acts, o.top_indices

    return marks, encode, sae.decode


TRAINERS = {"featuretree": run_featuretree, "sparsify": run_sparsify}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--d-models", type=int, nargs="+", default=[768, 2304])
    p.add_argument("--widths", type=int, nargs="+", default=[16384, 65536])
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=300, help="timed steps per trainer")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--trainers", nargs="+", choices=list(TRAINERS), default=list(TRAINERS))
    p.add_argument("--smoke", action="store_true", help="tiny sizes (d 64, width 512, 80 steps): checks the script")
    args = p.parse_args(argv)
    if args.smoke:
        args.d_models, args.widths, args.batch, args.steps, args.warmup = [64], [512], 256, 80, 4
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}; torch {torch.__version__}; k {args.k}, batch {args.batch}, {args.steps} timed steps "
          f"after {args.warmup}", flush=True)
    rows = []
    for d in args.d_models:
        n = (args.steps + args.warmup) * args.batch
        x = synthetic(n, d, device)
        x_eval = synthetic(min(65536, 8 * args.batch), d, device, seed=7)
        for width in args.widths:
            res = {}
            for trainer in args.trainers:
                _peak_reset(device)
                try:
                    marks, enc, dec = TRAINERS[trainer](x, x_eval, width, args.k, args.batch, args.warmup, device)
                except ImportError as e:
                    print(f"  {trainer}: not installed ({e})", flush=True)
                    continue
                _sync(device)
                secs = marks["end"] - marks["start"]
                tok_s = (marks["tokens"] - marks["tokens0"]) / secs
                res[trainer] = (tok_s, fvu(enc, dec, x_eval), _peak_gb(device))
                print(f"  d {d} w {width} {trainer}: {tok_s:,.0f} tok/s  FVU {res[trainer][1]:.4f}  "
                      f"peak {res[trainer][2]:.1f} GB", flush=True)
                del enc, dec
            ref = res.get("sparsify", (math.nan,))[0]
            for trainer, (tok_s, f, peak) in res.items():
                rows.append(f"| {d} | {width} | {trainer} | {tok_s:,.0f} | {tok_s / ref:.2f}x | {f:.4f} | {peak:.1f} |")
        del x, x_eval
    print("\n| d_model | width | trainer | tokens/s | vs sparsify | FVU | peak GPU GB |\n|---|---|---|---|---|---|---|")
    print("\n".join(rows), flush=True)


if __name__ == "__main__":
    main()
