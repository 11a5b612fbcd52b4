"""Wall time of each stage of a featuretree build (harvest, ladder training, linking + labels, sunburst).

    python benchmarks/stage_times.py                       # the defaults of `featuretree build`
    python benchmarks/stage_times.py --n-tokens 100000     # a quicker look

Prints one row per stage with seconds and tokens/s, plus per-rung FVU / L0 / dead fraction.
"""

import argparse
import logging
import tempfile
import time

import torch

import featuretree as ft
from featuretree.explore import write_sunburst


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-tokens", type=int, default=ft.Config.n_tokens)
    p.add_argument("--epochs", type=int, default=ft.Config.epochs)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cfg = ft.Config(n_tokens=args.n_tokens, epochs=args.epochs)
    out = tempfile.mkdtemp(prefix="ft-bench-")
    rows = []

    t = time.perf_counter()
    model = ft.load_model(cfg.model)
    corpus = ft.load_corpus(cfg.corpus)
    rows.append(("load model + corpus", time.perf_counter() - t, None))

    t = time.perf_counter()
    acts = ft.collect(model, cfg.layer, corpus, n_tokens=cfg.n_tokens, out=f"{out}/acts", progress=False)
    rows.append(("harvest (collect)", time.perf_counter() - t, len(acts)))

    t = time.perf_counter()
    saes = ft.train_ladder(acts, cfg.widths, cfg.k, epochs=cfg.epochs, batch_size=cfg.batch_size, progress=False)
    rows.append((f"train ladder {cfg.widths}", time.perf_counter() - t, acts.n_rows("train") * cfg.epochs))

    t = time.perf_counter()
    tree = ft.link(saes, acts)
    rows.append(("link + labels", time.perf_counter() - t, acts.n_rows("heldout")))

    t = time.perf_counter()
    write_sunburst(tree, f"{out}/sunburst.html")
    rows.append(("sunburst html", time.perf_counter() - t, None))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, n_tokens {len(acts)}, k {cfg.k}")
    print(f"{'stage':<40} {'seconds':>8} {'tokens/s':>10}")
    for name, sec, n in rows:
        print(f"{name:<40} {sec:8.1f} {n / sec if n else float('nan'):10.0f}")
    for w, sae in saes.items():
        m = sae.metrics
        print(f"w{w:<6} FVU {m['fvu']:.3f}  L0 {m['l0']:.1f}  dead {m['dead_fraction']:.1%}")


if __name__ == "__main__":
    main()
