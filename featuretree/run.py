"""build: the whole pipeline into a run directory that a killed run resumes and a finished one is loaded from.

    harvest (acts/, shard checkpoints) -> train (ckpt/train.safetensors every checkpoint_every s)
        -> saes/ -> link + labels -> config.json, tree.json, sunburst.html

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

from featuretree.checkpoint import fingerprint, model_fingerprint
from featuretree.config import Config, FeatureTreeError
from featuretree.tree import FeatureTree, link
from featuretree.utils import write_json

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
STAGES = ("harvest", "train", "link", "done")


def run_inputs(cfg: Config, shard_size: int, store_dtype: str = "float32") -> dict:
    """What a run is made from besides its config: the corpus file and the model's files.

    Example:
        >>> run_inputs(Config(), 65536)["model"]["name"]
        'all-MiniLM-L6-v2'
    """
    from featuretree.activations import file_sha256
    from featuretree.corpus import _resolve

    corpus_path, _ = _resolve(cfg.corpus)
    inputs = {"corpus": file_sha256(corpus_path), "model": model_fingerprint(cfg.model), "shard_size": int(shard_size)}
    if store_dtype != "float32":
        inputs["store_dtype"] = store_dtype
    return inputs


def _settings(cfg: Config) -> dict:
    d = cfg.to_dict()
    for name in ("extra", "executor"):  # notes, and where the work runs, do not change the results
        d.pop(name, None)
    return d


def _read_record(run: Path) -> dict | None:
    import json

    p = run / RUN_FILE
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.warning("%s is unreadable: treating %s as a new run", p, run)
        return None


def _differences(old: dict, cfg: Config, inputs: dict) -> str:
    was, now = old.get("config", {}), _settings(cfg)
    diff = [f"{k} {was.get(k)!r} -> {v!r}" for k, v in now.items() if was.get(k) != v]
    diff += [f"{k} changed" for k, v in inputs.items() if old.get("inputs", {}).get(k) != v]
    return ", ".join(diff) or "an older featuretree's run record"


def build(config: Config | None = None, *, out=None, force: bool = False, progress: bool = True,
          checkpoint_every: float = 60.0, shard_size: int = 65536, store_dtype: str = "float32",
          ray_address: str | None = None, **overrides) -> FeatureTree:
    """The whole pipeline: load_model -> load_corpus -> collect -> train_ladder -> link (+ labels).

    With `out` (a run directory) the activations, dictionaries, config, tree and sunburst.html are written
    there, and every long step checkpoints as it goes (the harvest per shard of `shard_size` tokens, the
    ladder every `checkpoint_every` seconds): rerunning the same call after a kill resumes and returns the
    same tree. A finished run with the same settings is loaded instead of rebuilt. A directory holding a
    run of other settings (or inputs) is an error unless `force=True`, which starts over there (the
    harvested activations are kept when the harvest settings match). `store_dtype="bfloat16"` halves the
    activation store on disk (training reads it back as float32). With `Config.executor="ray"` the rungs
    train as Ray tasks on the cluster at `ray_address` (default: the running or a new local one).
    Keyword overrides replace Config fields.

    Example:
        >>> tree = build(n_tokens=3000, widths=(32, 64), k=4, epochs=1)  # doctest: +SKIP
        >>> tree.rungs  # doctest: +SKIP
        ['w32', 'w64']
    """
    from featuretree.corpus import load_corpus
    from featuretree.export import load, save, write_sunburst
    from featuretree.model import check_layer, load_model
    from featuretree.train import train_ladder

    cfg = Config.from_dict({**(config.to_dict() if config else {}), **overrides})
    if int(shard_size) <= 0:
        raise FeatureTreeError(f"shard_size={shard_size} must be a positive integer")
    run = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="featuretree-"))
    inputs = run_inputs(cfg, shard_size, store_dtype)
    fp = fingerprint({"config": _settings(cfg), "inputs": inputs})
    record = _read_record(run)
    if record is None and (run / "config.json").is_file() and (run / "tree.json").is_file():
        record = _legacy_record(run, cfg, inputs, fp)
    if record is not None and record.get("fingerprint") != fp:
        if not force:
            raise FeatureTreeError(
                f"{run} holds a run with other settings ({_differences(record, cfg, inputs)}): choose another "
                "--out for a new run, or pass --force (force=True) to replace it")
        log.info("replacing the run in %s (--force): %s", run, _differences(record, cfg, inputs))
        record = None
    elif record is not None and force:
        record = None
    stage = record["stage"] if record is not None else "harvest"
    if stage == "done" and (run / "tree.json").is_file():
        log.info("%s already holds a finished run with this config: loading it (force=True trains anew)", run)
        tree = load(run)
        if not (run / "sunburst.html").is_file():
            write_sunburst(tree, run / "sunburst.html")
        return tree
    # what can be wrong with the inputs shows before anything is written, so a mistake leaves no run behind
    model, corpus = load_model(cfg.model), load_corpus(cfg.corpus)
    check_layer(model, cfg.layer)
    if record is None:  # a new run here: nothing of an old one may be loaded with the new one's files
        shutil.rmtree(run / "ckpt", ignore_errors=True)
        for name in ("tree.json", "sunburst.html"):
            (run / name).unlink(missing_ok=True)
    run.mkdir(parents=True, exist_ok=True)
    for tmp in run.rglob(".*.tmp"):  # writes a kill cut short (atomic_path's temp files): never read
        tmp.unlink(missing_ok=True)

    def reach(new_stage: str) -> None:
        write_json(run / RUN_FILE, {"fingerprint": fp, "config": _settings(cfg), "inputs": inputs, "stage": new_stage})

    if record is None or STAGES.index(stage) < STAGES.index("train"):
        reach("harvest")
    acts = _harvest(model, cfg, corpus, run / "acts", shard_size, store_dtype, progress)
    if STAGES.index(stage) <= STAGES.index("train"):
        reach("train")
    saes = _trained(run, cfg) if stage == "link" else None
    if saes is None:
        ckpt = run / "ckpt" / "train.safetensors"
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        saes = train_ladder(acts, cfg.widths, cfg.k, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                            seed=cfg.seed, progress=progress, nested=cfg.nested, checkpoint=ckpt,
                            checkpoint_every=checkpoint_every, keep_checkpoint=True, executor=cfg.executor,
                            ray_address=ray_address)
        for w, sae in saes.items():
            sae.save(run / "saes" / f"w{w}")
        reach("link")
        shutil.rmtree(run / "ckpt", ignore_errors=True)
    tree = link(saes, acts, min_coverage=cfg.min_coverage, same_threshold=cfg.same_threshold,
                within_coverage=cfg.within_coverage, fire_rel=cfg.fire_rel)
    tree.config = cfg
    tree.graph.graph["acts"] = "acts"
    if out is None:
        return tree
    save(tree, run)
    write_sunburst(tree, run / "sunburst.html")
    reach("done")
    return tree


def _harvest(model, cfg: Config, corpus, acts_dir: Path, shard_size: int, store_dtype: str, progress: bool):
    """The run's activation store: resumed or verified when its recipe matches, else harvested anew."""
    from featuretree.activations import StoreMismatch, collect

    kw = dict(n_tokens=cfg.n_tokens, out=acts_dir, max_length=cfg.max_length, seed=cfg.seed, shard_size=shard_size,
              dtype=store_dtype, progress=progress)

    try:
        return collect(model, cfg.layer, corpus, resume=True, **kw)
    except StoreMismatch:
        log.info("the activation store in %s was made with other settings: harvesting anew", acts_dir)
        return collect(model, cfg.layer, corpus, resume=False, **kw)


def _trained(run: Path, cfg: Config) -> dict | None:
    """The ladder a killed run saved before linking, or None (then it is trained again) if any rung is damaged."""
    from featuretree.sae import TopKSAE

    try:
        return {w: TopKSAE.load(run / "saes" / f"w{w}") for w in cfg.widths}
    except FeatureTreeError as e:
        log.warning("the saved ladder in %s/saes cannot be used (%s): training it again", run, e)
        return None


def _legacy_record(run: Path, cfg: Config, inputs: dict, fp: str) -> dict | None:
    """A finished run written before run.json existed: the same config counts as the same run."""
    import json

    try:
        old = json.loads((run / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for name in ("extra", "executor"):
        old.pop(name, None)
    same = old == _settings(cfg)
    return {"fingerprint": fp if same else None, "config": old, "inputs": inputs if same else {}, "stage": "done"}
