"""Depth-first refinement from a coarse feature: default build -> find "biology" -> refine depth 2 -> sunburst.

The ladder's coarse rungs hold broad features; `ft.find` ranks them by how much more they fire on the word
"biology" (in the corpus sentences that use it) than on other tokens. `ft.refine` then gathers the tokens
where the best one fires, trains a small dictionary on those tokens alone, hangs its features below it and
recurses into the largest children: the children of a taxonomy/biology feature come apart into plants,
animals, diseases, microbes and so on.

    python examples/biology_dfs.py                  # the default run (built first if missing, ~6 min)
    python examples/biology_dfs.py --run runs/small --n-tokens 20000 --widths 32,128 --epochs 1 --width 16
    (every `featuretree build` flag sets up the run: --model, --layer, --corpus, --widths, --k, ...)
"""

import argparse
import logging
from pathlib import Path

import featuretree as ft
from featuretree.explore import write_explorer, write_sunburst


def run_args(p: argparse.ArgumentParser) -> None:
    """--run, and every ft.Config field as a flag (the settings to build the run with if it is not there)."""
    p.add_argument("--run", default="runs/default", help="run directory (built with the flags below if missing)")
    ft.Config.add_arguments(p)


def refine_args(p: argparse.ArgumentParser, *, min_tokens: int, stream_tokens: int, out: str) -> None:
    """The flags of a refinement: local width, token limits, and where the result goes."""
    p.add_argument("--width", type=int, default=64, help="features of each local dictionary")
    p.add_argument("--min-tokens", type=int, default=min_tokens, help="tokens a node needs to be refined")
    p.add_argument("--stream-tokens", type=int, default=stream_tokens,
                   help="corpus tokens streamed through the model beyond the run's store, per region")
    p.add_argument("--out", default=out, help="where the refined tree and its pages go")


def run_tree(args) -> ft.FeatureTree:
    """`ft.build` into args.run: it loads the finished run when one with these settings is there already."""
    return ft.build(ft.Config.from_args(args), out=args.run)


def print_subtree(tree, node: str, depth: int, top: int, indent: str = "  ") -> None:
    """The refined children of `node`, largest first (share of the parent's tokens), `depth` levels down."""
    g = tree.graph
    kids = sorted((c for c in g.successors(node) if g.nodes[c].get("refined")), key=lambda c: -g.nodes[c]["freq"])
    for c in kids[:top]:
        print(f"{indent}{c:<26} {g.edges[node, c]['reverse']:6.1%}  {g.nodes[c]['label']}")
        if depth > 1:
            print_subtree(tree, c, depth - 1, max(3, top // 3), indent + "    ")
    if len(kids) > top:
        print(f"{indent}... {len(kids) - top} more")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_args(p)
    p.add_argument("--query", default="biology", help="what the coarse feature should be about")
    p.add_argument("--depth", type=int, default=2, help="levels of refinement")
    p.add_argument("--max-children", type=int, default=4, help="children refined again at each level, largest first")
    refine_args(p, min_tokens=400, stream_tokens=300_000, out="runs/biology")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    tree = run_tree(args)
    coarse = [r for r in tree.rungs if "/" not in r][:2]  # the two narrowest ladder rungs: broad features
    hits = ft.find(tree, args.query, rungs=coarse, top=5)
    print(f"coarse features ({', '.join(coarse)}) that fire most on {args.query!r} over their usual rate:")
    for h in hits.itertuples():
        print(f"  {h.node:<10} score {h.score:5.2f}  fires on {h.query_rate:5.1%} of its tokens, {h.freq:5.2%} "
              f"usually  {h.label}")
    node = hits.node.iloc[0]

    deep = ft.refine(tree, node, width=args.width, depth=args.depth, max_children=args.max_children,
                     min_tokens=args.min_tokens, stream_tokens=args.stream_tokens)
    print(f"\n{node}  {deep.graph.nodes[node]['label']}")
    print_subtree(deep, node, args.depth, top=12)

    out = Path(args.out)
    ft.save(deep, out)
    write_sunburst(deep, out / "sunburst.html", root=node)
    write_explorer(deep, out / "explorer.html", root=node, max_depth=None)
    print(f"\nsaved {out}/; open {out}/sunburst.html or {out}/explorer.html (click a sector to zoom in)")
    return deep, node


if __name__ == "__main__":
    main()
