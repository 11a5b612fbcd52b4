"""TopK SAE training speed: featuretree's train_ladder vs sparsify vs plain PyTorch, same batches, one process.

    bash benchmarks/setup_env.sh                                  # once: benchmarks/.venv with eai-sparsify
    benchmarks/.venv/bin/python benchmarks/train_speed.py         # 300k tokens, widths 4096 16384, k 32
    benchmarks/.venv/bin/python benchmarks/train_speed.py --tokens 100000 --widths 4096
    benchmarks/.venv/bin/python benchmarks/train_speed.py --ladder    # ladder (512, 2048, 8192) vs rungs alone
    benchmarks/.venv/bin/python benchmarks/train_speed.py --malloc default   # glibc defaults for every trainer

Data: WordNet gloss activations of the embedded MiniLM at layer 3 (harvested once into benchmarks/.cache/).
The store's train split, cut to whole batches, is fed in order (the same batches in the same order) to:
  featuretree  train_ladder(x_train, (width,), k, epochs=1, shuffle=False, eval_acts=x_eval)
  sparsify     eai-sparsify's SparseCoder and the step its Trainer.fit performs with optimizer="adam"
               (decoder renormalised before the forward, dead mask + AuxK, FVU loss, parallel-gradient
               removal, torch Adam with lr 2e-4 / sqrt(width / 2^14) and its linear schedule)
  plain        a dense TopK SAE in plain PyTorch (nn.Parameters, topk -> scatter -> matmul decoder, Adam)
The first `--warmup` steps of each are trained but not timed. FVU, L0 and dead fraction are computed by one
shared function on the store's held-out docs; peak RSS is the high-water mark of each trainer's phase.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import time

import torch
from common import PeakRSS, harvest, hwm_mb, machine_info, markdown_table, print_info, set_malloc, set_threads
from torch import Tensor, nn

AUXK_ALPHA = 1 / 32  # featuretree's default, also given to sparsify (whose TrainConfig default is 0)


# ---- evaluation shared by every trainer -------------------------------------------------------------
@torch.no_grad()
def evaluate(encode, decode, x_eval: Tensor, width: int, batch: int = 8192) -> dict[str, float]:
    """FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, mean L0, fraction of features never firing.

    `encode(x) -> (values (n, k), indices (n, k))`, `decode(values, indices) -> x_hat (n, d)`.
    """
    sse = 0.0
    l0 = 0
    fired = torch.zeros(width, dtype=torch.bool)
    for i in range(0, len(x_eval), batch):
        x = x_eval[i:i + batch]
        values, indices = encode(x)
        sse += float((x - decode(values, indices)).double().pow(2).sum())
        active = values > 0
        l0 += int(active.sum())
        fired[indices[active]] = True
    xd = x_eval.double()
    total = float((xd - xd.mean(0)).pow(2).sum())
    return {"fvu": sse / total, "l0": l0 / len(x_eval), "dead": float((~fired).float().mean())}


class _Clock:
    """Wall time from the end of step `warmup` to the end of the last step; peak RSS when training ends."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.steps, self.tokens = warmup, None, None, 0, 0
        self.peak_mb = float("nan")

    def tick(self, i: int, n: int) -> None:  # call before step i, with the size of its batch
        if i == self.warmup:
            self.start, self.cpu_start = time.perf_counter(), time.process_time()
        if i >= self.warmup:
            self.steps += 1
            self.tokens += n

    def stop(self) -> None:
        self.end, self.cpu_end = time.perf_counter(), time.process_time()
        self.peak_mb = hwm_mb()  # peak of the training phase (PeakRSS reset the high-water mark at its start)

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @property
    def cpu_per_wall(self) -> float:
        """CPU seconds of all threads per wall second: about --threads when nothing else competes for the cores."""
        return (self.cpu_end - self.cpu_start) / self.seconds


# ---- (a) featuretree --------------------------------------------------------------------------------
@contextlib.contextmanager
def _timed_train_stream(clock: _Clock):
    """Patch featuretree.train.iter_batches so the training stream ticks `clock` (eval streams do not).

    train_ladder pulls batch i+1 only after step i, so the time between pulling batch `warmup` and
    exhausting the stream is exactly the time of the timed steps.
    """
    import featuretree.train as ftt

    orig = ftt.iter_batches

    def timed(*args, **kwargs):
        if kwargs.get("split") != "train":
            yield from orig(*args, **kwargs)
            return
        for i, x in enumerate(orig(*args, **kwargs)):
            clock.tick(i, len(x))
            yield x
        clock.stop()

    ftt.iter_batches = timed
    try:
        yield
    finally:
        ftt.iter_batches = orig


def run_featuretree(x_train: Tensor, x_eval: Tensor, widths, k: int, batch: int, warmup: int,
                    lr_rule: str = "own", **_):
    import featuretree as ft

    lr = 2e-4 / math.sqrt(widths[-1] / 2**14) if lr_rule == "sparsify" else None
    clock = _Clock(warmup)
    t0 = time.perf_counter()
    with _timed_train_stream(clock):
        saes = ft.train_ladder(x_train, tuple(widths), k=k, epochs=1, batch_size=batch, shuffle=False,
                               progress=False, eval_acts=x_eval, lr=lr)
    total = time.perf_counter() - t0
    if clock.start is None or clock.end is None:  # train_ladder no longer streams through iter_batches
        print("warning: could not time featuretree's steps alone; timing the whole call (with eval)")
        clock.start, clock.end, clock.tokens, clock.peak_mb = t0, t0 + total, len(x_train), hwm_mb()
        clock.cpu_start = clock.cpu_end = 0.0
    sae = saes[widths[-1]]
    return clock, sae.encode, sae.decode, sae.metrics["lr"], saes


# ---- (b) sparsify -----------------------------------------------------------------------------------
def run_sparsify(x_train: Tensor, x_eval: Tensor, width: int, k: int, batch: int, warmup: int,
                 dead_tokens: int, sparsify_warmup: int, **_):
    """SparseCoder + the body of sparsify.Trainer.fit for loss_fn="fvu", optimizer="adam", one process."""
    from sparsify import SparseCoder, SparseCoderConfig
    from transformers import get_linear_schedule_with_warmup

    d = x_train.shape[1]
    batches = list(x_train.split(batch))
    torch.manual_seed(0)  # Trainer seeds before building each coder
    sae = SparseCoder(d, SparseCoderConfig(num_latents=width, k=k), "cpu", dtype=torch.float32)
    lr = 2e-4 / (sae.num_latents / 2**14) ** 0.5
    opt = torch.optim.Adam([dict(params=sae.parameters(), lr=lr)])  # no bitsandbytes here: torch Adam
    sched = get_linear_schedule_with_warmup(opt, sparsify_warmup, len(batches))
    since_fired = torch.zeros(width, dtype=torch.long)
    did_fire = torch.zeros(width, dtype=torch.bool)
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # as Trainer.fit does (no effect on this CPU)
    clock = _Clock(warmup)
    try:
        for i, x in enumerate(batches):
            clock.tick(i, len(x))
            if i == 0:
                sae.b_dec.data = x.mean(0)
            sae.set_decoder_norm_to_unit_norm()
            dead_mask = since_fired > dead_tokens
            total_variance = (x - x.mean(0)).pow(2).sum()
            out = sae(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
            did_fire[out.latent_indices.flatten()] = True
            float(out.fvu.detach())  # logged every step (forces the same sync the Trainer has)
            float(out.auxk_loss.detach())
            loss = out.fvu + AUXK_ALPHA * out.auxk_loss + out.multi_topk_fvu / 8
            loss.backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad()
            sched.step()
            with torch.no_grad():
                since_fired += len(x)
                since_fired[did_fire] = 0
                did_fire.zero_()
        clock.stop()
    finally:
        torch.set_float32_matmul_precision(prev)
    sae.eval()

    def encode(x):
        out = sae.encode(x)
        return out.top_acts, out.top_indices

    return clock, encode, sae.decode, lr, sae


# ---- (c) plain PyTorch, dense -----------------------------------------------------------------------
class DenseTopK(nn.Module):
    """The textbook TopK SAE: dense pre-activations, topk, scatter into a dense code, matmul decoder."""

    def __init__(self, d_model: int, width: int, k: int, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        W_dec = torch.randn(width, d_model, generator=gen)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)  # (width, d_model)
        self.W_enc = nn.Parameter(W_dec.t().clone())  # (d_model, width)
        self.b_enc = nn.Parameter(torch.zeros(width))
        self.b_dec = nn.Parameter(torch.zeros(d_model))
        self.k = k

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc  # (n, width)
        values, indices = pre.topk(self.k, dim=1, sorted=False)  # (n, k)
        return values.relu(), indices

    def decode(self, values: Tensor, indices: Tensor) -> Tensor:
        codes = torch.zeros(len(values), self.W_dec.shape[0]).scatter(1, indices, values)  # (n, width)
        return codes @ self.W_dec + self.b_dec  # (n, d_model)


def run_plain(x_train: Tensor, x_eval: Tensor, width: int, k: int, batch: int, warmup: int, **_):
    sae = DenseTopK(x_train.shape[1], width, k)
    lr = 2e-4 / math.sqrt(width / 2**14)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    clock = _Clock(warmup)
    for i, x in enumerate(x_train.split(batch)):
        clock.tick(i, len(x))
        if i == 0:
            sae.b_dec.data.copy_(x.mean(0))
        x_hat = sae.decode(*sae.encode(x))
        loss = (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
    clock.stop()
    sae.requires_grad_(False)
    return clock, sae.encode, sae.decode, lr, sae


TRAINERS = {"featuretree": run_featuretree, "sparsify": run_sparsify, "plain": run_plain}


# ---- modes ------------------------------------------------------------------------------------------
def speed(args, x_train: Tensor, x_eval: Tensor) -> None:
    dead_tokens = max(args.batch, len(x_train) // 5)  # featuretree's default rule, for every trainer
    for width in args.widths:
        results = {}
        for name in args.trainers:
            kw = dict(x_train=x_train, x_eval=x_eval, k=args.k, batch=args.batch, warmup=args.warmup,
                      dead_tokens=dead_tokens, sparsify_warmup=args.sparsify_warmup, lr_rule=args.lr_rule)
            kw["widths" if name == "featuretree" else "width"] = (width,) if name == "featuretree" else width
            with PeakRSS() as mem:
                clock, encode, decode, lr, model = TRAINERS[name](**kw)
            m = evaluate(encode, decode, x_eval, width)
            results[name] = dict(tok_s=clock.tokens / clock.seconds, seconds=clock.seconds, tokens=clock.tokens,
                                 lr=lr, cpu=clock.cpu_per_wall, peak=clock.peak_mb, delta=clock.peak_mb - mem.base_mb, **m)
            if name == "featuretree":  # cross-check of the shared evaluation against train_ladder's own
                results[name]["own_fvu"] = model[width].metrics["fvu"]
                results[name]["call_peak"] = mem.peak_mb  # train_ladder's own held-out evaluation included
            print(f"  w{width} {name}: {results[name]['tok_s']:,.0f} tok/s, FVU {m['fvu']:.4f}", flush=True)
            del model, encode, decode
        ref = results.get("sparsify", {}).get("tok_s")
        rows = [[name, f"{r['tok_s']:,.0f}", f"{r['tok_s'] / ref:.2f}x" if ref else "-", f"{r['fvu']:.4f}",
                 f"{r['l0']:.1f}", f"{r['dead']:.1%}", f"{r['peak']:,.0f}", f"{r['delta']:+,.0f}", f"{r['lr']:.2e}",
                 f"{r['seconds']:.1f}", f"{r['cpu']:.2f}"]
                for name, r in results.items()]
        print(f"\n### width {width}, k {args.k}, batch {args.batch}: {results[args.trainers[0]]['tokens']:,} timed "
              f"tokens per trainer (after {args.warmup} warm-up steps), {len(x_eval):,} held-out tokens\n")
        print(markdown_table(["trainer", "tokens/s", "vs sparsify", "FVU", "L0", "dead", "train peak RSS MB",
                              "RSS growth MB", "lr", "timed s", "CPU s / wall s"], rows))
        if "featuretree" in results:
            r = results["featuretree"]
            print(f"\nfeaturetree: train_ladder's own held-out FVU {r['own_fvu']:.4f}; peak RSS of the whole "
                  f"train_ladder call (its held-out evaluation included) {r['call_peak']:,.0f} MB")
        print(flush=True)


def ladder(args, x_train: Tensor, x_eval: Tensor) -> None:
    widths = tuple(args.ladder_widths)
    kw = dict(x_train=x_train, x_eval=x_eval, k=args.k, batch=args.batch, warmup=args.warmup)
    secs: dict[str, float] = {}  # best of --repeats per run
    fvu: dict[str, str] = {}
    peak: dict[str, float] = {}
    runs = {"together": widths, **{f"w{w}": (w,) for w in widths}}
    for rep in range(args.repeats):
        for name, ws in (runs.items() if rep % 2 == 0 else reversed(runs.items())):
            with PeakRSS() as mem:
                clock, *_, saes = run_featuretree(widths=ws, **kw)
            secs[name] = min(secs.get(name, math.inf), clock.seconds)
            peak[name] = max(peak.get(name, 0.0), mem.peak_mb)
            fvu[name] = " / ".join(f"{evaluate(s.encode, s.decode, x_eval, w)['fvu']:.4f}" for w, s in saes.items())
            print(f"  {name}: {clock.seconds:.1f} s", flush=True)
            del saes
    n = clock.tokens
    alone = sum(secs[f"w{w}"] for w in widths)
    rows = [[f"w{w} alone", f"{secs[f'w{w}']:.1f}", f"{n / secs[f'w{w}']:,.0f}", fvu[f"w{w}"], f"{peak[f'w{w}']:,.0f}"]
            for w in widths]
    rows.append(["sum of rungs alone", f"{alone:.1f}", f"{n / alone:,.0f}", "", ""])
    rows.append([f"ladder {widths} together", f"{secs['together']:.1f}", f"{n / secs['together']:,.0f}",
                 fvu["together"], f"{peak['together']:,.0f}"])
    print(f"\n### ladder {widths}, k {args.k}, batch {args.batch}: {n:,} timed tokens (after {args.warmup} "
          f"warm-up steps), best of {args.repeats}\n")
    print(markdown_table(["run", "timed s", "tokens/s", "held-out FVU", "peak RSS MB"], rows))
    print(f"\nladder together / sum of rungs alone = {secs['together'] / alone:.3f} (goal <= 1.1)\n", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=300_000, help="tokens to harvest (train + held-out)")
    p.add_argument("--widths", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=3, help="steps trained but not timed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--trainers", nargs="+", choices=list(TRAINERS), default=["sparsify", "featuretree", "plain"])
    p.add_argument("--sparsify-warmup", type=int, default=0,
                   help="lr warm-up steps of sparsify's schedule (its default, 1000, is longer than this run)")
    p.add_argument("--lr-rule", choices=["own", "sparsify"], default="own",
                   help="featuretree's lr: its own default (3x sparsify's) or sparsify's 2e-4/sqrt(width/2^14), "
                        "which plain and sparsify always use")
    p.add_argument("--malloc", choices=["tuned", "default"], default="tuned",
                   help="glibc allocator policy, the same for every trainer (see common.set_malloc)")
    p.add_argument("--ladder", action="store_true", help="time the ladder together vs its rungs alone")
    p.add_argument("--ladder-widths", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--repeats", type=int, default=2, help="--ladder: runs of each, alternating order; best counts")
    args = p.parse_args(argv)
    set_threads(args.threads)
    malloc = set_malloc(args.malloc)

    acts = harvest(args.tokens)
    x_train, x_eval = acts.load("train"), acts.load("heldout")  # doc-level split: no doc in both
    x_train = x_train[: len(x_train) // args.batch * args.batch].contiguous()  # whole batches only
    if len(x_train) // args.batch <= args.warmup:
        p.error(f"{len(x_train)} training tokens give no timed step after {args.warmup} warm-up steps")
    print(f"## train_speed {'--ladder ' if args.ladder else ''}({len(x_train):,} train tokens = "
          f"{len(x_train) // args.batch} batches, {len(x_eval):,} held-out, d_model {x_train.shape[1]})\n")
    print_info({**machine_info(), "allocator": malloc})
    (ladder if args.ladder else speed)(args, x_train, x_eval)
    print("load average (1/5/15 min) at end: " + " ".join(f"{v:.2f}" for v in os.getloadavg()))


if __name__ == "__main__":
    main()
