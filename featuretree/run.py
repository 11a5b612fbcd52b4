"""build: the whole pipeline into a run directory that a killed run resumes and a finished one is loaded from.

    harvest (acts/, shard checkpoints) -> train (ckpt/train.safetensors every checkpoint_every s)
        -> saes/ (+ faithfulness.json for causal LMs) -> link + labels -> config.json, tree.json, sunburst.html

`run.json` records the stage reached and a fingerprint of the config and inputs (the corpus file's sha256,
the model's files; see featuretree.checkpoint). Rerunning the same command continues from the last
checkpoint and ends with the same tree.json, byte for byte, as a run never interrupted. A run directory
holding other settings is refused; `force=True` (`--force`) starts over there, keeping the harvest when
its recipe still matches.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from featuretree.checkpoint import Checkpoint, Resume, file_sha256, model_fingerprint
from featuretree.config import Config, FeatureTreeError
from featuretree.tree import FeatureTree, link
from featuretree.utils import resolve_device

__all__ = ["build", "RUN_FILE", "run_inputs", "STAGES"]

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
STAGES = ("harvest", "train", "link", "done")


def run_inputs(cfg: Config, shard_size: int, store_dtype: str = "float32") -> dict:
    """What a run is made from besides its config: the corpus file and the model's files.

    Parameters
    ----------
    cfg : Config
        The run's settings (its corpus and model are fingerprinted).
    shard_size : int
        Rows per shard of the activation store.
    store_dtype : str
        The store's dtype; recorded only when it is not "float32".

    Example:
        >>> run_inputs(Config(), 65536)["model"]["name"]
        'all-MiniLM-L6-v2'
    """
    from featuretree.corpus import corpus_file

    inputs = {"corpus": file_sha256(corpus_file(cfg.corpus)), "model": model_fingerprint(cfg.model),
              "shard_size": int(shard_size)}
    if store_dtype != "float32":
        inputs["store_dtype"] = store_dtype
    return inputs


def _settings(cfg: Config) -> dict:
    d = cfg.to_dict()
    d.pop("extra", None)  # notes do not change the results
    if not d.get("site"):  # runs from before `site` existed read block outputs: the same settings
        d.pop("site", None)
    return d


def build(config: Config | None = None, *, out=None, force: bool = False, progress: bool = True,
          checkpoint_every: float = 60.0, shard_size: int = 65536, store_dtype: str = "float32", train=None,
          layers=None, ladder=None, **overrides) -> FeatureTree:
    """The whole pipeline: load_model -> load_corpus -> collect -> train_ladder -> link (+ labels).

    With `out` (a run directory) the activations, dictionaries, config, tree and sunburst.html are written
    there, and every long step checkpoints as it goes: rerunning the same call after a kill resumes and
    returns the same tree. `run.json` (a featuretree.checkpoint.Checkpoint) records the stage reached and
    the fingerprint of the config and inputs (corpus file, model files, shard size). A finished run with
    the same settings is loaded instead of rebuilt.

    Parameters
    ----------
    config : Config, optional
        The run's settings; `overrides` (field=value) replace fields.
    out : path, optional
        The run directory (None: a temporary one, nothing saved).
    force : bool
        Start over in a directory that holds a run of other settings (the harvested activations are kept
        when the harvest settings match).
    progress : bool
        tqdm bars.
    checkpoint_every : float
        Seconds between saves of the ladder's training state.
    shard_size : int
        Tokens per activation shard (the harvest checkpoints once per shard).
    store_dtype : str
        "float32", or "bfloat16" / "float16" to halve the store (read back as float32).
    train : callable, optional
        `train(acts, config=Config, checkpoint=Resume, progress=bool) -> {width: TopKSAE}` in place of
        `train_ladder` (featuretree.scale.build passes a Ray trainer).
    layers : list of int, optional
        Several layers at once (strictly increasing): ONE harvest pass writes a store per layer, then each
        layer is a run of its own in OUT/L{layer}/ (the config's `layer` is ignored); returns
        {layer: FeatureTree}. `featuretree.crosslayer.link_layers` links them.
    ladder : dict, optional
        {rung: dictionary} already trained (`featuretree.ladders.load_ladder`: any architecture): nothing is
        trained; the run's widths become the ladder's, its rungs are measured on the held-out split and linked.

    Example:
        >>> tree = build(n_tokens=3000, widths=(32, 64), k=4, epochs=1)  # doctest: +SKIP
        >>> tree.rungs  # doctest: +SKIP
        ['w32', 'w64']
    """
    from featuretree.corpus import load_corpus
    from featuretree.explore import write_explorer
    from featuretree.export import load, save
    from featuretree.model import check_layer, hidden_size, load_model, site_module

    cfg = Config.from_dict({**(config.to_dict() if config else {}), **overrides})
    given = None
    if ladder is not None:
        if layers is not None:
            raise FeatureTreeError("ladder= links dictionaries of one layer: pass layers=None")
        given = {int(s.width): s for s in (ladder.values() if isinstance(ladder, dict) else ladder)}
        widths = tuple(sorted(given))
        cfg = Config.from_dict({**cfg.to_dict(), "widths": widths, "k": min(int(cfg.k), widths[0] - 1)})
    if layers is not None:
        return _build_layers(cfg, list(layers), out=out, force=force, progress=progress,
                             checkpoint_every=checkpoint_every, shard_size=shard_size, store_dtype=store_dtype,
                             train=train)
    resolve_device(cfg.device)  # a device that is not here fails before anything is written
    if int(shard_size) <= 0:
        raise FeatureTreeError(f"shard_size={shard_size} must be a positive integer")
    run = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="featuretree-"))
    settings = {**_settings(cfg), "inputs": run_inputs(cfg, shard_size, store_dtype)}
    if given is not None:  # which dictionaries: their kind, width and a checksum of the decoder
        settings["ladder"] = [[type(s).__name__, getattr(s, "architecture", "topk"), w,
                               round(float(s.W_dec.detach().double().abs().sum()), 6)] for w, s in given.items()]
    record = Checkpoint(run / RUN_FILE, settings,
                        "a run", "choose another --out for a new run, or pass --force (force=True) to replace it", where=run)
    try:
        saved = record.load()
    except FeatureTreeError:
        if not force:
            raise
        log.info("replacing the run in %s (--force)", run)
        saved = None
    stage = saved[1]["stage"] if saved is not None and not force else "harvest"
    if stage == "done" and (run / "tree.json").is_file():
        log.info("%s already holds a finished run with this config: loading it (force=True trains anew)", run)
        tree = load(run)
        if not (run / "sunburst.html").is_file():
            write_explorer(tree, run / "sunburst.html", run=out)
        return tree
    # what can be wrong with the inputs shows before anything is written, so a mistake leaves no run behind
    model, corpus = load_model(cfg.model), load_corpus(cfg.corpus)
    check_layer(model, cfg.layer)
    reads = None  # where a given ladder reads and (transcoders) writes, from its dictionaries' hook names
    if given is not None:
        from featuretree.ladders import ladder_site

        reads = ladder_site(given)
        if not cfg.site:  # the dictionaries read an MLP / attention output: harvest that module
            cfg = Config.from_dict({**cfg.to_dict(), "site": _module_path(model, cfg.layer, reads)})
    if cfg.site:  # a submodule the block does not have fails here, naming the ones it has
        site_module(model, cfg.layer, cfg.site)
    if given is not None:
        hidden = hidden_size(model)
        d = {s.d_model for s in given.values()}
        if hidden is not None and d != {hidden}:
            raise FeatureTreeError(f"the ladder reads d_model {sorted(d)} but {cfg.model}'s layers have {hidden}: "
                                   "choose the model (and layer) the dictionaries were trained on")
    if stage == "harvest":  # a new run here: nothing of an old one may be loaded with the new one's files
        shutil.rmtree(run / "ckpt", ignore_errors=True)
        for name in ("tree.json", "sunburst.html"):
            (run / name).unlink(missing_ok=True)
    run.mkdir(parents=True, exist_ok=True)
    for tmp in run.rglob(".*.tmp"):  # writes a kill cut short (atomic_path's temp files): never read
        tmp.unlink(missing_ok=True)

    def reach(new_stage: str) -> None:
        record.save({"stage": new_stage}, finished=new_stage == "done")

    if STAGES.index(stage) < STAGES.index("train"):
        reach("harvest")
    acts = _harvest(model, cfg, corpus, run / "acts", shard_size, store_dtype, progress)
    if STAGES.index(stage) <= STAGES.index("train"):
        reach("train")
    saes = _trained(run, cfg) if stage == "link" else None
    if saes is None:
        if given is not None:  # an existing ladder: measured on the held-out split, not trained
            from featuretree.ladders import measure

            targets = None
            if reads["out"] is not None:  # transcoders: scored against the module they write, on the same texts
                writes = reads["out"]
                out_cfg = Config.from_dict({**cfg.to_dict(), "layer": writes["layer"],
                                            "site": _module_path(model, writes["layer"], writes)})
                targets = _harvest(model, out_cfg, corpus, run / "acts_out", shard_size, store_dtype, progress)
            measure({f"w{w}": s for w, s in given.items()}, acts, targets=targets)
            saes = given
        else:
            if train is None:
                from featuretree.train import train_ladder as train
            saes = train(acts, config=cfg, checkpoint=Resume(run / "ckpt" / "train.safetensors",
                                                              every=checkpoint_every, keep=True), progress=progress)
        from featuretree.faithful import is_causal_lm, record_faithfulness, splice_blocker

        if is_causal_lm(model):  # loss recovered / KL per rung (trained or given) into faithfulness.json, cfg.json
            why = splice_blocker(cfg.site, saes.values())
            if why is None:
                record_faithfulness(model, cfg.layer, saes, acts, run, progress=progress, site=cfg.site)
            else:
                log.info("faithfulness not measured: %s", why)
        for w, sae in saes.items():
            sae.save(run / "saes" / f"w{w}")
        reach("link")
        shutil.rmtree(run / "ckpt", ignore_errors=True)
    tree = link(saes, acts, cfg)
    tree.config = cfg
    tree.graph.graph["acts"] = "acts"
    if out is None:
        return tree
    save(tree, run, dictionaries=False)  # saes/ was written before linking (what a resumed run links)
    write_explorer(tree, run / "sunburst.html", run=out)  # the sunburst with search and feature cards
    reach("done")
    return tree


def _module_path(model, layer: int, where: dict) -> str:
    """The submodule of block `layer` a `ladders.hook_site` answer names ("" for the block's output)."""
    from featuretree.model import site_of

    return where["path"] if where["kind"] == "path" else site_of(model, layer, where["kind"])


def _build_layers(cfg: Config, layers: list[int], *, out, force: bool, progress: bool, checkpoint_every: float,
                  shard_size: int, store_dtype: str, train) -> dict[int, FeatureTree]:
    """build(layers=[...]): one harvest pass for every layer's store, then a run per layer in OUT/L{layer}."""
    from featuretree.corpus import load_corpus
    from featuretree.harvest import STORE_DTYPES, StoreMismatch, collect_layers
    from featuretree.model import check_layer, load_model, n_layers

    if out is None:
        raise FeatureTreeError("build(layers=[...]) writes one run per layer: pass out=DIR (runs go to DIR/L<layer>)")
    if not layers or any(isinstance(v, bool) or not isinstance(v, int) for v in layers):
        raise FeatureTreeError(f"layers={layers} must be a non-empty list of block indices, e.g. [3, 9, 15]")
    if layers != sorted(set(layers)) or any(v < 0 for v in layers):
        raise FeatureTreeError(f"layers={layers} must be strictly increasing block indices from 0 (e.g. 3 9 15)")
    resolve_device(cfg.device)
    model, corpus = load_model(cfg.model), load_corpus(cfg.corpus)
    for v in layers:
        if v >= n_layers(model):
            raise FeatureTreeError(f"layer {v} is out of range: {cfg.model} has {n_layers(model)} blocks (0 to "
                                   f"{n_layers(model) - 1})")
        check_layer(model, v)
    out = Path(out)
    d_model = getattr(getattr(getattr(model, "_module", model), "config", None), "hidden_size", None)
    if d_model:  # the stores' size (activations only) against the free disk, before anything is written
        need = int(cfg.n_tokens) * int(d_model) * STORE_DTYPES[store_dtype].itemsize * len(layers)
        probe = out.resolve()
        while not probe.exists():
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if need > free:
            raise FeatureTreeError(f"{len(layers)} layers of {cfg.n_tokens} tokens x {d_model} features need "
                                   f"{need / 2**30:.1f} GiB for their stores, and {out} has {free / 2**30:.1f} GiB "
                                   "free: fewer layers or tokens, --store-dtype bfloat16, or another --out")
    out.mkdir(parents=True, exist_ok=True)
    outs = {v: out / f"L{v}" / "acts" for v in layers}
    kw = dict(n_tokens=cfg.n_tokens, outs=outs, max_length=cfg.max_length, seed=cfg.seed, shard_size=shard_size,
              dtype=store_dtype, progress=progress, site=cfg.site)
    try:
        collect_layers(model, layers, corpus, resume=True, **kw)
    except StoreMismatch:
        log.info("a store under %s was made with other settings: harvesting every layer anew", out)
        collect_layers(model, layers, corpus, resume=False, **kw)
    return {v: build(cfg, out=out / f"L{v}", force=force, progress=progress, checkpoint_every=checkpoint_every,
                     shard_size=shard_size, store_dtype=store_dtype, train=train, layer=v) for v in layers}


def _harvest(model, cfg: Config, corpus, acts_dir: Path, shard_size: int, store_dtype: str, progress: bool):
    """The run's activation store: resumed or verified when its recipe matches, else harvested anew."""
    from featuretree.harvest import StoreMismatch, collect

    kw = dict(n_tokens=cfg.n_tokens, out=acts_dir, max_length=cfg.max_length, seed=cfg.seed, shard_size=shard_size,
              dtype=store_dtype, progress=progress, site=cfg.site)
    try:
        return collect(model, cfg.layer, corpus, resume=True, **kw)
    except StoreMismatch:
        log.info("the activation store in %s was made with other settings: harvesting anew", acts_dir)
        return collect(model, cfg.layer, corpus, resume=False, **kw)


def _trained(run: Path, cfg: Config) -> dict | None:
    """The ladder a killed run saved before linking, or None (then it is trained again) if any rung is damaged."""
    from featuretree.dictionaries import load_dictionary

    try:
        return {w: load_dictionary(run / "saes" / f"w{w}") for w in cfg.widths}
    except FeatureTreeError as e:
        log.warning("the saved ladder in %s/saes cannot be used (%s): training it again", run, e)
        return None
