"""Depth-first refinement: train a small dictionary only where one feature fires, hang its features below it.

refine(tree, node): scan the run's activation store, then stream more of the corpus through the model,
keeping the tokens where `node` fires (its *region*); train a local TopK dictionary of `width` features on
the region alone; link its features to `node` by the ladder's rules; recurse into children that still have
`min_tokens` tokens. A local feature only exists inside its parent's region, so firing is gated:
    fires(node/r64/i, token) = fires(node, token) and local feature i fires on it (value >= its fire_at)
hence coverage P(node | child) = 1, `reverse` = P(child | node) is the child's share of the region, and its
corpus-wide `freq` = freq(node) x reverse. search(tree, query) walks down from the top, each step taking the
child that answers the query best (`find`'s score), and refines a leaf when it runs out of children.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import re
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from featuretree.config import FeatureTreeError
from featuretree.utils import quiet, rung_key, store_path

if TYPE_CHECKING:  # imported inside the functions: `import featuretree` imports this module and must stay light
    import scipy.sparse as sp
    import torch

log = logging.getLogger(__name__)

_TOKEN_COLUMNS = ["token_id", "doc_id", "start", "end"]


# ---- firing of any node, refined ones included --------------------------------------------------------
def gate_of(tree, rung: str) -> str | None:
    """The node a refined rung was trained under ("w512/7" for "w512/7/r64"); None for a ladder rung.

    Example:
        >>> import networkx as nx
        >>> from featuretree.tree import FeatureTree
        >>> t = FeatureTree(nx.DiGraph(refined={"w512/7/r64": {"parent": "w512/7"}}))
        >>> gate_of(t, "w512/7/r64"), gate_of(t, "w512")
        ('w512/7', None)
    """
    info = (tree.graph.graph.get("refined") or {}).get(rung)
    return info["parent"] if info else None


def _thresholds(tree) -> dict[str, np.ndarray]:
    """{rung: fire_at per feature} from the nodes' `fire_at` (inf for features that never fired when linked)."""
    out: dict[str, np.ndarray] = {}
    for _, d in tree.graph.nodes(data=True):
        r, at = d.get("rung"), d.get("fire_at")
        if r in tree.saes and at is not None:
            if r not in out:
                out[r] = np.full(tree.saes[r].width, np.inf)
            out[r][int(d["index"])] = float(at)
    return out


def fire_rungs(tree, x: torch.Tensor, rungs=None) -> dict[str, sp.csr_matrix]:
    """Firing matrix (n, width) of each rung on activations `x`, with the tree's own firing rule.

    Thresholds are the `fire_at` stored on the nodes (trees linked before they were stored measure them
    on `x`). A refined rung fires only where the node it was trained under fires (its gate), so the
    rungs it hangs from are computed too. `rungs=None` means every dictionary of the tree.

    Example:
        >>> F = fire_rungs(tree, acts.load("heldout"), ["w512"])["w512"]  # doctest: +SKIP
        >>> F.shape  # doctest: +SKIP
        (60000, 512)
    """
    import scipy.sparse as sp
    import torch

    from featuretree.tree import fire

    g = tree.graph
    rel = g.graph.get("fire_rel", 0.25)
    want = list(tree.saes) if rungs is None else list(rungs)
    unknown = [r for r in want if r not in tree.saes]
    if unknown:
        raise FeatureTreeError(f"the tree has no dictionary for rung(s) {unknown}: its rungs are {tree.rungs}")
    needed, todo = set(want), list(want)
    while todo:  # add the rungs each refined rung is gated by
        gate = gate_of(tree, todo.pop())
        if gate is not None and (pr := str(g.nodes[gate]["rung"])) not in needed:
            needed.add(pr)
            todo.append(pr)
    at_of = _thresholds(tree)
    n = x.shape[0]
    out: dict[str, sp.csr_matrix] = {}
    for r in sorted(needed, key=rung_key):  # a gate's rung always sorts before the rungs it gates
        sae, gate = tree.saes[r], gate_of(tree, r)
        if gate is None:
            out[r] = fire(sae, x, rel, at_of.get(r))[2]
            continue
        rows = out[str(g.nodes[gate]["rung"])][:, int(g.nodes[gate]["index"])].nonzero()[0]
        local = fire(sae, x[torch.from_numpy(rows)], rel, at_of.get(r))[2]  # (len(rows), width)
        lift = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, np.arange(len(rows)))), shape=(n, len(rows)))
        out[r] = (lift @ local).tocsr()  # (n, width): zero outside the gate
    return {r: out[r] for r in want}


def node_mask(tree, node: str, x: torch.Tensor) -> np.ndarray:
    """Bool (n,): where `node` fires on the rows of `x` (gated through every refinement above it).

    Example:
        >>> node_mask(tree, "w512/7", acts.load("heldout")).mean()  # doctest: +SKIP
        0.004
    """
    d = tree.node(node)
    if d.get("virtual"):
        return np.ones(x.shape[0], dtype=bool)
    F = fire_rungs(tree, x, [str(d["rung"])])[str(d["rung"])]
    return np.asarray(F[:, int(d["index"])].todense()).ravel() > 0


# ---- the tokens where a node fires ----------------------------------------------------------------------
@dataclass
class Region:
    """Tokens where a node fires: activations `x` (n, d_model), `tokens` (token_id, doc_id, start, end; doc
    ids key `docs`), and how to spell token ids. It answers `texts()` / `token_strings()` like a store.

    Example:
        >>> import torch
        >>> r = Region(torch.zeros(2, 4), pd.DataFrame({"token_id": [5, 6], "doc_id": [0, 0], "start": [0, 4],
        ...            "end": [3, 7]}), {0: "cat sat"}, None)
        >>> len(r.subset(np.array([True, False]))), r.token_strings([5])
        (1, ['5'])
    """

    x: torch.Tensor
    tokens: pd.DataFrame
    docs: dict[int, str]
    spell: Callable[[Any], list[str]] | None
    n_scanned: int = 0

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def texts(self) -> dict[int, str]:
        return self.docs

    def token_strings(self, ids: Any) -> list[str]:
        ids = list(np.asarray(ids).reshape(-1))
        return self.spell(ids) if self.spell is not None else [str(int(i)) for i in ids]

    def subset(self, mask: np.ndarray) -> Region:
        import torch

        mask = np.asarray(mask, dtype=bool)
        tokens = self.tokens[mask].reset_index(drop=True) if len(self.tokens) == len(mask) else self.tokens
        return replace(self, x=self.x[torch.from_numpy(mask)], tokens=tokens)

    @property
    def has_text(self) -> bool:
        return bool(self.docs) and len(self.tokens) == len(self)


def _model_of(tree, model):
    """`model` (anything load_model takes), else the tree's own model, loaded and nnsight-wrapped."""
    from featuretree.model import load_model

    if model is None and tree.config is None:
        raise FeatureTreeError("this tree has no config to say which model made it: pass model=... and layer=...")
    return load_model(model if model is not None else tree.config.model)


def _layer_of(tree, layer: int | None) -> int:
    if layer is not None:
        return int(layer)
    if tree.config is None:
        raise FeatureTreeError("this tree has no config to say which layer it was built on: pass layer=...")
    return int(tree.config.layer)


class _Collector:
    """Accumulates the region's rows from successive sources, re-keying their documents."""

    def __init__(self, tree, node: str, max_tokens: int) -> None:
        self.tree, self.node, self.max_tokens = tree, node, max_tokens
        self.xs: list[torch.Tensor] = []
        self.toks: list[pd.DataFrame] = []
        self.docs: dict[int, str] = {}
        self.doc_key: dict[str, int] = {}
        self.spell: Callable | None = None
        self.n = self.n_scanned = 0

    def add(self, x: torch.Tensor, tokens: pd.DataFrame | None, texts: dict[int, str] | None) -> None:
        self.n_scanned += x.shape[0]
        if self.n >= self.max_tokens or x.shape[0] == 0:
            return
        import torch

        keep = np.flatnonzero(node_mask(self.tree, self.node, x))[: self.max_tokens - self.n]
        if keep.size == 0:
            return
        self.xs.append(x[torch.from_numpy(keep)])
        self.n += keep.size
        if tokens is not None and texts is not None:
            t = tokens.iloc[keep][_TOKEN_COLUMNS].reset_index(drop=True)
            new_ids = []
            for d in t["doc_id"].tolist():
                text = texts.get(int(d), "")
                if text not in self.doc_key:
                    self.doc_key[text] = len(self.doc_key)
                    self.docs[self.doc_key[text]] = text
                new_ids.append(self.doc_key[text])
            t["doc_id"] = np.asarray(new_ids, dtype=np.int64)
            self.toks.append(t)

    def region(self, d_model: int) -> Region:
        import torch

        x = torch.cat(self.xs) if self.xs else torch.empty(0, d_model)
        n_tok = sum(len(t) for t in self.toks)
        tokens = (pd.concat(self.toks, ignore_index=True) if self.toks and n_tok == x.shape[0]
                  else pd.DataFrame({c: np.zeros(0, np.int64) for c in _TOKEN_COLUMNS}))
        return Region(x, tokens, self.docs if len(tokens) else {}, self.spell, self.n_scanned)


def collect_region(tree, node: str, *, acts=None, texts=None, model=None, layer: int | None = None,
                   min_tokens: int = 500, max_tokens: int = 20_000, stream_tokens: int = 100_000,
                   chunk_docs: int = 1000, seed: int = 0, progress: bool = True) -> Region:
    """The tokens where `node` fires: from the run's activation store, then from more corpus text.

    `acts` (an Activations store or a Tensor [n, d_model]) replaces the run's own store. Then, while the
    region holds fewer than `max_tokens`, texts the store did not harvest (`texts`, else the run's corpus)
    stream through the model in shuffled chunks of `chunk_docs` documents, `stream_tokens` tokens at most.
    Too few tokens is an error that says how many were found; when the node's rate in the store shows
    that streaming cannot reach `min_tokens`, that error comes before any streaming (a rare node would
    otherwise cost a pass over the whole corpus).

    Example:
        >>> r = collect_region(tree, "w512/7", max_tokens=5000)  # doctest: +SKIP
        >>> len(r), r.x.shape[1]  # doctest: +SKIP
        (5000, 384)
    """
    import torch
    from tqdm.auto import tqdm

    from featuretree.activations import Activations
    from featuretree.train import _is_store

    tree.node(node)  # an unknown id is a clear error
    d_model = next(iter(tree.saes.values())).d_model
    col = _Collector(tree, node, max_tokens)
    harvested: set[str] = set()
    store = acts
    if store is None and (p := store_path(tree)) is not None and (p / "meta.json").is_file():
        store = Activations(p)
    bar = tqdm(total=max_tokens, unit="tok", desc=f"region of {node}", disable=not progress)
    if store is not None and _is_store(store):
        doc_texts = store.texts()
        col.spell = store.token_strings
        harvested = set(doc_texts.values())
        for cols in store._rows("all", ("acts", "token_ids", "doc_ids", "starts", "ends"), None):
            tok = pd.DataFrame({"token_id": cols["token_ids"].numpy(), "doc_id": cols["doc_ids"].numpy(),
                                "start": cols["starts"].numpy(), "end": cols["ends"].numpy()})
            before = col.n
            col.add(cols["acts"].float(), tok, doc_texts)
            bar.update(col.n - before)
            bar.set_postfix(scanned=col.n_scanned, refresh=False)
            if col.n >= max_tokens:
                break
    elif store is not None:
        col.add(torch.as_tensor(store).float(), None, None)
        bar.update(col.n)

    pool = None
    if col.n < max_tokens and (texts is not None or tree.config is not None):
        if texts is not None:
            from featuretree.activations import _as_texts

            pool = _as_texts(texts)
        elif acts is None:  # the run's corpus, minus the documents the store harvested
            from featuretree.corpus import corpus_texts

            with contextlib.suppress(FeatureTreeError, OSError, ValueError):
                pool = corpus_texts(tree.config.corpus)
    if pool is not None:
        order = [i for i in range(len(pool)) if pool[i].strip() and pool[i] not in harvested]
        random.Random(seed).shuffle(order)
        if col.n_scanned and harvested:  # the store's rate says what streaming can add
            per_doc = col.n_scanned / len(harvested)
            reach = min(stream_tokens, per_doc * len(order))
            expect = col.n / col.n_scanned * reach
            if col.n + expect < min_tokens:
                bar.close()
                raise FeatureTreeError(
                    f"{node} fires on {col.n} of the {col.n_scanned} tokens in the run's store; streaming "
                    f"{reach:,.0f} more corpus tokens would add about {expect:.0f}, short of min_tokens={min_tokens}: "
                    "lower min_tokens, raise stream_tokens, refine a coarser node, or give texts=...")
        budget = col.n_scanned + stream_tokens
        wrapped = _model_of(tree, model) if order else None
        at = _layer_of(tree, layer)
        max_length = tree.config.max_length if tree.config is not None else 128
        for s in range(0, len(order), chunk_docs):
            if col.n >= max_tokens or col.n_scanned >= budget:
                break
            chunk = [pool[i] for i in order[s:s + chunk_docs]]
            with quiet(), tempfile.TemporaryDirectory(prefix="featuretree-stream-") as tmp:
                from featuretree.activations import collect

                part = collect(wrapped, at, chunk, n_tokens=10**12, out=tmp, progress=False, max_length=max_length)
                col.spell = col.spell or _vocab_of(part)
                before = col.n
                col.add(part.load("all"), part.tokens("all"), part.texts())
            bar.update(col.n - before)
            bar.set_postfix(scanned=col.n_scanned, refresh=False)
    bar.close()
    region = col.region(d_model)
    log.info("region of %s: %d tokens from %d scanned", node, len(region), region.n_scanned)
    if len(region) < min_tokens:
        raise FeatureTreeError(
            f"{node} fires on only {len(region)} of the {region.n_scanned} tokens scanned (min_tokens={min_tokens}): "
            "lower min_tokens, refine a coarser node, or give more texts (texts=...)")
    return region


def _vocab_of(store) -> Callable[[Any], list[str]]:
    import json

    vocab = json.loads((store.path / "vocab.json").read_text(encoding="utf-8"))
    return lambda ids: [vocab[int(i)] or "" for i in ids]


# ---- refine ------------------------------------------------------------------------------------------
def _schedule(n: int, batch_size: int, epochs: int, min_steps: int = 300) -> tuple[int, int]:
    """(batch size, epochs) for a small local dictionary: at least `min_steps` steps, at most 200 epochs."""
    bs = int(min(batch_size, max(32, n // 8)))
    return bs, int(min(200, max(epochs, math.ceil(min_steps * bs / max(n, 1)))))


def _drop_subtree(tree, rung: str) -> None:
    """Remove an earlier refinement `rung` (and everything refined below it) from `tree`, in place."""
    g = tree.graph
    prefix = rung + "/"
    gone = [r for r in tree.saes if r == rung or r.startswith(prefix)]
    for r in gone:
        tree.saes.pop(r, None)
        g.graph.get("refined", {}).pop(r, None)
    g.remove_nodes_from([n for n in list(g) if n.startswith(prefix)])


LOCAL_MAX_LR = 1e-3
"""Learning-rate cap of local dictionaries. The ladder's width rule gives a 64-wide dictionary 9.6e-3, which
diverged on a refinement region (w512/148 of the default run, 7.5k tokens, k=2: training-set FVU 2.45 vs
0.49 at 1e-3; on 500-token regions 1e-3 and the rule reach about the same FVU)."""


def local_split(region: Region):
    """(training rows, held-out mask or None) of a region: every tenth document is held out when there are
    >= 1000 tokens with text (else the local dictionary is evaluated on what it trained on)."""
    held = (region.tokens["doc_id"].to_numpy() % 10 == 0) if region.has_text and len(region) >= 1000 else None
    if held is not None and (held.all() or not held.any()):
        held = None
    return region.x, held


def fit_local(x, held, width: int, k: int, seed: int, batch_size: int, epochs: int):
    """Train one local dictionary on rows `x` (held-out rows `held` evaluated, not trained on).

    Example:
        >>> import torch
        >>> fit_local(torch.randn(600, 8), None, 16, 1, 0, 1024, 3).width
        16
    """
    import torch

    from featuretree.train import default_lr, train_ladder

    x_train = x if held is None else x[torch.from_numpy(~held)]
    x_eval = x if held is None else x[torch.from_numpy(held)]
    bs, epochs = _schedule(x_train.shape[0], batch_size, epochs)
    return train_ladder(x_train, (width,), k, epochs=epochs, batch_size=bs, seed=seed, progress=False,
                        lr=min(default_lr(width), LOCAL_MAX_LR), eval_acts=x_eval)[width]


def _attach_local(tree, node: str, rung: str, sae, region: Region, *, n_contexts: int):
    """Link the local dictionary's features under `node` (and within the rung) and label them; (n, width) firing."""
    from featuretree.label import annotate, context
    from featuretree.tree import _candidates, _cos, attach, fire, node_id

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
    cands = _candidates([], rung, {rung: F}, min_cov, within)
    for j in np.flatnonzero(counts):
        c = node_id(rung, j)
        if j in cands:  # a local feature covers it and fires more widely: the rung resolves parent and child
            attach(g, {rung: sae}, rung, int(j), cands[j], same)
        else:
            rev = float(counts[j] / n)
            g.add_edge(node, c, coverage=1.0, reverse=rev, cos=_cos(sae.W_dec.detach()[j], p_dir),
                       kind="same" if rev >= same else "split", within=False)
        g.edges[next(iter(g.predecessors(c))), c]["refined"] = True
    if region.has_text:
        rng = np.random.default_rng(0)
        rows = rng.choice(n, size=min(n, 40), replace=False)
        texts = region.texts()
        t = region.tokens
        docs = [context(texts[int(t.doc_id[r])], int(t.start[r]), int(t.end[r])) for r in rows]
        parent_docs = {node: [c.replace("«", " ").replace("»", " ") for c in docs if c]}
        annotate(tree, {rung: (v, i)}, region.tokens, region, n_contexts=n_contexts, parent_docs=parent_docs,
                 contrast=True)
    return F


def local_k(width: int, k: int = 16) -> int:
    """Default active features per token of a local dictionary: max(1, min(k, width // 64)).

    A local dictionary only has to tell the region's tokens apart (they already share the parent's
    direction), and fewer active features make children that divide the region instead of overlapping
    in it: on the default WordNet run, refining w512/148 and w128/66 (width 32 / 64) gave children purer
    in WordNet lexicographer file than their parent for 66-100% of them at k=1, 55-77% at k=2, 56-76% at
    k=4 and 45-61% at k=8 (`featuretree eval refine`, docs/EVAL.md).

    Example:
        >>> local_k(64), local_k(256), local_k(4096, 16)
        (1, 4, 16)
    """
    return max(1, min(int(k), int(width) // 64))


def refine(tree, node: str, *, width: int = 64, depth: int = 1, k: int | None = None, min_tokens: int = 500,
           max_tokens: int = 20_000, stream_tokens: int = 100_000, max_children: int | None = None,
           acts=None, texts=None, model=None, layer: int | None = None, n_contexts: int = 5, seed: int | None = None,
           checkpoint=None, executor: str | None = None, ray_address: str | None = None, progress: bool = True):
    """A new tree in which `node` has children from a `width`-feature dictionary trained only where it fires.

    The region (see `collect_region`: the run's store, then up to `stream_tokens` more corpus tokens, at most
    `max_tokens`, at least `min_tokens` or an error) trains a TopK dictionary with `k` active features
    (default `local_k(width)`: 1 up to 127 features, so children divide the region); its features become
    nodes "<node>/r<width>/<i>" linked by the ladder's
    rules (coverage 1 by construction, `reverse` = share of the region, kind "same"/"split", within-rung
    parents where one local feature covers another), labelled against `node` and each other. With depth > 1
    it recurses depth-first into each child (largest first, `max_children` at most) whose own share of the
    region still has `min_tokens` tokens. The input tree is not modified; refining a node again with the same
    width replaces that refinement. Save the result with `ft.save` like any tree. With `checkpoint` (a
    directory) the gathered region and every local dictionary are saved there as they are made; rerunning
    the same refinement after a kill picks them up and returns the same tree (the directory is removed at
    the end). `executor="ray"` (default: the tree's `config.executor`) trains sibling local dictionaries as
    parallel Ray tasks; the tree is assembled in the same depth-first order and equals the serial one.

    Example:
        >>> deep = refine(tree, "w512/7", width=64, depth=2)  # doctest: +SKIP
        >>> sorted(deep.graph.successors("w512/7"))[:2]  # doctest: +SKIP
        ['w512/7/r64/0', 'w512/7/r64/11']
    """
    from tqdm.auto import tqdm

    from featuretree.tree import FeatureTree

    width, depth = int(width), int(depth)
    if depth < 1:
        raise FeatureTreeError(f"depth={depth} must be at least 1 (levels of refinement below {node!r})")
    if width < 2:
        raise FeatureTreeError(f"width={width} must be at least 2 features")
    cfg = tree.config
    k = int(k) if k is not None else local_k(width, cfg.k if cfg else 16)
    if not 0 < k < width:
        raise FeatureTreeError(f"k={k} must be at least 1 and below width={width}")
    if min_tokens < 1 or max_tokens < min_tokens:
        raise FeatureTreeError(f"need 1 <= min_tokens ({min_tokens}) <= max_tokens ({max_tokens})")
    if tree.node(node).get("virtual"):
        raise FeatureTreeError(f"{node!r} is the virtual root: refine a feature, e.g. one of tree.roots()")
    seed = int(seed if seed is not None else (cfg.seed if cfg else 0))
    from featuretree.distributed import check_executor

    executor = check_executor(executor or getattr(cfg, "executor", "serial") or "serial")
    saved = None
    if checkpoint is not None:
        saved = _RefineCheckpoint(checkpoint, tree, {
            "node": node, "width": width, "depth": depth, "k": k, "min_tokens": min_tokens, "max_tokens": max_tokens,
            "stream_tokens": stream_tokens, "max_children": max_children, "seed": seed, "n_contexts": n_contexts,
            "texts": None if texts is None else "given", "acts": None if acts is None else "given"})
    region = saved.region() if saved is not None else None
    if region is None:
        region = collect_region(tree, node, acts=acts, texts=texts, model=model, layer=layer, min_tokens=min_tokens,
                                max_tokens=max_tokens, stream_tokens=stream_tokens, seed=seed, progress=progress)
        if saved is not None:
            saved.save_region(region)
    new = FeatureTree(tree.graph.copy(), dict(tree.saes), cfg, tree.path)
    new.graph.graph["refined"] = {r: dict(v) for r, v in (tree.graph.graph.get("refined") or {}).items()}
    bar = tqdm(desc=f"refine {node}", unit="dict", disable=not progress)

    batch_size, epochs = (cfg.batch_size, cfg.epochs) if cfg else (1024, 3)
    rung_seed = lambda rung: seed + zlib.crc32(rung.encode()) % 2**20  # noqa: E731  (independent of order)

    def start(at: str, reg: Region):
        """The local dictionary for `at`: saved by a killed run, else trained (a Ray future on executor='ray')."""
        rung = f"{at}/r{width}"
        sae = saved.sae(rung) if saved is not None else None
        if sae is not None:
            return sae
        if executor == "ray":
            from featuretree.distributed import ray_fit_local_many

            return ray_fit_local_many([(*local_split(reg), width, k, rung_seed(rung), batch_size, epochs)],
                                      ray_address)[0]
        return fit_local(*local_split(reg), width, k, rung_seed(rung), batch_size, epochs)

    def grow(at: str, reg: Region, levels: int, job) -> None:
        from featuretree.distributed import ray_get

        rung = f"{at}/r{width}"
        _drop_subtree(new, rung)
        sae = ray_get(job)
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
        jobs = [start(child, sub) for child, sub in todo]  # siblings start together (in parallel on Ray) ...
        for (child, sub), job in zip(todo, jobs):  # ... and join the tree in depth-first order
            grow(child, sub, levels - 1, job)

    grow(node, region, depth, start(node, region))
    bar.close()
    if saved is not None:
        saved.remove()
    return new


class _RefineCheckpoint:
    """What a refinement has done so far, in a directory: the region it gathered and each local dictionary.

    A rerun of the same refinement (same tree, node and settings; `fingerprint.json` says) reuses both, so
    it continues where a kill stopped it and builds the same tree; other settings are refused.
    """

    def __init__(self, path, tree, settings: dict) -> None:
        import json
        from pathlib import Path

        from featuretree.checkpoint import fingerprint

        self.path = Path(path)
        graph = sorted((n, tuple(sorted((k, str(v)) for k, v in d.items()))) for n, d in tree.graph.nodes(data=True))
        fp = fingerprint({"settings": settings, "graph": graph, "saes": sorted(tree.saes)})
        f = self.path / "fingerprint.json"
        if f.is_file():
            try:
                old = json.loads(f.read_text(encoding="utf-8")).get("fingerprint")
            except (OSError, ValueError):
                old = None
            if old != fp:
                raise FeatureTreeError(
                    f"{self.path} holds an unfinished refinement of another node, tree or settings: finish that "
                    "one (rerun it), or delete the directory (CLI: --force) to start this one")
        else:
            from featuretree.utils import write_json

            write_json(f, {"fingerprint": fp, "settings": settings})

    def region(self) -> Region | None:
        import json

        from featuretree.checkpoint import load_state

        p = self.path / "region.safetensors"
        if not p.is_file():
            return None
        tensors, info = load_state(p)
        tokens = pd.DataFrame({c: tensors[c].numpy() for c in _TOKEN_COLUMNS})
        vocab = {int(k): v for k, v in json.loads(info["vocab"]).items()}
        docs = {int(k): v for k, v in json.loads(info["docs"]).items()}
        log.info("reusing the region of %s saved in %s (%d tokens)", info["node"], self.path, len(tokens))
        return Region(tensors["x"], tokens if len(tokens) == len(tensors["x"]) else tokens.iloc[:0], docs,
                      (lambda ids: [vocab.get(int(i), str(int(i))) for i in ids]) if vocab else None,
                      int(info["n_scanned"]))

    def save_region(self, region: Region) -> None:
        import json

        import torch

        from featuretree.checkpoint import save_state

        ids = sorted(set(region.tokens["token_id"].tolist())) if len(region.tokens) else []
        vocab = dict(zip(ids, region.token_strings(ids))) if region.spell is not None else {}
        tensors = {"x": region.x, **{c: torch.tensor(region.tokens[c].to_numpy(dtype=np.int64))
                                     for c in _TOKEN_COLUMNS}}
        save_state(self.path / "region.safetensors", tensors,
                   {"node": "", "n_scanned": region.n_scanned, "docs": json.dumps(region.docs),
                    "vocab": json.dumps(vocab)})

    def _dir(self, rung: str):
        return self.path / "saes" / rung

    def sae(self, rung: str):
        from featuretree.sae import TopKSAE

        d = self._dir(rung)
        if not (d / "cfg.json").is_file():
            return None
        try:
            return TopKSAE.load(d)
        except FeatureTreeError as e:
            log.warning("the saved dictionary %s is damaged (%s): training it again", d, e)
            return None

    def save_sae(self, rung: str, sae) -> None:
        sae.save(self._dir(rung))

    def remove(self) -> None:
        import shutil

        shutil.rmtree(self.path, ignore_errors=True)


# ---- search ------------------------------------------------------------------------------------------
def _children(tree, n: str) -> list[str]:
    from featuretree.tree import ROOT

    if n == ROOT:
        return tree.roots()
    return [c for c in tree.graph.successors(n) if not tree.graph.nodes[c].get("virtual")]


def search(tree, query, *, start: str | None = None, max_depth: int = 6, negatives=None, width: int = 64,
           k: int | None = None, refine_leaves: bool = True, min_tokens: int = 300, max_tokens: int = 20_000,
           stream_tokens: int = 100_000, texts=None, model=None, layer: int | None = None, progress: bool = True,
           **find_kw) -> pd.DataFrame:
    """Targeted depth-first search: from the top, step to the child that answers `query` best, refining leaves.

    At each step the children of the current node (the tree's top-level features first, or `start`'s
    children: a node such as a "biology" feature to search under, which is then the path's first row) that
    fire on the query more than they usually do (`find`'s score > 0) are candidates, and the one whose branch
    leads to the best score (through such nodes) is taken: a broad ancestor of a very specific feature wins
    over a sibling that only scores well itself.
    A node none of whose children answers (a leaf, or one whose ladder children miss the query) is refined
    (`refine(..., depth=1)`, `width`, `k`, token limits) when `refine_leaves`, so the search goes below the
    ladder only along the branch it follows (`texts`: what
    refinement streams instead of the run's corpus). Stops after `max_depth` steps, when no child
    answers, or when a leaf has too few tokens to refine. Returns the path as a DataFrame (step, node,
    label, score, query_rate, freq, refined); `path.attrs["tree"]` is the tree with the refinements made.

    Example (the default run; the last step is a feature of a dictionary trained where w8192/8012 fires):
        >>> path = search(tree, "malaria")  # doctest: +SKIP
        >>> path[["node", "label"]].values.tolist()[-1]  # doctest: +SKIP
        ['w8192/8012/r64/51', 'parasite · malaria · parasites | mosquito']
    """
    from featuretree.find import find
    from featuretree.tree import ROOT

    model = _model_of(tree, model)
    layer = _layer_of(tree, layer)

    def score(t) -> tuple[pd.DataFrame, dict[str, float]]:  # every node's score, and where each branch leads
        s = find(t, query, negatives=negatives, model=model, layer=layer, top=None, **find_kw).set_index("node")
        return s, _reach(t, s)

    scores, reach = score(tree)
    rows, current = [], ROOT
    if start is not None and start != ROOT:
        tree.node(start)  # an unknown id is a clear error
        r = scores.loc[start] if start in scores.index else None
        rows.append({"step": 0, "node": start, "label": tree.graph.nodes[start].get("label", start),
                     "score": float(r["score"]) if r is not None else float("nan"),
                     "query_rate": float(r["query_rate"]) if r is not None else 0.0,
                     "freq": float(tree.graph.nodes[start].get("freq") or 0.0),
                     "refined": bool(tree.graph.nodes[start].get("refined", False))})
        current = start
    refined_here: set[str] = set()
    for step in range(len(rows), len(rows) + int(max_depth)):
        kids = _children(tree, current)
        answer = _answering(kids, scores)
        if not answer and refine_leaves and current != ROOT and current not in refined_here:
            # no finer level answers (none, or the ladder's children miss the query): make one where it fires
            refined_here.add(current)
            try:
                tree = refine(tree, current, width=width, k=k, depth=1, min_tokens=min_tokens, max_tokens=max_tokens,
                              stream_tokens=stream_tokens, texts=texts, model=model, layer=layer, progress=progress)
            except FeatureTreeError as e:
                log.info("search stops at %s: %s", current, e)
                break
            scores, reach = score(tree)
            kids = _children(tree, current)
            answer = _answering(kids, scores)
        if not answer:
            log.info("search stops at %s: none of its %d children answers %r", current, len(kids), query)
            break
        best = max(answer, key=lambda c: (reach[c], scores.at[c, "score"], scores.at[c, "query_rate"]))
        r = scores.loc[best]
        rows.append({"step": step, "node": best, "label": r["label"], "score": float(r["score"]),
                     "query_rate": float(r["query_rate"]), "freq": float(r["freq"]),
                     "refined": bool(tree.graph.nodes[best].get("refined", False))})
        current = best
    path = pd.DataFrame(rows, columns=["step", "node", "label", "score", "query_rate", "freq", "refined"])
    path.attrs["tree"] = tree
    return path


def _answering(nodes: list[str], scores: pd.DataFrame) -> list[str]:
    """The nodes that fire on the query more than they usually do (score > 0, query rate > 0)."""
    return [c for c in nodes if c in scores.index and scores.at[c, "score"] > 0 and scores.at[c, "query_rate"] > 0]


def _reach(tree, scores: pd.DataFrame) -> dict[str, float]:
    """For every answering node, the best score in its subtree reachable through answering nodes only.

    Choosing the child with the best reach instead of the best own score finds a specific feature the
    greedy walk misses when its branch starts with a broad, weaker-scoring ancestor.
    """
    import networkx as nx

    g = tree.graph
    ok = set(_answering(list(g.nodes), scores))
    reach: dict[str, float] = {}
    for n in reversed(list(nx.topological_sort(g))):
        if n in ok:
            below = [reach[c] for c in g.successors(n) if c in reach]
            reach[n] = max([float(scores.at[n, "score"]), *below])
    return reach


# ---- query firing rates (used by find and novel) ------------------------------------------------------
def _is_content(token: str) -> bool:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    t = token.replace("##", "").replace("Ġ", "").replace("▁", "").strip().lower()
    return any(c.isalnum() for c in t) and t not in ENGLISH_STOP_WORDS


def query_rates(tree, texts: list[str], *, model=None, layer: int | None = None,
                span: re.Pattern | None = None) -> dict[str, float]:
    """Share of the texts' content tokens on which each node fires: {node id: rate}, for every rung.

    Stop words and punctuation are left out unless the texts have nothing else; with `span` only tokens
    inside its matches count. The texts go through the tree's model (`model`, else `tree.config.model`) at its
    layer, then every dictionary (refined ones gated by their parents) with the tree's firing rule.
    "_n_tokens" holds the number of tokens counted.

    Example:
        >>> query_rates(tree, ["the anthrax bacterium"])["w512/11"]  # doctest: +SKIP
        1.0
    """
    import torch

    from featuretree.activations import collect

    wrapped = _model_of(tree, model)
    layer = _layer_of(tree, layer)
    cfg = tree.config
    with quiet(), tempfile.TemporaryDirectory(prefix="featuretree-query-") as tmp:
        acts = collect(wrapped, layer, texts, n_tokens=10**9, out=tmp, progress=False,
                       max_length=cfg.max_length if cfg is not None else 128)
        x = acts.load("all")
        toks = acts.tokens("all")
        strings = acts.token_strings(toks["token_id"].tolist())
        docs = acts.texts()
    if x.shape[0] == 0:
        raise FeatureTreeError("the query has no tokens the model keeps (only special tokens?): give real text")
    if span is not None:  # corpus contexts of a phrase: only the phrase's own tokens count
        spans = {d: [m.span() for m in span.finditer(t)] for d, t in docs.items()}
        keep = np.array([any(a < e and s_ < b for a, b in spans.get(int(d), ()))
                         for d, s_, e in zip(toks["doc_id"], toks["start"], toks["end"])])
    else:  # the query is about its content words: drop stop words and punctuation unless nothing else is left
        keep = np.array([_is_content(t) for t in strings])
    if keep.any():
        x = x[torch.from_numpy(keep)]
    for rung, sae in tree.saes.items():
        if sae.d_model != x.shape[1]:
            raise FeatureTreeError(f"rung {rung} expects d_model {sae.d_model} but the model's layer {layer} "
                                   f"gives {x.shape[1]}: pass the model and layer the tree was built from")
    rates: dict[str, float] = {}
    for rung, F in fire_rungs(tree, x).items():
        counts = np.asarray(F.sum(0)).ravel()
        for j in np.flatnonzero(counts):
            rates[f"{rung}/{j}"] = float(counts[j] / x.shape[0])
    rates["_n_tokens"] = float(x.shape[0])
    return rates
