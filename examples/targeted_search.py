"""Targeted depth-first search: follow only the branch that answers a query, refining where the ladder ends.

`ft.search` scores a word as a concept: each child of the current node by how many of the word's
occurrences in the corpus it fires on (all its subword pieces) times how specific its firing is to the
texts that use the word and texts near them in meaning, so a feature of a shared piece ("ant" in ants and
anthrax) loses to one about the topic. It steps to the child whose branch leads highest, and where no child
does better than the node itself it trains a local dictionary there, on a region that holds the word's
contexts first, and keeps going. On the default run "anthrax" goes cell -> bacteria -> a refined feature
labelled "anthrax" (docs/EVAL.md).

    python examples/targeted_search.py                     # "anthrax" on the default run (built if missing)
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
    p.add_argument("query", nargs="*", default=["anthrax"], help="a word or phrase (several: example texts)")
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
    deep = path.attrs.pop("tree")  # (pandas copies attrs on every operation on the frame)
    print(f"search {query!r}: each step the child whose branch answers best")
    for r in path.itertuples():
        where = "refined" if r.refined else "ladder "
        if r.passed:  # nodes on the way whose firing is not about the query
            print(f"     (passed over {r.passed})")
        print(f"  {r.step}  {r.node:<22} {where}  score {r.score:5.2f}  covers {r.coverage:4.0%} of its "
              f"occurrences, precision {r.precision:.3f}, confidence {r.confidence:4.0%}  {r.label}")
    out = Path(args.out)
    ft.save(deep, out)
    write_explorer(deep, out / "explorer.html", root=path.node.iloc[0], max_depth=None, highlight=list(path.node))
    print(f"saved {out}/; open {out}/explorer.html (the path is starred)")
    path.attrs["tree"] = deep
    return path


if __name__ == "__main__":
    main()
