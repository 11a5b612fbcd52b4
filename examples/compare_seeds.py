"""Feature universality: train the run's ladder again with another seed and match the two feature by feature.

Each rung of the run is paired one-to-one with the same rung of the new ladder by the correlation of their
activations on the run's held-out tokens (`match`); the shared fraction says how much of a dictionary is
"the same features", the pairs say which. A rung against the next wider one of the same ladder shows
splitting: fewer one-to-one partners, because a parent's tokens are divided among its children.

    python examples/compare_seeds.py                          # the default run (built first if missing)
    python examples/compare_seeds.py --run runs/small --n-tokens 20000 --widths 64,256 --epochs 1
"""

import argparse
import logging
from pathlib import Path

import featuretree as ft
from featuretree.activations import Activations
from featuretree.compare import match


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/default", help="run directory (built with the Config flags if missing)")
    p.add_argument("--other-seed", type=int, default=1, help="seed of the second ladder (the run used --seed)")
    p.add_argument("--threshold", type=float, default=0.7, help="correlation at which a pair counts as shared")
    p.add_argument("--top", type=int, default=8, help="pairs to print per rung")
    ft.Config.add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    tree = ft.build(ft.Config.from_args(args), out=args.run)  # loads the run if it is there with these settings
    cfg = tree.config
    acts = Activations(Path(args.run) / tree.graph.graph.get("acts", "acts"))
    ladder = [r for r in tree.rungs if "/" not in r]  # the ladder's rungs (not refinements)
    other = ft.train_ladder(acts, cfg.widths, k=cfg.k, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                            seed=args.other_seed, nested=cfg.nested)
    # the second ladder's own tree gives its features labels, so the pairs can be read
    twin = ft.link(other, acts, min_coverage=cfg.min_coverage, same_threshold=cfg.same_threshold,
                   within_coverage=cfg.within_coverage, fire_rel=cfg.fire_rel)

    results = {}
    print(f"seed {cfg.seed} vs seed {args.other_seed}, on the run's held-out tokens:")
    for rung in ladder:
        m = match(tree, twin, acts, rung_a=rung, rung_b=rung, threshold=args.threshold)
        results[rung] = m
        print(f"  {m.summary()}; median corr of pairs {m.pairs['corr'].median():.3f}")
    for rung, m in results.items():
        print(f"\n{rung}: best pairs (corr, decoder cos, label in seed {cfg.seed} | label in seed {args.other_seed})")
        for r in m.pairs.head(args.top).itertuples():
            print(f"  {r.a:<12} {r.b:<12} corr {r.corr:.3f}  cos {r.cos:+.3f}  {r.label_a}  |  {r.label_b}")
    if len(ladder) > 1:
        print("\nsplitting: each rung against the next wider one of the same ladder (seed "
              f"{cfg.seed}) shares fewer features one-to-one:")
        for narrow, wide in zip(ladder, ladder[1:]):
            m = match(tree, tree, acts, rung_a=narrow, rung_b=wide, threshold=args.threshold)
            print(f"  {m.summary()}")
            results[f"{narrow}->{wide}"] = m
    return results


if __name__ == "__main__":
    main()
