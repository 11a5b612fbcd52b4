"""Depth-first refinement: train a small dictionary only where one feature fires, hang its features below it.

refine(tree, node): gather the tokens where `node` fires (its *region*, featuretree.region: the run's
store, then streamed corpus text); train a local TopK dictionary of `width` features on the region alone
(featuretree.train.fit_local); link its features to `node` by the ladder's rules; recurse into children that
still have `min_tokens` tokens. A local feature only exists inside its parent's region, so firing is gated:
    fires(node/r64/i, token) = fires(node, token) and local feature i fires on it (value >= its fire_at)
hence coverage P(node | child) = 1, `reverse` = P(child | node) is the child's share of the region, and its
corpus-wide `freq` = freq(node) x reverse. Sibling dictionaries are handed to a `submit` function (this
process by default; featuretree.scale runs them as Ray tasks) and joined in depth-first order.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from featuretree.config import FeatureTreeError, RefineConfig, settings

if TYPE_CHECKING:  # imported inside the functions: `import featuretree` imports this module and must stay light
    from featuretree.region import Region

__all__ = ["refine", "submit_here"]

log = logging.getLogger(__name__)

LocalJob = tuple  # (x, held, width, k, seed, batch_size, epochs, device): featuretree.train.fit_local's arguments


def submit_here(jobs: Sequence[LocalJob]) -> list[Callable]:
    """The default way refine trains its local dictionaries: in this process, each when its result is needed.

    Returns one callable per job that trains (fit_local) and returns its dictionary. featuretree.scale's
    Ray submitter has the same shape, so refine does not know where its dictionaries train.

    Parameters
    ----------
    jobs : sequence of tuple
        One (x, held, width, k, seed, batch_size, epochs[, device]) per dictionary: `fit_local`'s arguments.

    Example:
        >>> import torch
        >>> [f().width for f in submit_here([(torch.randn(600, 8), None, 16, 1, 0, 256, 1)])]
        [16]
    """
    from featuretree.train import fit_local

    return [lambda job=job: fit_local(*job) for job in jobs]


def _drop_subtree(tree, rung: str) -> None:
    """Remove an earlier refinement `rung` (and everything refined below it) from `tree`, in place."""
    g = tree.graph
    prefix = rung + "/"
    gone = [r for r in tree.saes if r == rung or r.startswith(prefix)]
    for r in gone:
        tree.saes.pop(r, None)
        g.graph.get("refined", {}).pop(r, None)
    g.remove_nodes_from([n for n in list(g) if n.startswith(prefix)])


def _attach_local(tree, node: str, rung: str, sae, region: Region, *, n_contexts: int):
    """Link the local dictionary's features under `node` (and within the rung) and label them; (n, width) firing."""
    from featuretree.firing import fire
    from featuretree.label import annotate, context
    from featuretree.tree import attach, candidates, decoder_cos, node_id

    g = tree.graph
    cfg = tree.config
    rel = g.graph.get("fire_rel", 0.25)
    min_cov = g.graph.get("min_coverage", cfg.min_coverage if cfg else 0.5)
    within = cfg.within_coverage if cfg else 0.9
    same = cfg.same_threshold if cfg else 0.9
    v, i, F, at = fire(sae, region.x, rel, with_thresholds=True)
    n = len(region)
    counts = np.asarray(F.sum(0)).ravel()
    parent = g.nodes[node]
    p_sae = tree.saes[str(parent["rung"])]
    p_dir = p_sae.W_dec.detach()[int(parent["index"])]
    for j in np.flatnonzero(counts):
        g.add_node(node_id(rung, j), rung=rung, width=sae.width, index=int(j),
                   freq=float(parent.get("freq") or 0.0) * float(counts[j] / n), fire_at=float(at[j]),
                   refined=True, n_tokens=int(counts[j]), label=node_id(rung, j), top_tokens=[], top_contexts=[])
    cands = candidates([], rung, {rung: F}, min_cov, within)
    for j in np.flatnonzero(counts):
        c = node_id(rung, j)
        if j in cands:  # a local feature covers it and fires more widely: the rung resolves parent and child
            attach(g, {rung: sae}, rung, int(j), cands[j], same)
        else:
            rev = float(counts[j] / n)
            g.add_edge(node, c, coverage=1.0, reverse=rev, cos=decoder_cos(sae.W_dec.detach()[j], p_dir),
                       kind="same" if rev >= same else "split", within=False)
        g.edges[next(iter(g.predecessors(c))), c]["refined"] = True
    if region.has_text:
        rng = np.random.default_rng(0)
        rows = rng.choice(n, size=min(n, 40), replace=False)
        texts = region.texts()
        t = region.tokens
        docs = [context(texts[int(t.doc_id[r])], int(t.start[r]), int(t.end[r])) for r in rows]
        parent_docs = {node: [c.replace("«", "").replace("»", "") for c in docs if c]}
        pv, pi, _ = fire(p_sae, region.x, rel)  # the parent's activations there: the card shades both
        annotate(tree, {rung: (v, i)}, region.tokens, region, n_contexts=n_contexts, parent_docs=parent_docs,
                 contrast=True, others={str(parent["rung"]): (pv, pi)})
    return F


def refine(tree, node: str, config: RefineConfig | None = None, *, acts=None, texts=None, focus=None, model=None,
           layer: int | None = None, seed: int | None = None, checkpoint=None, submit=None, progress: bool = True,
           **overrides):
    """A new tree in which `node` has children from a `width`-feature dictionary trained only where it fires.

    The region (featuretree.region.collect_region: the run's store, then up to `stream_tokens` more corpus
    tokens, at most `max_tokens`, at least `min_tokens` or an error) trains a TopK dictionary with `k` active
    features (default `local_k(width)`: 1 up to 127 features, so children divide the region); its features
    become nodes "<node>/r<width>/<i>" linked by the ladder's rules (coverage 1 by construction, `reverse` =
    share of the region, kind "same"/"split", within-rung parents where one local feature covers another),
    labelled against `node` and each other. With depth > 1 it recurses depth-first into each child (largest
    first, `max_children` at most) whose own share of the region still has `min_tokens` tokens. The input
    tree is not modified; refining a node again with the same width replaces that refinement.

    Parameters
    ----------
    tree : FeatureTree
    node : str
        The feature to refine, e.g. "w512/7".
    config : RefineConfig, optional
        width, depth, k, min_tokens, max_tokens, stream_tokens, max_children, n_contexts; `overrides`
        (field=value) replace fields.
    acts : Activations or Tensor, optional
        Replaces the run's own store as the first source of region tokens.
    texts : list of str, optional
        What streams through the model instead of the run's corpus.
    focus : list of str, optional
        Texts whose tokens where `node` fires join the region before the store's (search gives its query's
        contexts, so the local dictionary sees them however few the store harvested).
    model, layer : optional
        The model and layer (default: the tree's config).
    seed : int, optional
        Default: the tree's config seed.
    checkpoint : path, optional
        A directory where the region and every local dictionary are saved as they are made; rerunning the
        same refinement after a kill picks them up and returns the same tree (the directory is removed at
        the end); another refinement's checkpoint there is refused.
    submit : callable, optional
        How local dictionaries train: `submit(jobs) -> [callable returning the dictionary]` (default
        `submit_here`; featuretree.scale.refine uses Ray tasks). Siblings are submitted together.
    progress : bool

    Example:
        >>> deep = refine(tree, "w512/7", width=64, depth=2)  # doctest: +SKIP
        >>> sorted(deep.graph.successors("w512/7"))[:2]  # doctest: +SKIP
        ['w512/7/r64/0', 'w512/7/r64/11']
    """
    from tqdm.auto import tqdm

    from featuretree.region import collect_region, local_split
    from featuretree.train import local_k
    from featuretree.tree import FeatureTree

    rc = settings(RefineConfig, config, **overrides)
    width, depth, min_tokens, max_children, n_contexts = rc.width, rc.depth, rc.min_tokens, rc.max_children, rc.n_contexts
    cfg = tree.config
    k = int(rc.k) if rc.k is not None else local_k(width, cfg.k if cfg else 16)
    if not 0 < k < width:
        raise FeatureTreeError(f"k={k} must be at least 1 and below width={width}")
    if tree.node(node).get("virtual"):
        raise FeatureTreeError(f"{node!r} is the virtual root: refine a feature, e.g. one of tree.roots()")
    seed = int(seed if seed is not None else (cfg.seed if cfg else 0))
    submit = submit or submit_here
    saved = None
    if checkpoint is not None:
        saved = _Saved(checkpoint, tree, {**rc.to_dict(), "node": node, "k": k, "seed": seed,
                                          "texts": None if texts is None else "given",
                                          "acts": None if acts is None else "given",
                                          **({"focus": "given"} if focus is not None else {})})
    region = saved.region() if saved is not None else None
    if region is None:
        region = collect_region(tree, node, acts=acts, texts=texts, focus=focus, model=model, layer=layer,
                                min_tokens=min_tokens, max_tokens=rc.max_tokens, stream_tokens=rc.stream_tokens,
                                seed=seed, progress=progress)
        if saved is not None:
            saved.save_region(region)
    new = FeatureTree(tree.graph.copy(), dict(tree.saes), cfg, tree.path)
    new.graph.graph["refined"] = {r: dict(v) for r, v in (tree.graph.graph.get("refined") or {}).items()}
    bar = tqdm(desc=f"refine {node}", unit="dict", disable=not progress)

    batch_size, epochs = (cfg.batch_size, cfg.epochs) if cfg else (1024, 3)
    rung_seed = lambda rung: seed + zlib.crc32(rung.encode()) % 2**20  # noqa: E731  (independent of order)

    def start(todo: list[tuple[str, Region]]) -> list[Callable]:
        """The local dictionaries for the nodes in `todo`: saved by a killed run, else submitted together."""
        found = {at: saved.sae(f"{at}/r{width}") for at, _ in todo} if saved is not None else {}
        jobs = [(*local_split(reg), width, k, rung_seed(f"{at}/r{width}"), batch_size, epochs, rc.device)
                for at, reg in todo if found.get(at) is None]
        pending = iter(submit(jobs) if jobs else [])
        return [(lambda sae=found[at]: sae) if found.get(at) is not None else next(pending) for at, _ in todo]

    def grow(at: str, reg: Region, levels: int, job: Callable) -> None:
        rung = f"{at}/r{width}"
        _drop_subtree(new, rung)
        sae = job()
        if "refined_from" not in sae.metadata:
            sae.metadata.update({"featuretree_rung": rung, "refined_from": at})
            if saved is not None:
                saved.save_sae(rung, sae)
        new.saes[rung] = sae
        new.graph.graph["refined"][rung] = {"parent": at, "width": width, "k": k, "n_tokens": len(reg),
                                            "n_scanned": reg.n_scanned, "fvu": float(sae.metrics["fvu"])}
        F = _attach_local(new, at, rung, sae, reg, n_contexts=n_contexts)
        bar.update(1)
        bar.set_postfix(node=at, tokens=len(reg), fvu=f"{sae.metrics['fvu']:.3f}", refresh=False)
        log.info("refined %s: %d tokens -> %s (FVU %.3f, %d live features)", at, len(reg), rung,
                 sae.metrics["fvu"], int((np.asarray(F.sum(0)).ravel() > 0).sum()))
        if levels <= 1:
            return
        counts = np.asarray(F.sum(0)).ravel()
        kids = [j for j in np.argsort(-counts, kind="stable") if counts[j] > 0
                and new.graph.edges[next(iter(new.graph.predecessors(f"{rung}/{j}"))), f"{rung}/{j}"]["kind"] != "same"]
        todo = []
        for j in kids[:max_children]:
            if counts[j] < min_tokens:
                log.info("not refining %s/%d: %d tokens < min_tokens %d", rung, j, counts[j], min_tokens)
                continue
            todo.append((f"{rung}/{j}", reg.subset(np.asarray(F[:, j].todense()).ravel() > 0)))
        jobs = start(todo)  # siblings are submitted together (in parallel on Ray) ...
        for (child, sub), job in zip(todo, jobs):  # ... and join the tree in depth-first order
            grow(child, sub, levels - 1, job)

    grow(node, region, depth, start([(node, region)])[0])
    bar.close()
    if saved is not None:
        saved.remove()
    return new


class _Saved:
    """A refinement's checkpoint directory: `state.json` (featuretree.checkpoint: the settings' fingerprint and
    the record of each finished file), `region.safetensors` and `saes/<rung>/` for each local dictionary.
    A file is reused only when its size and checksum match the record, so a kill mid-write redoes it."""

    def __init__(self, path, tree, refinement: dict) -> None:
        from featuretree.checkpoint import Checkpoint, fingerprint

        self.dir = Path(path)
        graph = sorted((n, tuple(sorted((k, str(v)) for k, v in d.items()))) for n, d in tree.graph.nodes(data=True))
        self.state = Checkpoint(self.dir / "state.json", {**refinement, "tree": fingerprint(graph),
                                                          "saes": sorted(tree.saes)},
                                "an unfinished refinement", "finish that one (rerun it), or delete the directory "
                                "(CLI: --force) to start this one", where=self.dir)
        loaded = self.state.load()
        self.done: dict = loaded[1]["done"] if loaded is not None else {}
        if loaded is None:
            self.state.save({"done": self.done})

    def _ok(self, key: str, path: Path) -> bool:
        from featuretree.checkpoint import file_matches

        return key in self.done and file_matches(path, self.done[key])

    def _record(self, key: str, path: Path) -> None:
        from featuretree.checkpoint import file_record

        self.done[key] = file_record(path)
        self.state.save({"done": self.done})

    def region(self) -> Region | None:
        from featuretree.checkpoint import load_state
        from featuretree.region import Region

        p = self.dir / "region.safetensors"
        if not self._ok("region", p):
            return None
        region = Region.from_state(*load_state(p))
        log.info("reusing the region saved in %s (%d tokens)", self.dir, len(region))
        return region

    def save_region(self, region: Region) -> None:
        from featuretree.checkpoint import save_state

        p = self.dir / "region.safetensors"
        save_state(p, *region.to_state())
        self._record("region", p)

    def sae(self, rung: str):
        from featuretree.sae import WEIGHTS_FILE, TopKSAE

        d = self.dir / "saes" / rung
        return TopKSAE.load(d) if self._ok(rung, d / WEIGHTS_FILE) else None

    def save_sae(self, rung: str, sae) -> None:
        from featuretree.sae import WEIGHTS_FILE

        d = sae.save(self.dir / "saes" / rung)
        self._record(rung, d / WEIGHTS_FILE)

    def remove(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)
