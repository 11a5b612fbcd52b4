"""Per-token costs on this machine, for docs/SCALE.md: harvest, store read (fp32 vs bf16), ladder training.

    python benchmarks/scale.py                  # 200k MiniLM layer-3 WordNet tokens, ladder 512/2048/8192
    python benchmarks/scale.py --tokens 50000   # a quick look

Prints tokens/s of: `collect` (nnsight trace + stop after layer 3, shards written); streaming a store
(`Activations.batches`: chunked mmap reads, cross-shard shuffle) stored as float32 and as bfloat16, and its
size on disk; `train_ladder` on the same stream (one pass feeds every rung) for the ladder and for a
single widest rung. Store reading must outrun training by a wide margin, or training would wait on disk.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from common import machine_info, print_info, set_threads


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=200_000)
    p.add_argument("--widths", default="512,2048,8192")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    set_threads(args.threads)
    import featuretree as ft

    print_info(machine_info())
    tmp = Path(tempfile.mkdtemp(prefix="featuretree-scale-"))
    model, texts = ft.load_model(), ft.load_corpus("wordnet").texts
    rows = []
    stores = {}
    for dtype in ("float32", "bfloat16"):
        t = time.perf_counter()
        stores[dtype] = ft.collect(model, 3, texts, n_tokens=args.tokens, out=tmp / dtype, dtype=dtype, progress=False)
        dt = time.perf_counter() - t
        size = sum(i["bytes"] for i in stores[dtype].meta["shard_info"])
        rows.append((f"harvest ({dtype} store)", args.tokens / dt, f"{size / args.tokens:.0f} bytes/token on disk"))
    for dtype, acts in stores.items():
        n, t = 0, time.perf_counter()
        for x in acts.batches(args.batch_size, epochs=2):
            n += x.shape[0]
        rows.append((f"read + shuffle the {dtype} store (batches of {args.batch_size})", n / (time.perf_counter() - t), ""))
    widths = tuple(int(w) for w in args.widths.split(","))
    acts = stores["float32"]
    for ws in (widths, widths[-1:]):
        seen = []
        t0 = time.perf_counter()
        ft.train_ladder(acts, ws, k=args.k, epochs=1, batch_size=args.batch_size, progress=False,
                        callback=lambda step, tokens, fvu, seen=seen: seen.append((time.perf_counter(), tokens)))
        (t1, n1), (t2, n2) = seen[0], seen[-1]  # steady state: from the first step's end to the last's
        rows.append((f"train_ladder widths {','.join(map(str, ws))} k {args.k}", (n2 - n1) / (t2 - t1),
                     f"{time.perf_counter() - t0:.1f} s incl. held-out evaluation"))
    print("| stage | tokens/s | note |\n|---|---|---|")
    for name, rate, note in rows:
        print(f"| {name} | {rate:,.0f} | {note} |")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
