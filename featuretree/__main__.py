"""The `featuretree` command line: build a run, export it, summarise it (one subcommand per public function).

    featuretree build --out runs/default            # embedded MiniLM, WordNet, default ladder
    featuretree export runs/default --html tree.html --explorer explorer.html --graphml tree.graphml --csv nodes.csv
    featuretree info runs/default
    featuretree faithful runs/smol                           # loss recovered / KL per rung (causal LMs)
    featuretree label runs/default [--labeler smollm2]        # relabel and score labels on held-out texts
    featuretree effects runs/smol w512/7                       # ablation / logits / steering (causal LMs)
    featuretree layers runs/L3 runs/L9 runs/L15               # features across layers: same / split / merge
    featuretree find runs/default biology                     # nodes that answer a query
    featuretree refine runs/default w2048/5 --width 64 --depth 2
    featuretree search runs/default anthrax                   # DFS down the branch that answers it
    featuretree serve runs/default                            # the explorer at http://127.0.0.1:8050/

User mistakes print one line on stderr and exit with status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from featuretree.config import Config, FeatureTreeError, RefineConfig, TrainConfig, list_flag

log = logging.getLogger("featuretree")

def _rung_line(tree, frame, rung: str) -> str:
    """One rung's held-out metrics and node counts, e.g. 'w512  FVU 0.273  L0 16.0  dead 0.0%  live 512  linked 500',
    then '  loss recovered 0.912  KL 0.153' when the rung was measured in a causal LM (featuretree.faithful)."""
    m, sub = tree.saes[rung].metrics, frame[frame.rung == rung]
    nan = float("nan")
    line = (f"{rung:<10} FVU {m.get('fvu', nan):.3f}  L0 {m.get('l0', nan):.1f}  "
            f"dead {100 * m.get('dead_fraction', nan):.1f}%  live {len(sub)}  linked {int(sub.parent.notna().sum())}")
    if m.get("loss_recovered") is not None and m.get("kl") is not None:
        line += f"  loss recovered {m['loss_recovered']:.3f}  KL {m['kl']:.3f}"
    arch = getattr(tree.saes[rung], "architecture", "topk")
    return line + (f"  ({arch})" if arch != "topk" else "")


def _ladder(tree) -> list[str]:
    """The ladder's rungs, narrow to wide (refined rungs such as "w512/7/r64" left out)."""
    return [r for r in tree.rungs if "/" not in r]


def _ladder_target(cfg: Config, ladder: dict, args: argparse.Namespace) -> Config:
    """The model and layer a loaded ladder reads, from its own files, where --model / --layer were not given; a
    --layer that differs from the dictionaries' hook is an error (their features would be read off another layer)."""
    from featuretree.ladders import hf_model_name, ladder_site

    site = ladder_site(ladder)
    changes = {}
    if site["layer"] is not None:
        if args.layer is not None and args.layer != site["layer"]:
            raise FeatureTreeError(f"--layer {args.layer}, but the dictionaries read {site['hook_name']} (layer "
                                   f"{site['layer']}, a block's output): drop --layer or pass --layer {site['layer']}")
        changes["layer"] = site["layer"]
    if args.model is None and site["model_name"]:
        changes["model"] = hf_model_name(site["model_name"])
    if changes:
        log.info("the ladder reads %s of %s (from its files)", site["hook_name"] or f"layer {cfg.layer}",
                 changes.get("model", cfg.model))
    return Config.from_dict({**cfg.to_dict(), **changes}) if changes else cfg


def cmd_build(args: argparse.Namespace) -> int:
    """featuretree build: harvest, train the ladder, link, save the run and write its sunburst."""
    from featuretree.export import to_frame
    from featuretree.scale import build

    cfg = Config.from_args(args)
    out = Path(args.out)
    kw = dict(executor=args.executor, address=args.ray_address, force=args.force, progress=not args.quiet,
              checkpoint_every=args.checkpoint_every, shard_size=args.shard_size, store_dtype=args.store_dtype)
    if args.ladder:
        from featuretree.ladders import load_ladder

        src = list(args.ladder)
        one = src[0] if len(src) == 1 else src
        if len(src) == 1 and not Path(src[0]).is_dir() and (args.release_widths or args.release_ids):
            if args.release_widths and not args.release_ids and args.layer is None:
                raise FeatureTreeError("--release-widths picks a release's dictionaries of one layer: pass --layer N "
                                       "too (or name them exactly with --release-ids)")
            kw["ladder"] = load_ladder(src[0], layer=args.layer, widths=args.release_widths or None,
                                       sae_ids=args.release_ids or None, max_codes=args.max_codes)
        else:
            kw["ladder"] = load_ladder(one, prefixes=args.prefixes or None, max_codes=args.max_codes)
        log.info("linking %s (no training)", ", ".join(f"{r} {getattr(s, 'architecture', 'topk')}"
                                                       for r, s in kw["ladder"].items()))
        cfg = _ladder_target(cfg, kw["ladder"], args)
    if args.layers:
        trees = build(cfg, out=out, layers=list(args.layers), **kw)
        for layer, tree in trees.items():
            frame = to_frame(tree)
            for rung in _ladder(tree):
                log.info("layer %d %s", layer, _rung_line(tree, frame, rung))
        sys.stdout.write(f"wrote {', '.join(f'{out}/L{v}/' for v in trees)}; link them with: featuretree layers "
                         f"{' '.join(f'{out}/L{v}' for v in trees)}\n")
        return 0
    tree = build(cfg, out=out, **kw)
    html = out / "sunburst.html"
    frame = to_frame(tree)
    for rung in _ladder(tree):
        log.info("%s", _rung_line(tree, frame, rung))
    sys.stdout.write(f"wrote {out}/ ({len(frame)} features, {tree.graph.number_of_edges()} edges); open {html}\n")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """featuretree train: a ladder from an existing activation store; data parallel under torchrun."""
    from featuretree.activations import Activations
    from featuretree.checkpoint import Resume
    from featuretree.config import TrainConfig
    from featuretree.scale import Comm, train_ladder

    store = Path(args.store)
    if not (store / "meta.json").is_file() and (store / "acts" / "meta.json").is_file():
        store = store / "acts"  # a run directory: its store
    acts = Activations(store)
    cfg = TrainConfig.from_args(args)
    comm = Comm.from_env(cfg.device)
    rank0 = comm is None or comm.rank == 0
    out = Path(args.out)
    resume = Resume(out / "train.ckpt.safetensors", every=args.checkpoint_every)
    if comm is not None:  # data parallel: one process group, every rank trains its slice of each batch
        from featuretree.train import train_ladder as serial

        saes = serial(acts, config=cfg, comm=comm, out=out, checkpoint=resume, progress=rank0 and not args.quiet)
    else:
        saes = train_ladder(acts, config=cfg, executor=args.executor, address=args.ray_address, checkpoint=resume,
                            progress=not args.quiet)
        for w, sae in saes.items():
            sae.save(out / f"w{w}")
    if rank0:
        lines = [f"w{w:<9} FVU {s.metrics['fvu']:.4f}  L0 {s.metrics['l0']:.1f}  dead {100 * s.metrics['dead_fraction']:.1f}%"
                 for w, s in saes.items()]
        where = f" on {comm.world} processes" if comm is not None else ""
        lines.append(f"wrote {out}/w<width>/ (SAELens layout){where}; link them with "
                     f"ft.link([ft.TopKSAE.load(d) for d in ...], featuretree.activations.Activations({str(store)!r}))")
        sys.stdout.write("\n".join(lines) + "\n")
    if comm is not None:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """featuretree export: write a saved run as sunburst / icicle HTML, an explorer page, GraphML and/or CSV."""
    from featuretree.explore import write_explorer, write_sunburst
    from featuretree.export import load, to_frame, to_graphml

    tree = load(args.run)
    if not any((args.html, args.explorer, args.graphml, args.csv)):
        raise FeatureTreeError("nothing to export: pass --html FILE, --explorer FILE, --graphml FILE and/or --csv FILE")
    if args.html:
        write_sunburst(tree, args.html, root=args.root, max_depth=args.max_depth, color=args.color, kind=args.kind)
        sys.stdout.write(f"wrote {args.html}\n")
    if args.explorer:
        write_explorer(tree, args.explorer, root=args.root, max_depth=args.max_depth or 3, color=args.color, run=args.run,
                       kind=args.kind)
        sys.stdout.write(f"wrote {args.explorer}\n")
    if args.graphml:
        to_graphml(tree, args.graphml)
        sys.stdout.write(f"wrote {args.graphml}\n")
    if args.csv:
        from featuretree.utils import write_text

        write_text(args.csv, to_frame(tree).to_csv(index=False))
        sys.stdout.write(f"wrote {args.csv}\n")
    return 0


def cmd_find(args: argparse.Namespace) -> int:
    """featuretree find: the nodes of a saved run that answer a query, best first."""
    from featuretree.export import load
    from featuretree.find import find

    tree = load(args.run)
    query = args.query[0] if len(args.query) == 1 else args.query  # one phrase: looked up in the corpus
    hits = find(tree, query, negatives=args.negative or None, top=args.top, level=args.level)
    cols = ["node", "score", "query_rate", "freq", "label"]
    if (hits.doc_rate > 0).any() and not isinstance(query, str):  # example texts: how many of them each fires in
        cols[3:3] = ["doc_rate", "background_rate"]
    if args.json:
        _write_records(args.json, {"query": args.query, "hits": hits[cols]})
    sys.stdout.write(hits[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}") + "\n")
    return 0


def _write_records(path: str, obj: dict) -> None:
    """Write `obj` as JSON to `path` (atomically), each DataFrame in it as a list of records (NaN as null)."""
    import json

    from featuretree.utils import write_json

    def plain(v):
        if hasattr(v, "to_json"):  # a DataFrame: its records, numbers as JSON numbers, NaN as null
            return json.loads(v.to_json(orient="records"))
        return v

    write_json(path, {k: plain(v) for k, v in obj.items()})


def _subtree_lines(tree, node: str, depth: int, indent: str = "  ") -> list[str]:
    """The refined children of `node` (largest first), one line each, down `depth` levels."""
    g = tree.graph
    kids = sorted((c for c in g.successors(node) if g.nodes[c].get("refined")), key=lambda c: -g.nodes[c]["freq"])
    lines = []
    for c in kids:
        e = g.edges[node, c]
        lines.append(f"{indent}{c:<24} {100 * e['reverse']:5.1f}% of parent  {g.nodes[c].get('label', c)}")
        if depth > 1:
            lines += _subtree_lines(tree, c, depth - 1, indent + "  ")
    return lines


def _save_into(tree, run: str, out: str | None) -> Path:
    """Save a tree refined from run RUN into --out (default: RUN itself) and write its explorer page there."""
    from featuretree.explore import write_explorer
    from featuretree.export import save

    dest = Path(out) if out else Path(run)
    save(tree, dest)
    write_explorer(tree, dest / "sunburst.html", run=dest)
    return dest


def cmd_refine(args: argparse.Namespace) -> int:
    """featuretree refine: train a local dictionary where NODE fires, attach its features, recurse; save the run."""
    from featuretree.config import RefineConfig
    from featuretree.explore import write_explorer
    from featuretree.export import load
    from featuretree.scale import refine

    tree = load(args.run)
    ckpt = Path(args.out or args.run) / "ckpt" / "refine"
    if args.force:
        import shutil

        shutil.rmtree(ckpt, ignore_errors=True)
    rc = RefineConfig.from_args(args)
    deep = refine(tree, args.node, rc, executor=args.executor, address=args.ray_address, checkpoint=ckpt,
                  progress=not args.quiet)
    dest = _save_into(deep, args.run, args.out)
    lines = [f"{args.node}  {deep.graph.nodes[args.node].get('label', '')}", *_subtree_lines(deep, args.node, rc.depth)]
    if args.html:
        write_explorer(deep, args.html, root=args.node, max_depth=None, run=args.run)
        lines.append(f"wrote {args.html}")
    lines.append(f"saved {dest}/")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    """featuretree search: targeted depth-first search for QUERY, refining the branch it follows; save the run."""
    from featuretree.config import RefineConfig
    from featuretree.explore import write_explorer
    from featuretree.export import load
    from featuretree.find import SEARCH_REFINE, search

    tree = load(args.run)
    query = args.query[0] if len(args.query) == 1 else args.query
    path = search(tree, query, RefineConfig.from_args(args, SEARCH_REFINE), start=args.start,
                  max_depth=args.max_depth, negatives=args.negative or None, refine_leaves=not args.no_refine,
                  progress=not args.quiet, min_lift=args.min_lift)
    deep = path.attrs.pop("tree")
    if not len(path):
        raise FeatureTreeError(f"no top-level feature fires on {args.query[0]!r} more than it usually does: "
                               "try another word, or example texts that contain it")
    cols = ["step", "node", "score", "coverage", "precision", "confidence", "label"]
    if path["coverage"].isna().all():  # example texts: scored by document, no concept columns
        cols = ["step", "node", "score", "query_rate", "confidence", "label"]
    if (path["passed"] != "").any():  # the nodes stepped through that are not about the query
        cols.append("passed")
    lines = [path[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}")]
    saved = None
    if path.refined.any() and not args.no_save:
        saved = _save_into(deep, args.run, args.out)
        lines.append(f"saved the refinements to {saved}/")
    if args.json:
        _write_records(args.json, {"query": args.query, "path": path[[*cols, "refined"]],
                                   "saved": str(saved) if saved is not None else None})
    if args.html:
        write_explorer(deep, args.html, root=path.node.iloc[0], max_depth=None, highlight=list(path.node),
                       run=args.run)
        lines.append(f"wrote {args.html}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """featuretree serve: the run's explorer as a local web app (nodes on demand; find / refine / search)."""
    from featuretree.serve import serve

    serve(args.run, host=args.host, port=args.port)
    return 0


def cmd_match(args: argparse.Namespace) -> int:
    """featuretree match: which features two saved runs share, by activation correlation on RUN_A's tokens."""
    from featuretree.activations import Activations
    from featuretree.compare import match
    from featuretree.export import load

    tree_a, tree_b = load(args.run_a), load(args.run_b)
    store = Path(args.run_a) / (tree_a.graph.graph.get("acts") or "acts")
    if not (store / "meta.json").is_file():
        raise FeatureTreeError(f"{args.run_a} has no activation store at {store}: match compares the runs on "
                               "RUN_A's held-out tokens; run it on a directory written by `featuretree build`")
    acts = Activations(store)
    key = [(t.config.model, t.config.layer) if t.config is not None else None for t in (tree_a, tree_b)]
    if key[0] is not None and key[1] is not None and key[0] != key[1]:  # other model or layer: run both on RUN_A's texts
        docs = acts.texts()
        held = [t for d, t in sorted(docs.items()) if acts.heldout_every and d % acts.heldout_every == 0]
        m = match(tree_a, tree_b, texts=held or list(docs.values()), rung_a=args.rung_a, rung_b=args.rung_b,
                  threshold=args.threshold, max_tokens=args.max_tokens, min_tokens=args.min_tokens)
    else:
        m = match(tree_a, tree_b, acts, rung_a=args.rung_a, rung_b=args.rung_b, threshold=args.threshold,
                  max_tokens=args.max_tokens, min_tokens=args.min_tokens)
    lines = [m.summary()]
    if len(m.pairs):
        cols = ["a", "b", "corr", "cos", "label_a", "label_b"]
        lines.append(m.pairs[cols].head(args.top).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def cmd_novel(args: argparse.Namespace) -> int:
    """featuretree novel: the nodes of a saved run whose firing on new texts departs most from the corpus."""
    from featuretree.export import load
    from featuretree.find import novel

    path = Path(args.textfile)
    if not path.is_file():
        raise FeatureTreeError(f"no text file at {path}: give a file with one text per line")
    texts = [t for t in path.read_text(encoding="utf-8").splitlines() if t.strip()]
    if not texts:
        raise FeatureTreeError(f"{path} has no text: write one text per line")
    df = novel(load(args.run), texts, top=args.top)
    cols = ["node", "log_ratio", "direction", "rate", "freq", "label"]
    sys.stdout.write(df[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}") + "\n")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """featuretree info: per-rung metrics and the widest-reaching nodes of a saved run."""
    from featuretree.export import load, to_frame
    from featuretree.utils import rung_key

    tree = load(args.run)
    _merge_faithfulness(tree, Path(args.run))
    frame = to_frame(tree)
    cfg = tree.config
    where = (f" (model {cfg.model}, layer {cfg.layer}" + (f", site {cfg.site}" if cfg.site else "") + ")") if cfg else ""
    lines = [f"run {args.run}: {len(frame)} features in {len(tree.rungs)} rungs, {tree.graph.number_of_edges()} edges"
             f"{where}"]
    lines += [f"  {_rung_line(tree, frame, rung)}" for rung in _ladder(tree)]
    scored: dict[str, list[float]] = {}
    for _, d in tree.graph.nodes(data=True):
        v = d.get("label_score")
        if v is not None and v == v:
            scored.setdefault(str(d.get("rung")), []).append(float(v))
    if scored:
        lines.append("  label score (featuretree label; 0.5 = chance): " + "  ".join(
            f"{r} {sum(v) / len(v):.3f} ({len(v)})" for r, v in sorted(scored.items(), key=lambda kv: rung_key(kv[0]))))
    refined = tree.graph.graph.get("refined") or {}
    if refined:
        lines.append(f"  + {len(refined)} refined dictionaries under {len({v['parent'] for v in refined.values()})} "
                     f"nodes ({sum(1 for _, d in tree.graph.nodes(data=True) if d.get('refined'))} refined features)")
    top = frame[(frame.depth == 0) & (frame.kind != "novel")].sort_values("freq", ascending=False).head(args.top)
    lines.append(f"top {len(top)} root features by firing rate:")
    lines += [f"  {r.node:<12} {100 * r.freq:5.1f}%  {r.label}" for r in top.itertuples()]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _label_nodes(tree, args: argparse.Namespace) -> list[str]:
    """The nodes `featuretree label` works on: --nodes, else features firing at >= --min-freq, the --max-nodes
    most frequent of them, or as many drawn at random with --random (default: all for the model-free labels,
    200 for a labeler model)."""
    g = tree.graph
    if args.nodes:
        missing = [n for n in args.nodes if n not in g]
        if missing:
            raise FeatureTreeError(f"unknown nodes {missing[:5]} in {args.run}: ids look like 'w512/7'; list them with "
                                   "`featuretree export RUN --csv nodes.csv`")
        return list(dict.fromkeys(args.nodes))
    nodes = [n for n, d in g.nodes(data=True) if not d.get("virtual") and float(d.get("freq") or 0) >= args.min_freq]
    cap = args.max_nodes if args.max_nodes is not None else (None if args.labeler == "auto" else 200)
    if cap is not None and len(nodes) > cap:
        if args.random:
            import numpy as np

            pick = np.random.default_rng(args.seed).choice(len(nodes), size=cap, replace=False)
            nodes = [nodes[i] for i in sorted(pick)]
            log.info("labelling %d of the run's features drawn at random (--max-nodes, --random)", cap)
        else:
            nodes = sorted(nodes, key=lambda n: -float(g.nodes[n].get("freq") or 0))[:cap]
            log.info("labelling the %d most frequent of the run's features (--max-nodes)", cap)
    return nodes


def cmd_label(args: argparse.Namespace) -> int:
    """featuretree label: relabel nodes (model-free, or by a local causal LM) and score every label; save the run."""
    import numpy as np

    from featuretree.activations import Activations
    from featuretree.export import load, save
    from featuretree.label import CausalLMLabeler, label_tree, score_labels
    from featuretree.utils import store_path

    tree = load(args.run)
    store = store_path(tree)
    if store is None or not (store / "meta.json").is_file():
        raise FeatureTreeError(f"{args.run} has no activation store: label scores read its held-out texts; run it on "
                               "a directory written by `featuretree build`")
    acts, g = Activations(store), tree.graph
    nodes = _label_nodes(tree, args)
    if not nodes:
        raise FeatureTreeError(f"no feature of {args.run} fires at >= {args.min_freq}: lower --min-freq")
    opts = {"max_docs": args.max_docs, "seed": args.seed, "progress": not args.quiet}
    before = None
    for n in nodes:  # every run starts from the model-free labels (a model relabels them anew)
        d = g.nodes[n]
        if "auto_label" in d:
            d["label"] = d.pop("auto_label")
        d.pop("auto_label_score", None)
    if args.labeler != "auto":
        before = score_labels(tree, acts, nodes=nodes, **opts).set_index("node")
        labeler = CausalLMLabeler.load(args.labeler, max_new_tokens=args.max_new_tokens)
        label_tree(tree, labeler, nodes=nodes, progress=not args.quiet)
    scores = score_labels(tree, acts, nodes=nodes, **opts).set_index("node")
    if before is not None:
        for n in nodes:
            g.nodes[n]["auto_label_score"] = float(before.label_score.get(n, np.nan))
    lines = [f"{len(scores)} labels scored on held-out texts (detection / fuzzing AUROC, MiniLM scorer; 0.5 = chance)"]
    for name, df in (("model-free", before), (args.labeler, scores)) if before is not None else (("model-free", scores),):
        lines.append(f"  {name:<12} label_score {np.nanmean(df.label_score):.3f}  detection "
                     f"{np.nanmean(df.detection):.3f}  fuzzing {np.nanmean(df.fuzzing):.3f}  "
                     f"({int(df.label_score.notna().sum())} scored)")
    show = scores.label_score.dropna().sort_values(ascending=False)
    picks = list(show.index[:args.show // 2]) + list(show.index[-(args.show - args.show // 2):]) if args.show else []
    for n in dict.fromkeys(picks):
        d = g.nodes[n]
        was = f"  (model-free {before.label_score[n]:.2f}: {d.get('auto_label', '')})" if before is not None else ""
        lines.append(f"  {n:<18} {scores.label_score[n]:.2f}  {d.get('label', '')}{was}")
    if args.csv:
        out = scores.reset_index()
        out["label"] = [g.nodes[n].get("label", "") for n in out.node]
        if before is not None:
            out["auto_label"] = [g.nodes[n].get("auto_label", "") for n in out.node]
            out["auto_label_score"] = before.label_score.reindex(out.node).to_numpy()
        from featuretree.utils import write_text

        write_text(args.csv, out.to_csv(index=False))
        lines.append(f"wrote {args.csv}")
    if not args.no_save:
        save(tree, args.run, dictionaries=False)
        lines.append(f"saved {args.run}/ (labels and label_score on the nodes)")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def cmd_effects(args: argparse.Namespace) -> int:
    """featuretree effects: what NODE does to the run's causal LM (ablation, promoted tokens, steering)."""
    from featuretree.effect import effects
    from featuretree.export import load
    from featuretree.utils import write_json

    tree = load(args.run)
    texts = list(args.text or [])
    if args.textfile:
        texts += [t for t in Path(args.textfile).read_text(encoding="utf-8").splitlines() if t.strip()]
    e = effects(tree, args.node, texts or None, max_docs=args.max_docs, top=args.top, prompt=args.prompt,
                scale=args.scale, progress=not args.quiet)
    lines = [str(e)]
    if not args.no_save:
        dest = Path(args.run) / "effects" / (args.node.replace("/", "_") + ".json")
        write_json(dest, {"node": e.node, "summary": e.summary, "docs": e.docs.to_dict("records"),
                          "subtree": e.subtree.to_dict("records"), "logits": e.logits.to_dict("records"),
                          "steering": e.steering.to_dict("records")})
        lines.append(f"wrote {dest}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    """featuretree layers: link the features of runs at several layers (same / split / merge) and summarise."""
    import pandas as pd

    from featuretree.crosslayer import as_tree, link_layers
    from featuretree.export import load, to_graphml

    trees = [load(r) for r in args.runs]
    if args.upstream:
        from featuretree.crosslayer import upstream

        up = upstream(trees, args.upstream, top=args.show, progress=not args.quiet)
        sys.stdout.write(f"earlier features driving {args.upstream} (activation x gradient of its pre-activation, "
                         "per position where it fires):\n" + up.to_string(index=False, float_format=lambda v: f"{v:.4g}")
                         + "\n")
        return 0
    g = link_layers(trees, rungs=args.rungs, min_coverage=args.min_coverage)
    lines = [f"{g.number_of_nodes()} features of layers {g.graph['layers']} ({', '.join(g.graph['rungs'])}), "
             f"{g.number_of_edges()} cross-layer edges"]
    edges = pd.DataFrame([{"a": u, "b": v, **d} for u, v, d in g.edges(data=True)])
    for (la, lb), sub in (edges.groupby([edges.a.str.split(":").str[0], edges.b.str.split(":").str[0]], sort=False)
                          if len(edges) else []):
        counts = sub.kind.value_counts()
        lines.append(f"  {la} -> {lb}: " + "  ".join(f"{k} {int(counts.get(k, 0))}" for k in ("same", "split", "merge",
                                                                                            "into")))
        for a, grp in list(sub[sub.kind == "split"].groupby("a"))[:args.show]:
            kids = "; ".join(f"{g.nodes[b]['label']} ({p:.2f})" for b, p in zip(grp.b, grp.p_later))
            lines.append(f"    split {a} '{g.nodes[a]['label']}' -> {kids}")
    if args.graphml:
        to_graphml(g, args.graphml)
        lines.append(f"wrote {args.graphml}")
    if args.html:
        from featuretree.explore import write_sunburst

        write_sunburst(as_tree(g), args.html)
        lines.append(f"wrote {args.html}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _merge_faithfulness(tree, run: Path) -> None:
    """Fill the rungs' loss recovered / KL from RUN/faithfulness.json (`featuretree faithful`) where missing."""
    import json

    from featuretree.faithful import FAITHFUL_FILE, METRIC_KEYS

    path = run / FAITHFUL_FILE
    if not path.is_file():
        return
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))["rungs"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("%s is unreadable (%s): run `featuretree faithful %s` again", path, e, run)
        return
    for row in rows:
        sae = tree.saes.get(row.get("rung"))
        if sae is not None and "loss_recovered" not in sae.metrics:
            sae.metrics.update({k: row[k] for k in METRIC_KEYS if row.get(k) is not None})


def cmd_faithful(args: argparse.Namespace) -> int:
    """featuretree faithful: loss recovered and KL of each rung spliced into the run's (causal) model."""
    from featuretree.activations import Activations
    from featuretree.export import load
    from featuretree.faithful import FAITHFUL_FILE, record_faithfulness
    from featuretree.model import load_model
    from featuretree.utils import store_path

    tree = load(args.run)
    if tree.config is None:
        raise FeatureTreeError(f"{args.run} records no config (model and layer): run it on a directory written by "
                               "`featuretree build`")
    store = store_path(tree)
    if store is None or not (store / "meta.json").is_file():
        raise FeatureTreeError(f"{args.run} has no activation store: faithfulness reads its held-out documents; "
                               "run it on a directory written by `featuretree build`")
    saes = {rung: tree.saes[rung] for rung in _ladder(tree)}
    frame = record_faithfulness(load_model(tree.config.model), tree.config.layer, saes, Activations(store), args.run,
                                max_tokens=args.max_tokens, max_docs=args.max_docs, batch_size=args.batch_size,
                                progress=not args.quiet, site=tree.config.site)
    lines = [frame.to_string(index=False, float_format=lambda v: f"{v:.4f}"), f"wrote {Path(args.run) / FAITHFUL_FILE}"]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """featuretree eval planted: parent-edge precision / recall of the linking rules on planted hierarchies."""
    from featuretree.eval import compare_rules

    args.runs = list(args.run or [])
    args.run = args.runs[0] if args.runs else None
    if len(args.runs) > 1 and args.what != "senses":
        raise FeatureTreeError(f"featuretree eval {args.what} takes one run (only `eval senses` compares several)")

    if args.what == "wordnet":
        return _eval_wordnet(args)
    if args.what == "refine":
        return _eval_refine(args)
    if args.what == "find":
        return _eval_find(args)
    if args.what == "search":
        return _eval_search(args)
    if args.what == "senses":
        return _eval_senses(args)
    if args.configs is None:
        from featuretree.eval import PLANTED_CONFIGS

        args.configs = list(PLANTED_CONFIGS)
    if args.n_train < 1000:
        raise FeatureTreeError(f"--n-train {args.n_train} is too few planted tokens to train a ladder: use >= 1000")
    if args.sweep:
        from featuretree.eval import sweep_thresholds

        df = sweep_thresholds(args.configs, args.seeds, n_train=args.n_train, progress=not args.quiet)
        keys = ["threshold", "value"]
    else:
        df = compare_rules(args.configs, args.seeds, n_train=args.n_train, progress=not args.quiet, nested=args.nested)
        keys = ["config", "rule"]
    table = df.groupby(keys, sort=False)[["precision", "recall", "recovered"]].agg(["mean", "min"])
    out = [df.drop(columns=[c for c in df if c.startswith("miss: ")]).to_string(index=False), "",
           table.round(3).to_string()]
    misses = [c for c in df if c.startswith("miss: ")]
    if misses:  # why the combined rule's tree misses true edges, summed over seeds
        why = df[df.rule == "combined"].groupby("config", sort=False)[misses].sum()
        why.columns = [c[len("miss: "):] for c in misses]
        out += ["", "true edges the combined rule misses, by reason (edge_misses; summed over seeds):",
                why.T.to_string()]
    sys.stdout.write("\n".join(out) + "\n")
    return _write_csv(args, df)


def _write_csv(args: argparse.Namespace, df) -> int:
    """Write `df` to --csv when given; the exit code 0."""
    if args.csv:
        from featuretree.utils import write_text

        write_text(args.csv, df.to_csv(index=False))
    return 0


def _wordnet_run(args: argparse.Namespace, what: str):
    """The saved tree of RUN for `featuretree eval WHAT RUN`, or one clear error when RUN is missing."""
    from featuretree.export import load

    if not args.run:
        raise FeatureTreeError(f"featuretree eval {what} needs a run directory built on the WordNet corpus: "
                               f"featuretree eval {what} runs/default")
    return load(args.run)


def _eval_refine(args: argparse.Namespace) -> int:
    """Purity of refined children vs their parent, per local width and k, on a WordNet run."""
    from featuretree.activations import Activations
    from featuretree.corpus import load_corpus
    from featuretree.eval import refine_purity
    from featuretree.export import load

    if not args.run or not args.nodes:
        raise FeatureTreeError("featuretree eval refine needs a WordNet run and nodes to refine: "
                               "featuretree eval refine runs/default --nodes w512/148 w128/66")
    tree = load(args.run)
    acts = Activations(Path(args.run) / tree.graph.graph.get("acts", "acts"))
    df = refine_purity(tree, acts, load_corpus("wordnet").labels, args.nodes, widths=args.widths, ks=args.ks,
                       progress=not args.quiet,
                       stream_tokens=RefineConfig.from_args(args).stream_tokens)
    sys.stdout.write(df.to_string(index=False, float_format=lambda v: f"{v:.3f}") + "\n")
    return _write_csv(args, df)


def _eval_find(args: argparse.Namespace) -> int:
    """Purity of find's top node per WordNet domain, given glosses of the domain, by token and by document."""
    import pandas as pd

    from featuretree.corpus import load_corpus
    from featuretree.eval import find_purity

    tree = _wordnet_run(args, "find")
    corpus = load_corpus("wordnet")
    parts, out = [], []
    for column in ("lexname", "domains"):
        df = find_purity(tree, corpus, column=column, n_query=args.n_query, n_pool=args.n_pool,
                         n_background=min(300, args.n_pool // 3), min_docs=min(30, max(5, args.n_pool // 100)),
                         seed=args.seeds[0],
                         progress=not args.quiet)
        parts.append(df)
        if df.empty:
            continue
        wide = df.pivot(index="domain", columns="level", values=["purity", "node"])
        table = pd.DataFrame({"base": df.groupby("domain").base_rate.first(),
                              "token": wide["purity"]["token"], "token node": wide["node"]["token"],
                              "document": wide["purity"]["document"], "document node": wide["node"]["document"]})
        out.append(f"{column}: purity of the top node given {args.n_query} glosses of the domain "
                   f"({len(table)} domains)")
        out.append(table.to_string(float_format=lambda v: f"{v:.2f}"))
        out.append(f"  mean purity: token {table.token.mean():.3f}, document {table.document.mean():.3f}, "
                   f"base rate {table.base.mean():.3f}\n")
    sys.stdout.write("\n".join(out) + "\n")
    return _write_csv(args, pd.concat(parts))


def _eval_search(args: argparse.Namespace) -> int:
    """Search quality on WordNet query nouns: end-node precision / recall against the query's spans, coherence."""
    import pandas as pd

    from featuretree.corpus import load_corpus
    from featuretree.eval import search_quality, search_queries

    tree = _wordnet_run(args, "search")
    corpus = load_corpus("wordnet")
    queries = search_queries(corpus, split=args.split, n=args.n_queries, seed=args.seeds[0])
    parts = [search_quality(tree, corpus, queries, level=level, refine=args.refine, n_pool=args.n_pool,
                            seed=args.seeds[0], progress=not args.quiet).assign(level=level)
             for level in args.levels]
    df = pd.concat(parts, ignore_index=True)
    cols = ["precision", "recall", "f1", "coherent", "path_coherent", "domain_coherent", "depth"]
    table = df.groupby("level", sort=False)[cols].mean()
    table.insert(0, "queries", df.groupby("level", sort=False).size())
    out = [f"search quality on {len(queries)} WordNet query nouns ({args.split} half"
           f"{', refining leaves' if args.refine else ', walking the saved tree'}):",
           table.to_string(float_format=lambda v: f"{v:.3f}"), ""]
    for level, grp in df.groupby("level", sort=False):
        out.append(f"{level}: first queries, their paths and end labels")
        for r in grp.head(args.show).itertuples():
            out.append(f"  {r.word:<16} {r.lexname:<20} {r.path}  | {r.end_label}  "
                       f"(P {r.precision:.3f} R {r.recall:.2f})")
    sys.stdout.write("\n".join(out) + "\n")
    return _write_csv(args, df)


def _eval_senses(args: argparse.Namespace) -> int:
    """Sense splitting of polysemous WordNet nouns, per run (layer) and rung: knn / raw / chance / F1 / AMI."""
    import pandas as pd

    from featuretree.corpus import load_corpus
    from featuretree.export import load
    from featuretree.senses import sense_examples, sense_scores, sense_words

    _wordnet_run(args, "senses")
    corpus = load_corpus("wordnet")
    occ = sense_words(corpus, n=args.n_queries, seed=args.seeds[0])
    out = [f"sense splitting: {occ.word.nunique()} polysemous WordNet nouns, {len(occ)} sense-labelled occurrences "
           f"({occ.groupby('word').sense.nunique().sum()} senses) in their own glosses"]
    parts, examples = [], []
    for run in args.runs:
        tree = load(run)
        layer = tree.config.layer if tree.config is not None else None
        model = tree.config.model if tree.config is not None else "?"
        sc = sense_scores(tree, corpus, occ, progress=not args.quiet)
        parts.append(sc.assign(run=run, model=str(model), layer=layer))
        for r in sense_examples(tree, sc, corpus, n=args.show).itertuples():
            examples.append(f"  {r.word:<12} {run} layer {layer} {r.rung}: {r.separated} senses separated")
            examples += [f"      {line}" for line in r.senses]
    df = pd.concat(parts, ignore_index=True)
    raw = df[df.rung == "raw"].groupby(["run", "layer"], sort=False).knn.mean().rename("knn_raw")
    table = (df[df.rung != "raw"].groupby(["run", "layer", "rung"], sort=False)[["knn", "chance", "f1", "f1_base", "ami"]]
             .mean().join(raw, on=["run", "layer"]))
    out += [table.to_string(float_format=lambda v: f"{v:.3f}"), "", "words whose senses single features separate:",
            *examples]
    sys.stdout.write("\n".join(out) + "\n")
    return _write_csv(args, df.drop(columns=["best"]))


def _eval_wordnet(args: argparse.Namespace) -> int:
    """Purity of a saved run's nodes against WordNet lexicographer files and topic domains."""
    from featuretree.activations import Activations
    from featuretree.corpus import load_corpus
    from featuretree.eval import label_purity, purity_gain

    tree = _wordnet_run(args, "wordnet")
    acts = Activations(Path(args.run) / tree.graph.graph.get("acts", "acts"))
    labels = load_corpus("wordnet").labels
    out = []
    for column in ("lexname", "domains"):
        pur = label_purity(tree, acts, labels, column=column)
        gain = purity_gain(tree, pur)
        out.append(f"{column}: mean purity per rung (nodes firing on >= 20 held-out tokens)")
        for rung, grp in pur.groupby("rung", sort=False):
            out.append(f"  {rung:<10} nodes {len(grp):5d}  mean {grp.purity.mean():.3f}  max {grp.purity.max():.3f}")
        out.append(f"  child purer than parent on {gain['child_purer']:.1%} of {gain['n_edges']} edges "
                   f"(mean gain {gain['mean_gain']:+.3f})")
        for lab, grp in pur[pur.purity >= 0.5].groupby("top"):
            best = grp.sort_values("purity", ascending=False).iloc[0]
            out.append(f"  {lab:<24} {len(grp):4d} nodes >= 0.5 pure; best {best.node} "
                       f"{best.purity:.2f}: {tree.graph.nodes[best.node].get('label', '')}")
    sys.stdout.write("\n".join(out) + "\n")
    return 0


def scale_args(parser: argparse.ArgumentParser, what: str) -> None:
    """--executor and --ray-address: where the work runs (featuretree.scale), chosen above the pipeline."""
    parser.add_argument("--executor", choices=("serial", "ray"), default="serial",
                        help=f"{what} (default: serial; ray needs pip install 'featuretree[ray]')")
    parser.add_argument("--ray-address", help="Ray cluster for --executor ray (default: the running or a new local one)")


def make_parser() -> argparse.ArgumentParser:
    """The argparse parser for all subcommands (exposed for docs and tests).

    Example:
        >>> make_parser().parse_args(["info", "runs/x"]).run
        'runs/x'
    """
    from featuretree.find import MIN_LIFT, SEARCH_REFINE

    p = argparse.ArgumentParser(
        prog="featuretree",
        description="Explore how features split inside neural networks: harvest one layer's activations, "
                    "train a ladder of TopK dictionaries of increasing width, and link each feature to its "
                    "parent in the next narrower rung.",
        epilog="Example: featuretree build --out runs/default && featuretree info runs/default",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars and only warnings in the log")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    b = sub.add_parser("build", help="harvest activations, train the ladder, link the tree, write a sunburst",
                       description="Run the whole pipeline and save it as a run directory: config.json, acts/, "
                                   "saes/w<width>/ (SAELens format), tree.json and sunburst.html. Every long step "
                                   "checkpoints: rerun the same command after a kill to resume (the result is the "
                                   "same tree). A finished run with the same settings is loaded; a directory "
                                   "holding other settings is refused unless --force.")
    Config.add_arguments(b)
    b.add_argument("--out", default="runs/default", help="run directory to write (default: runs/default)")
    b.add_argument("--force", action="store_true",
                   help="start over in --out even if it holds a run (finished, unfinished or of other settings)")
    b.add_argument("--checkpoint-every", type=float, default=60.0,
                   help="seconds between training checkpoints; rerun the same command after a kill to resume "
                        "(default: 60)")
    b.add_argument("--shard-size", type=int, default=65536,
                   help="tokens per activation shard, the harvest's checkpoint unit (default: 65536)")
    scale_args(b, "train the ladder's rungs here or each as a Ray task")
    b.add_argument("--store-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype of the stored activations; bfloat16 halves the store (default: float32)")
    b.add_argument("--layers", **list_flag(int),
                   help="several layers in one harvest pass (strictly increasing, e.g. 3 9 15): a run per layer "
                        "in OUT/L<layer>/ (--layer is ignored); link them with `featuretree layers`")
    b.add_argument("--ladder", **list_flag(str),
                   help="link existing dictionaries instead of training: their directories (any architecture: "
                        "TopK, JumpReLU, BatchTopK, ReLU; SAELens / sparsify / Gemma Scope files), one Matryoshka "
                        "directory with --prefixes, or a SAELens release name (read from the local Hugging Face "
                        "cache only) with --release-widths / --release-ids; --widths and --k are then ignored")
    b.add_argument("--prefixes", **list_flag(int), help="(--ladder DIR) widths of a Matryoshka dictionary's prefixes")
    b.add_argument("--release-widths", **list_flag(str),
                   help="(--ladder RELEASE) the widths to take, as the release's sae_ids spell them (e.g. 16k 65k); "
                        "its layer is --layer")
    b.add_argument("--release-ids", **list_flag(str), help="(--ladder RELEASE) exact sae_ids instead")
    b.add_argument("--max-codes", type=int, default=128,
                   help="codes per token kept from threshold dictionaries (JumpReLU, ReLU; default 128)")
    b.set_defaults(func=cmd_build)

    t = sub.add_parser("train", help="train a ladder from an existing activation store (data parallel under torchrun)",
                       description="Train TopK dictionaries of the given widths from a store written by collect / "
                                   "build (a store or a run directory) and save them to OUT/w<width>/. Launched with "
                                   "`torchrun --nproc-per-node N -m featuretree train ...`, every batch is split "
                                   "across the N processes and their gradients are summed (gloo on CPU, NCCL on GPUs).")
    t.add_argument("store", help="activation store directory (or a run directory holding acts/)")
    TrainConfig.add_arguments(t)
    scale_args(t, "train the rungs here or each as a Ray task (without torchrun)")
    t.add_argument("--out", required=True, help="directory for the dictionaries (w<width>/ each) and metrics.json")
    t.add_argument("--checkpoint-every", type=float, default=60.0,
                   help="seconds between checkpoints (OUT/train.ckpt.safetensors); rerun to resume (default: 60)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("export", help="export a saved run as HTML sunburst / GraphML / CSV",
                       description="Write a saved run in other formats. The HTML is self-contained (plotly.js "
                                   "inlined) and opens offline.")
    e.add_argument("run", help="run directory written by `featuretree build`")
    e.add_argument("--html", help="write an interactive sunburst to this .html file")
    e.add_argument("--graphml", help="write the graph as GraphML (lists JSON-encoded)")
    e.add_argument("--csv", help="write the node table (ft.to_frame) as CSV")
    e.add_argument("--root", help="node id to centre the sunburst on, e.g. w512/7")
    e.add_argument("--max-depth", type=int, help="rings shown at once in the sunburst (click to zoom)")
    e.add_argument("--color", choices=("rung", "coverage"), default="rung", help="sector colour (default: rung)")
    e.add_argument("--kind", choices=("sunburst", "icicle"), default="sunburst",
                   help="figure of --html and --explorer (default: sunburst)")
    e.add_argument("--explorer", help="write the explorer page (figure beside the clicked feature's contexts)")
    e.set_defaults(func=cmd_export)

    def refine_args(q: argparse.ArgumentParser, fields: tuple[str, ...], base: RefineConfig) -> None:
        RefineConfig.add_arguments(q, fields, base)
        q.add_argument("--out", help="run directory to save the refined tree in (default: RUN itself)")
        q.add_argument("--html", help="also write an explorer page of the result to this .html file")

    r = sub.add_parser("refine", help="train a local dictionary where one feature fires and attach its features",
                       description="Gather the tokens where NODE fires (the run's store, then more corpus text), train "
                                   "a WIDTH-feature dictionary on them alone, link its features under NODE, and recurse "
                                   "depth-first into children that still have --min-tokens tokens. The refined tree is "
                                   "saved into the run (or --out) with its sunburst. The region and each local "
                                   "dictionary are checkpointed: rerun the same command after a kill to resume.")
    r.add_argument("run", help="run directory written by `featuretree build`")
    r.add_argument("node", help="node id to refine, e.g. w512/7 (find one with `featuretree find RUN WORD`)")
    r.add_argument("--force", action="store_true", help="discard an unfinished refinement's checkpoint and start over")
    scale_args(r, "train sibling local dictionaries here or as Ray tasks")
    refine_args(r, (), RefineConfig())
    r.set_defaults(func=cmd_refine)

    s = sub.add_parser("search", help="targeted depth-first search: follow the branch that answers a query",
                       description="From the top-level features down, step to the child, among those firing more "
                                   "than usual on the query (ft.find's score), whose branch leads to the best score; "
                                   "refine a node none of whose children answers. Prints the path; refinements made "
                                   "on the way are saved into the run (or --out).")
    s.add_argument("run", help="run directory written by `featuretree build`")
    s.add_argument("query", nargs="+", help="a word or phrase; several arguments are several example texts")
    s.add_argument("--start", help="node to search under, e.g. a biology feature (default: the top-level features)")
    s.add_argument("--max-depth", type=int, default=6, help="steps down at most (default: 6)")
    s.add_argument("--min-lift", type=float, default=None,
                   help="pass over a node whose firing is less than e^MIN_LIFT times as specific to the query's texts "
                        f"as the corpus's, on the way to its branch's best (0 keeps every node; default {MIN_LIFT})")
    s.add_argument("--negative", action="append", help="a text the feature should not fire on (repeatable)")
    s.add_argument("--no-refine", action="store_true", help="only walk the existing tree; never train")
    s.add_argument("--no-save", action="store_true", help="do not save the refinements made on the way")
    s.add_argument("--json", help="also write the path (and where it was saved) to this JSON file")
    refine_args(s, ("width", "k", "min_tokens", "max_tokens", "stream_tokens"), SEARCH_REFINE)
    s.set_defaults(func=cmd_search)

    v = sub.add_parser("eval", help="measure how true linking is on planted hierarchies (precision / recall)",
                       description="planted: train a ladder on activations drawn from a planted feature forest and "
                                   "score the parent edges of three linking rules (decoder cosine only, co-activation "
                                   "only, featuretree's combined rule) against the truth. wordnet RUN: how pure each "
                                   "node's firing tokens are in WordNet lexicographer files and topic domains, per "
                                   "rung and from parent to child. refine RUN --nodes ...: how much purer refined "
                                   "children are than their parent, per local width and k. find RUN: given glosses of "
                                   "each WordNet domain, how pure find's top node is, by token and by document. "
                                   "search RUN: for WordNet query nouns (a tuning and a held-out half), how "
                                   "precisely search's end node fires on the query word and whether every node on "
                                   "the path is about the query's lexicographer file. Tables: docs/EVAL.md.")
    v.add_argument("what", choices=("planted", "wordnet", "refine", "find", "search", "senses"),
                   help="planted: linking rules on planted hierarchies; wordnet: purity of a WordNet run's nodes; "
                        "refine: purity of refined children vs their parent per local width and k; find: purity "
                        "of find's top node per WordNet domain given glosses of it, by token and by document; "
                        "search: end-node precision / recall and path coherence on WordNet query nouns; senses: "
                        "how well features separate the senses of polysemous nouns, per run (layer) and rung")
    v.add_argument("--n-query", type=int, default=20, help="(find) glosses per domain given as the query (default 20)")
    v.add_argument("--n-pool", type=int, default=3000,
                   help="(find, search) corpus texts that judge the nodes (default 3000)")
    v.add_argument("--n-queries", type=int, default=150, help="(search, senses) query nouns (default 150)")
    v.add_argument("--split", choices=("held-out", "tuning", "all"), default="held-out",
                   help="(search) which half of the query nouns (default held-out: nothing is tuned on it)")
    v.add_argument("--levels", **list_flag(str), default=("concept", "token"),
                   help="(search) scorings to compare: concept (the default of search) and token (the scorer "
                        "before it)")
    v.add_argument("--refine", action="store_true",
                   help="(search) let search refine leaves (a local dictionary per query: slow)")
    v.add_argument("--show", type=int, default=20,
                   help="(search) queries whose paths are printed; (senses) example words per run (default 20)")
    v.add_argument("run", nargs="*",
                   help="(wordnet, refine, find, search) a run directory built on the WordNet corpus; (senses) one "
                        "or more, e.g. runs of one model at several layers")
    v.add_argument("--nodes", **list_flag(str), help="(refine) nodes to refine, e.g. w512/148 w128/66")
    v.add_argument("--widths", **list_flag(int), default=(32, 64), help="(refine) local widths (default: 32 64)")
    v.add_argument("--ks", **list_flag(int), default=(1, 2, 4, 8), help="(refine) local k (default: 1 2 4 8)")
    RefineConfig.add_arguments(v, ("stream_tokens",))
    v.add_argument("--configs", **list_flag(str), default=None,
                   help="planted configurations (default: all of featuretree.eval.PLANTED_CONFIGS)")
    v.add_argument("--seeds", **list_flag(int), default=(0, 1, 2), help="seeds (default: 0 1 2)")
    v.add_argument("--csv", help="also write the per-run table as CSV")
    v.add_argument("--nested", action="store_true",
                   help="(planted) also score a nested (Matryoshka) ladder linked by the combined rule")
    v.add_argument("--sweep", action="store_true",
                   help="(planted) vary each linking threshold around its default and score every setting")
    v.add_argument("--n-train", type=int, default=60_000,
                   help="(planted) planted tokens each ladder trains on (default 60000; 20000 more are held out)")
    v.set_defaults(func=cmd_eval)

    f = sub.add_parser("find", help="rank a saved run's nodes by how much more they fire on a query",
                       description="Score every node by its firing rate on the query's tokens over its usual "
                                   "rate (plus query words in its label); print the best.")
    f.add_argument("run", help="run directory written by `featuretree build`")
    f.add_argument("query", nargs="+", help="a word or phrase; several arguments are several example texts")
    f.add_argument("--negative", action="append", help="a text the feature should not fire on (repeatable)")
    f.add_argument("--top", type=int, default=20, help="nodes to print (default: 20)")
    f.add_argument("--json", help="also write the ranking to this JSON file (a list of records under 'hits')")
    f.add_argument("--level", choices=("auto", "token", "document"), default="auto",
                   help="score by token rates, or by how many example texts a node fires in against corpus texts "
                        "(default auto: document level for several example texts)")
    f.set_defaults(func=cmd_find)

    sv = sub.add_parser("serve", help="the run's explorer as a local web app: any size, find / refine / search",
                        description="Serve RUN's explorer at http://HOST:PORT/: the page loads nodes from the run as "
                                    "they come into view (trees of any size), searches every node, and runs find, "
                                    "refine and search from the browser with their progress shown; refine and search "
                                    "save into the run as the CLI does. Files outside the run are refused.")
    sv.add_argument("run", help="run directory written by `featuretree build`")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: only this machine)")
    sv.add_argument("--port", type=int, default=8050, help="TCP port (default: 8050)")
    sv.set_defaults(func=cmd_serve)

    i = sub.add_parser("info", help="summarise a saved run: per-rung FVU / L0 / dead fraction, top features",
                       description="Print per-rung metrics and the most frequent root features of a saved run.")
    i.add_argument("run", help="run directory written by `featuretree build`")
    i.add_argument("--top", type=int, default=10, help="root features to list (default: 10)")
    i.set_defaults(func=cmd_info)

    lb = sub.add_parser("label", help="relabel nodes (model-free or by a local LM) and score every label",
                        description="Score how well each node's label predicts where it fires on the store's "
                                    "held-out texts (delphi-style detection and fuzzing AUROC with the embedded "
                                    "MiniLM as scorer; docs/EVAL.md defines them) and write label_score onto the "
                                    "nodes. With --labeler MODEL, a local causal LM (smollm2: the embedded "
                                    "SmolLM2-135M-Instruct; a .gguf file; a model directory) names each node from "
                                    "its contexts first, and both labels' scores are printed. Offline.")
    lb.add_argument("run", help="run directory written by `featuretree build`")
    lb.add_argument("--labeler", default="auto",
                    help="auto (the model-free labels, restored where a model relabelled them), smollm2, a .gguf "
                         "file or a causal-LM directory (default: auto)")
    lb.add_argument("--nodes", nargs="+", help="node ids to label (default: every feature, see --max-nodes)")
    lb.add_argument("--min-freq", type=float, default=0.0, help="only features firing at least this often (default: 0)")
    lb.add_argument("--max-nodes", type=int,
                    help="the most frequent features at most (default: all for auto, 200 for a labeler model)")
    lb.add_argument("--random", action="store_true",
                    help="--max-nodes draws features at random (seeded by --seed) instead of the most frequent")
    lb.add_argument("--max-docs", type=int, default=3000, help="held-out texts scored on at most (default: 3000)")
    lb.add_argument("--max-new-tokens", type=int, default=12, help="tokens a labeler model writes per label (default: 12)")
    lb.add_argument("--seed", type=int, default=0, help="seed of the held-out sample (default: 0)")
    lb.add_argument("--show", type=int, default=10, help="best and worst labels to print (default: 10)")
    lb.add_argument("--csv", help="write node, scores and labels to this CSV file")
    lb.add_argument("--no-save", action="store_true", help="print only; leave the run as it is")
    lb.set_defaults(func=cmd_label)

    ef = sub.add_parser("effects", help="what one feature does to the run's causal LM: ablation, logits, steering",
                        description="Ablate NODE's feature (x -> x - a d at the positions where it fires) in texts "
                                    "where it fires and report the next-token loss change, for the node and rung by "
                                    "rung for its subtree; the tokens its decoder direction promotes and suppresses "
                                    "(logit lens, and measured by the ablation); and the top next tokens when it is "
                                    "added to a prompt. Needs a causal LM. Writes RUN/effects/NODE.json.")
    ef.add_argument("run", help="run directory written by `featuretree build` on a causal LM")
    ef.add_argument("node", help="feature id, e.g. w512/7")
    ef.add_argument("--text", action="append", help="a text to measure on (repeatable; default: held-out texts "
                                                    "of the run where the node fires)")
    ef.add_argument("--textfile", help="a file of texts to measure on, one per line")
    ef.add_argument("--max-docs", type=int, default=16, help="default texts at most (default: 16)")
    ef.add_argument("--prompt", help="steering prompt (default: the first text up to the node's first firing token)")
    ef.add_argument("--scale", type=float, default=4.0,
                    help="steering strength, in units of the feature's mean activation (default: 4)")
    ef.add_argument("--top", type=int, default=10, help="tokens per list (default: 10)")
    ef.add_argument("--no-save", action="store_true", help="print only; write nothing into the run")
    ef.set_defaults(func=cmd_effects)

    ly = sub.add_parser("layers", help="link features across layers: runs of one model at several layers",
                        description="For runs of one model on one corpus at increasing layers (built with only "
                                    "--layer different), link each layer's features to the next layer's by "
                                    "co-activation on the same held-out tokens: same, split (an earlier feature's "
                                    "tokens divide among later ones), merge (the other way), into.")
    ly.add_argument("runs", nargs="+", metavar="RUN", help="run directories, in layer order")
    ly.add_argument("--rungs", **list_flag(str), help="one rung per run (default: each run's widest)")
    ly.add_argument("--min-coverage", type=float, default=0.5,
                    help="P(earlier | later) or P(later | earlier) an edge needs (default: 0.5)")
    ly.add_argument("--show", type=int, default=5, help="splits to print per layer pair (default: 5)")
    ly.add_argument("--graphml", help="write the cross-layer graph as GraphML")
    ly.add_argument("--html", help="write a sunburst of the primary edges (features under their earlier-layer parent)")
    ly.add_argument("--upstream", metavar="NODE",
                    help="instead, rank the earlier runs' features by attribution to NODE (e.g. L15:w512/7; causal LMs)")
    ly.set_defaults(func=cmd_layers)

    q = sub.add_parser("faithful", help="loss recovered and KL of each rung spliced into the run's causal LM",
                       description="Replace the output of the run's layer by each rung's reconstruction (and by "
                                   "zeros) at the real tokens of the store's held-out documents and compare the "
                                   "model's next-token loss: loss recovered = (CE_zero - CE_sae) / (CE_zero - "
                                   "CE_clean) and KL(clean || spliced). Needs a causal LM (a decoder with an LM head). "
                                   "Prints the table and writes RUN/faithfulness.json; docs/EVAL.md defines it.")
    q.add_argument("run", help="run directory written by `featuretree build` on a causal LM")
    q.add_argument("--max-tokens", type=int, default=20_000, help="predictions counted at most (default: 20000)")
    q.add_argument("--max-docs", type=int, default=200, help="held-out documents read at most (default: 200)")
    q.add_argument("--batch-size", type=int, default=8, help="documents per forward (default: 8)")
    q.set_defaults(func=cmd_faithful)

    m = sub.add_parser("match", help="which features two runs share (activation correlation, one-to-one)",
                       description="Correlate the activations of one rung of each run on RUN_A's held-out tokens "
                                   "(or, when the runs used different models or layers, on RUN_A's held-out texts "
                                   "aligned by character spans), pair features one-to-one and print the shared "
                                   "fraction and the best pairs.")
    m.add_argument("run_a", metavar="RUN_A", help="run directory whose activation store (RUN_A/acts) is used")
    m.add_argument("run_b", metavar="RUN_B", help="the other run directory")
    m.add_argument("--rung-a", help="rung of RUN_A, e.g. w512 (default: the widest)")
    m.add_argument("--rung-b", help="rung of RUN_B, e.g. w2048 (default: the widest)")
    m.add_argument("--threshold", type=float, default=0.7, help="correlation at which a pair is shared (default: 0.7)")
    m.add_argument("--max-tokens", type=int, default=100_000, help="tokens compared at most (default: 100000)")
    m.add_argument("--min-tokens", type=int, default=10,
                   help="tokens a feature must fire on to take part (rarer ones correlate by chance; default: 10)")
    m.add_argument("--top", type=int, default=20, help="pairs to print (default: 20)")
    m.set_defaults(func=cmd_match)

    n = sub.add_parser("novel", help="nodes whose firing on new texts departs most from the corpus",
                       description="Run the texts of TEXTFILE (one per line) through the run's model and rank "
                                   "nodes by log((rate + eps) / (freq + eps)): features firing far more than in "
                                   "the corpus first.")
    n.add_argument("run", help="run directory written by `featuretree build`")
    n.add_argument("textfile", metavar="TEXTFILE", help="a text file, one text per line")
    n.add_argument("--top", type=int, default=20, help="nodes to print (default: 20)")
    n.set_defaults(func=cmd_novel)
    return p


def os_error_message(e: OSError) -> str:
    """One line for a failed read or write: the file, the system's reason, and what to do about it.

    Example:
        >>> import errno
        >>> os_error_message(OSError(errno.ENOSPC, "No space left on device", "runs/x/acts"))
        'cannot write runs/x/acts: No space left on device: free some space or choose another --out'
    """
    import errno

    where = e.filename or "a file"
    why = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return f"cannot write {where}: {why}: free some space or choose another --out"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {where}: {why}: choose a directory you can write to (--out)"
    if e.errno in (errno.ENOTDIR, errno.EISDIR, errno.EEXIST):
        return f"{where}: {why}: a path component is a file where a directory is needed (or the reverse); check --out"
    if e.errno == errno.ENOENT:
        return f"{where}: {why}: check the path"
    return f"{where}: {why}"


def main(argv: list[str] | None = None) -> int:
    """Run the CLI with `argv` (default sys.argv[1:]); returns the exit status.

    Example:
        >>> main(["info", "/no/such/run"])  # doctest: +SKIP
        2
    """
    parser = make_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.func(args) or 0)
    except (FeatureTreeError, ValueError) as e:
        sys.stderr.write(f"featuretree: error: {' '.join(str(e).split())}\n")
        return 2
    except OSError as e:  # the disk, not the code: say which file and what to do
        sys.stderr.write(f"featuretree: error: {os_error_message(e)}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("featuretree: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
