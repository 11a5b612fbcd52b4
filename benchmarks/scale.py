"""Per-token costs on this machine, for docs/SCALE.md: harvest, store read (fp32 vs bf16), ladder training.

    python benchmarks/scale.py                  # 200k MiniLM layer-3 WordNet tokens, ladder 512/2048/8192
    python benchmarks/scale.py --tokens 50000   # a quick look

Prints tokens/s of: `collect` (nnsight trace + stop after layer 3, shards written); streaming a store
(`Activations.batches`: chunked mmap reads, cross-shard shuffle) stored as float32 and as bfloat16, and its
size on disk; `train_ladder` on the same stream (one pass feeds every rung) for the ladder and for a
single widest rung. Store reading must outrun training by a wide margin, or training would wait on disk.

    python benchmarks/scale.py link                          # linking at 4k -> 16k -> 64k on 1M tokens
    python benchmarks/scale.py link --widths 4096,16384 --tokens 250000,500000,1000000
    mkdir -p /tmp/old; for f in tree firing; do git show 29e0cd1:featuretree/$f.py > /tmp/old/$f.py; done
    python benchmarks/scale.py link --widths 4096,16384 --before /tmp/old   # the same runs, earlier code

`link` times `featuretree.tree.link_codes` (everything `link` does after encoding: thresholds, firing matrices,
co-activation, edges, virtual root; no labels) on synthetic TopK codes (k 32 of which `--real` are real
features drawn Zipf-distributed from the widest rung, nested across rungs, the rest small filler), for each
ladder prefix (4k; 4k,16k; 4k,16k,64k) and token count, each in a fresh subprocess so peaks do not mix.
It reports wall and CPU seconds (stages in CPU seconds of the process, less sensitive to a shared machine) and the
peak RSS, also over the RSS with the codes and dictionaries loaded.
`--before DIR` swaps in `candidates` and `thresholds` from DIR/tree.py and DIR/firing.py (older code).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import PeakRSS, machine_info, markdown_table, print_info, set_threads


def synthetic_codes(n: int, widths: tuple[int, ...], k: int = 32, real: int = 24, alpha: float = 0.7,
                    noise: float = 0.05, seed: int = 0) -> dict:
    """{f"w{w}": (values (n, k) float32, indices (n, k) int64)}: TopK-like codes of a nested ladder.

    Each token draws `real` concepts of the widest rung W with Zipf(alpha) frequencies; in rung w a concept
    c is feature perm[c] * w // W (so each rung's features split into the next rung's), replaced by a
    random feature with probability `noise`. Repeats within a token and the k - real other slots are
    filler: random features with activations ~0.03 (the firing rule drops most of them).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    top = max(widths)
    cdf = np.cumsum(1.0 / np.arange(1, top + 1) ** alpha)
    concepts = np.minimum(np.searchsorted(cdf / cdf[-1], rng.random((n, real))), top - 1)
    concepts = rng.permutation(top)[concepts]
    strength = (0.5 + rng.lognormal(0.0, 0.5, (n, real))).astype(np.float32)
    out = {}
    for w in widths:
        f = concepts * w // top
        swap = rng.random((n, real)) < noise
        f[swap] = rng.integers(0, w, int(swap.sum()))
        order = np.argsort(f, axis=1)
        f, v = np.take_along_axis(f, order, 1), np.take_along_axis(strength, order, 1)
        rep = np.zeros((n, real), dtype=bool)
        rep[:, 1:] = f[:, 1:] == f[:, :-1]
        f[rep] = rng.integers(0, w, int(rep.sum()))
        v[rep] = rng.uniform(0.01, 0.05, int(rep.sum()))
        idx = np.concatenate([f, rng.integers(0, w, (n, k - real))], axis=1)
        val = np.concatenate([v, rng.uniform(0.01, 0.05, (n, k - real)).astype(np.float32)], axis=1)
        out[f"w{w}"] = (val.astype(np.float32), idx.astype(np.int64))
        del f, v, order, rep, swap
    return out


def link_one(widths: tuple[int, ...], n: int, k: int, real: int, d_model: int, before: str | None) -> dict:
    """Link synthetic codes once in this process: seconds per stage, RSS with the inputs, peak RSS while linking."""
    import featuretree.tree as tree_mod
    from featuretree import TopKSAE

    if before:  # older candidates / thresholds, loaded from files
        import importlib.util

        import featuretree.firing as firing_mod

        def load(name):
            spec = importlib.util.spec_from_file_location(f"before_{name}", Path(before) / f"{name}.py")
            mod = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = mod  # dataclasses look their module up there
            spec.loader.exec_module(mod)
            return mod

        old_tree, old_firing = load("tree"), load("firing")
        tree_mod.candidates = lambda above, r, fires, mc, wc, **_: old_tree.candidates(above, r, fires, mc, wc)
        firing_mod.thresholds = old_firing.thresholds
    codes = synthetic_codes(n, widths, k, real)
    saes = {f"w{w}": TopKSAE(d_model, w, k) for w in widths}
    times: dict[str, float] = {}  # CPU seconds of this process per stage (the machine may be shared)

    def timed(name, fn):
        def run(*a, **kw):
            t = time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                times[name] = times.get(name, 0.0) + time.process_time() - t
        return run

    tree_mod.fire_codes = timed("firing rule", tree_mod.fire_codes)
    tree_mod.candidates = timed("co-activation (candidates)", tree_mod.candidates)
    tree_mod.attach = timed("edges (attach)", tree_mod.attach)
    with PeakRSS() as mem:
        t, cpu = time.perf_counter(), time.process_time()
        tree = tree_mod.link_codes(saes, codes)
        total, cpu = time.perf_counter() - t, time.process_time() - cpu
    g = tree.graph
    return {"widths": list(widths), "tokens": n, "link_s": total, "cpu_s": cpu, "stages": times, "base_mb": mem.base_mb,
            "peak_mb": mem.peak_mb, "delta_mb": mem.delta_mb, "exact_peak": mem.exact,
            "nodes": g.number_of_nodes() - 1, "novel": len(tree.novel_features()),
            "within": sum(1 for *_, d in g.edges(data=True) if d.get("within"))}


def link_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="scale.py link", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", default="4096,16384,65536", help="the ladder; each prefix of it is one run")
    p.add_argument("--tokens", default="1000000", help="token counts, comma-separated (each with the whole ladder)")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--real", type=int, default=24, help="real (non-filler) features per token")
    p.add_argument("--d-model", type=int, default=576)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--before", default=None, help="a folder with older tree.py and firing.py to time instead")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a single run, JSON on stdout
    args = p.parse_args(argv)
    widths = tuple(int(w) for w in args.widths.split(","))
    tokens = [int(t) for t in args.tokens.split(",")]
    if args.one:
        set_threads(args.threads)
        print(json.dumps(link_one(widths, tokens[0], args.k, args.real, args.d_model, args.before)))
        return
    print_info(machine_info())
    runs = [(widths[:i + 1], tokens[-1]) for i in range(len(widths))]
    runs += [(widths, n) for n in tokens[:-1]]
    rows = []
    for ws, n in runs:
        cmd = [sys.executable, __file__, "link", "--one", "--widths", ",".join(map(str, ws)), "--tokens", str(n),
               "--k", str(args.k), "--real", str(args.real), "--d-model", str(args.d_model),
               "--threads", str(args.threads)] + (["--before", args.before] if args.before else [])
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            print(f"{ws} on {n} tokens failed (rc {res.returncode}):\n{res.stderr[-2000:]}")
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        st = r["stages"]
        rest = r["cpu_s"] - sum(st.values())
        rows.append([" / ".join(f"{w // 1024}k" for w in ws), f"{n:,}", f"{r['link_s']:.1f}", f"{r['cpu_s']:.1f}",
                     f"{st.get('firing rule', 0):.1f}", f"{st.get('co-activation (candidates)', 0):.1f}",
                     f"{st.get('edges (attach)', 0):.1f}", f"{rest:.1f}", f"{r['base_mb']:,.0f}",
                     f"{r['peak_mb']:,.0f}", f"{r['delta_mb']:,.0f}", f"{r['nodes']:,}", f"{r['novel']:,}"])
        print(json.dumps(r), flush=True)
    print(markdown_table(["rungs", "tokens", "link s (wall)", "CPU s", "firing rule", "co-activation", "attach", "rest",
                          "RSS with inputs MB", "peak RSS MB", "link's own peak MB", "features", "novel"], rows))


def main() -> None:
    if sys.argv[1:2] == ["link"]:
        return link_main(sys.argv[2:])
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
