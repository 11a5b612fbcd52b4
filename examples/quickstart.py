"""The pipeline step by step through the Python API (what `featuretree build` does), then a look at the tree.

    python examples/quickstart.py                      # defaults: embedded MiniLM, layer 3, WordNet
    python examples/quickstart.py --n-tokens 20000 --widths 64,256 --out runs/quick
"""

import argparse
import logging

import featuretree as ft
from featuretree.explore import write_sunburst


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-tokens", type=int, default=ft.Config.n_tokens)
    p.add_argument("--widths", default=",".join(map(str, ft.Config.widths)))
    p.add_argument("--k", type=int, default=ft.Config.k)
    p.add_argument("--epochs", type=int, default=ft.Config.epochs)
    p.add_argument("--out", default="runs/quickstart")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    cfg = ft.Config(n_tokens=args.n_tokens, widths=tuple(int(w) for w in args.widths.split(",")), k=args.k,
                    epochs=args.epochs)
    model = ft.load_model(cfg.model)                                   # nnsight-wrapped, offline
    corpus = ft.load_corpus(cfg.corpus)                                # texts + WordNet labels
    acts = ft.collect(model, cfg.layer, corpus, n_tokens=cfg.n_tokens, out=f"{args.out}/acts")
    saes = ft.train_ladder(acts, cfg.widths, k=cfg.k, epochs=cfg.epochs, batch_size=cfg.batch_size)
    tree = ft.link(saes, acts, min_coverage=cfg.min_coverage)
    tree.config = cfg
    ft.save(tree, args.out)
    write_sunburst(tree, f"{args.out}/sunburst.html")

    frame = ft.to_frame(tree)
    print(frame.groupby("rung")[["freq"]].count().rename(columns={"freq": "live features"}))
    for rung, sae in saes.items():
        print(f"w{rung}: FVU {sae.metrics['fvu']:.3f}  L0 {sae.metrics['l0']:.1f}  dead {sae.metrics['dead_fraction']:.1%}")
    root = frame[(frame.depth == 0) & (frame.kind != "novel")].sort_values("freq", ascending=False).iloc[0]
    print(f"most frequent root {root.node} ({root.freq:.1%}): {root.label}")
    for child in sorted(tree.graph.successors(root.node), key=lambda n: -tree.graph.nodes[n]["freq"])[:5]:
        d, e = tree.graph.nodes[child], tree.graph.edges[root.node, child]
        print(f"  -> {child:<12} coverage {e['coverage']:.2f} cos {e['cos']:+.2f}  {d['label']}")
    print(f"open {args.out}/sunburst.html")
    return tree


if __name__ == "__main__":
    main()
