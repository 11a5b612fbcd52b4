"""Targeted depth-first search: follow only the branch that answers a query, refining where the ladder ends.

`ft.search` scores the children of the current node by how much more they fire on the query (the word
in the corpus sentences that use it) than on other tokens, steps to the best one, and, at a node with no
children, trains a local dictionary where it fires and keeps going: a coarse feature, then narrower ones,
then a feature of a dictionary trained inside the narrowest ladder feature.

    python examples/targeted_search.py                     # "malaria" on the default run (built if missing)
    python examples/targeted_search.py tuberculosis --start w512/148
    python examples/targeted_search.py --run runs/small --n-tokens 20000 --widths 32,128 --epochs 1 --width 16
"""

import argparse
import logging
from pathlib import Path

from biology_dfs import refine_args, run_args, run_tree

import featuretree as ft
from featuretree.explore import write_explorer


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("query", nargs="*", default=["malaria"], help="a word or phrase (several: example texts)")
    run_args(p)
    p.add_argument("--start", help="node to search under (default: the top-level features)")
    p.add_argument("--max-depth", type=int, default=6, help="steps down at most")
    refine_args(p, min_tokens=300, stream_tokens=100_000, out="runs/search")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    tree = run_tree(args)
    query = args.query[0] if len(args.query) == 1 else args.query
    path = ft.search(tree, query, start=args.start, max_depth=args.max_depth, width=args.width,
                     min_tokens=args.min_tokens, stream_tokens=args.stream_tokens)
    if path.empty:
        raise SystemExit(f"no top-level feature fires on {query!r} more than usual: try another word")
    print(f"search {query!r}: each step the child that fires most over its usual rate on it")
    for r in path.itertuples():
        where = "refined" if r.refined else "ladder "
        print(f"  {r.step}  {r.node:<22} {where}  score {r.score:5.2f}  on {r.query_rate:6.1%} of the query's "
              f"tokens, {r.freq:8.4%} of all  {r.label}")

    deep = path.attrs.pop("tree")
    out = Path(args.out)
    ft.save(deep, out)
    write_explorer(deep, out / "explorer.html", root=path.node.iloc[0], max_depth=None)
    print(f"saved {out}/; open {out}/explorer.html")
    return path


if __name__ == "__main__":
    main()
