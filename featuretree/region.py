"""The tokens where a node fires (its region): from the run's activation store, then from streamed corpus text.

collect_region(tree, node) scans the store and keeps the rows where `node` fires (gated through every
refinement above it); when they are fewer than `max_tokens`, documents the store did not harvest stream
through the model in shuffled chunks until the region is full or `stream_tokens` more tokens were scanned.
A Region holds the rows, their token spans and texts, so labels can quote the contexts.
"""

from __future__ import annotations

import contextlib
import logging
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import torch

from featuretree.config import FeatureTreeError
from featuretree.firing import node_mask, tree_layer, tree_model, tree_site
from featuretree.utils import quiet, store_path

__all__ = ["collect_region", "local_split", "Region", "TOKEN_COLUMNS"]

log = logging.getLogger(__name__)


TOKEN_COLUMNS = ["token_id", "doc_id", "start", "end"]


@dataclass
class Region:
    """Tokens where a node fires: activations `x` (n, d_model), `tokens` (token_id, doc_id, start, end; doc
    ids key `docs`), and how to spell token ids. It answers `texts()` / `token_strings()` like a store.

    Parameters
    ----------
    x : Tensor (n, d_model)
        The activations of the region's tokens.
    tokens : pandas.DataFrame
        token_id, doc_id, start, end per row of `x` (empty when the rows have no text).
    docs : dict of int to str
        {doc_id: text} of the documents the tokens come from.
    spell : callable, optional
        Token ids -> token strings (None: the ids written as numbers).
    n_scanned : int
        Tokens scanned to find the region.

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
        mask = np.asarray(mask, dtype=bool)
        tokens = self.tokens[mask].reset_index(drop=True) if len(self.tokens) == len(mask) else self.tokens
        return replace(self, x=self.x[torch.from_numpy(mask)], tokens=tokens)

    @property
    def has_text(self) -> bool:
        return bool(self.docs) and len(self.tokens) == len(self)

    def to_state(self) -> tuple[dict, dict]:
        """(tensors, info) that `from_state` turns back into this region (for a refinement's checkpoint)."""
        import json

        ids = sorted(set(self.tokens["token_id"].tolist())) if len(self.tokens) else []
        vocab = dict(zip(ids, self.token_strings(ids))) if self.spell is not None else {}
        tensors = {"x": self.x, **{c: torch.tensor(self.tokens[c].to_numpy(dtype=np.int64)) for c in TOKEN_COLUMNS}}
        return tensors, {"n_scanned": self.n_scanned, "docs": json.dumps(self.docs), "vocab": json.dumps(vocab)}

    @classmethod
    def from_state(cls, tensors: dict, info: dict) -> Region:
        """The region `to_state` described.

        Example:
            >>> r = Region(torch.zeros(1, 2), pd.DataFrame({"token_id": [5], "doc_id": [0], "start": [0], "end": [3]}),
            ...            {0: "cat"}, lambda ids: ["cat" for _ in ids], 7)
            >>> back = Region.from_state(*r.to_state()); back.n_scanned, back.token_strings([5])
            (7, ['cat'])
        """
        import json

        tokens = pd.DataFrame({c: tensors[c].numpy() for c in TOKEN_COLUMNS})
        vocab = {int(k): v for k, v in json.loads(info["vocab"]).items()}
        docs = {int(k): v for k, v in json.loads(info["docs"]).items()}
        return cls(tensors["x"], tokens if len(tokens) == len(tensors["x"]) else tokens.iloc[:0], docs,
                   (lambda ids: [vocab.get(int(i), str(int(i))) for i in ids]) if vocab else None,
                   int(info["n_scanned"]))


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

    def add(self, x: torch.Tensor, tokens: pd.DataFrame | None, texts: dict[int, str] | None,
            skip: np.ndarray | None = None) -> None:
        self.n_scanned += x.shape[0]
        if self.n >= self.max_tokens or x.shape[0] == 0:
            return
        fires = node_mask(self.tree, self.node, x)
        if skip is not None and len(skip) and tokens is not None:  # rows of docs already gathered (focus texts)
            fires &= ~np.isin(tokens["doc_id"].to_numpy(), skip)
        keep = np.flatnonzero(fires)[: self.max_tokens - self.n]
        if keep.size == 0:
            return
        self.xs.append(x[torch.from_numpy(keep)])
        self.n += keep.size
        if tokens is not None and texts is not None:
            t = tokens.iloc[keep][TOKEN_COLUMNS].reset_index(drop=True)
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
        x = torch.cat(self.xs) if self.xs else torch.empty(0, d_model)
        n_tok = sum(len(t) for t in self.toks)
        tokens = (pd.concat(self.toks, ignore_index=True) if self.toks and n_tok == x.shape[0]
                  else pd.DataFrame({c: np.zeros(0, np.int64) for c in TOKEN_COLUMNS}))
        return Region(x, tokens, self.docs if len(tokens) else {}, self.spell, self.n_scanned)


def collect_region(tree, node: str, *, acts=None, texts=None, focus=None, model=None, layer: int | None = None,
                   min_tokens: int = 500, max_tokens: int = 20_000, stream_tokens: int = 100_000,
                   chunk_docs: int = 1000, seed: int = 0, progress: bool = True) -> Region:
    """The tokens where `node` fires: from `focus` texts first, then the run's activation store, then more
    corpus text.

    `focus` texts (e.g. a search's query contexts) go through the model before anything else, so the region
    covers them however few of them the store harvested; they are not counted twice later.
    `acts` (an Activations store or a Tensor [n, d_model]) replaces the run's own store. Then, while the
    region holds fewer than `max_tokens`, texts the store did not harvest (`texts`, else the run's corpus)
    stream through the model in shuffled chunks of `chunk_docs` documents, `stream_tokens` tokens at most.
    Too few tokens is an error that says how many were found; when the node's rate in the store shows
    that streaming cannot reach `min_tokens`, that error comes before any streaming (a rare node would
    otherwise cost a pass over the whole corpus).

    Parameters
    ----------
    tree : FeatureTree
        The tree `node` belongs to (its store, corpus, model and layer are the defaults).
    node : str
        The node whose region is gathered, e.g. "w512/7".
    acts : Activations or Tensor [n, d_model], optional
        Replaces the run's own store as the first source of tokens.
    texts : list of str, optional
        What streams through the model instead of the run's corpus.
    focus : list of str, optional
        Texts whose tokens where `node` fires join the region first.
    model, layer : optional
        The model and layer that stream the texts (default: the tree's config).
    min_tokens : int
        Fewest tokens the region may have (fewer is an error).
    max_tokens : int
        Most tokens gathered.
    stream_tokens : int
        Most tokens streamed through the model beyond the store.
    chunk_docs : int
        Documents per streamed chunk.
    seed : int
        Seed of the order in which documents stream.
    progress : bool
        Show a progress bar.

    Example:
        >>> r = collect_region(tree, "w512/7", max_tokens=5000)  # doctest: +SKIP
        >>> len(r), r.x.shape[1]  # doctest: +SKIP
        (5000, 384)
    """
    from tqdm.auto import tqdm

    from featuretree.activations import Activations, is_store

    tree.node(node)  # an unknown id is a clear error
    d_model = next(iter(tree.saes.values())).d_model
    col = _Collector(tree, node, max_tokens)
    harvested: set[str] = set()
    store = acts
    if store is None and (p := store_path(tree)) is not None and (p / "meta.json").is_file():
        store = Activations(p)
    bar = tqdm(total=max_tokens, unit="tok", desc=f"region of {node}", disable=not progress)
    focused = {t for t in (focus or []) if isinstance(t, str) and t.strip()}
    loaded: dict[str, Any] = {}

    def wrapped():  # the model, loaded once and only when text must stream
        if "m" not in loaded:
            loaded["m"] = tree_model(tree, model)
        return loaded["m"]

    if focused:
        _stream(col, tree, sorted(focused), wrapped(), layer)
        bar.update(col.n)
        log.info("region of %s: %d tokens from %d focus texts", node, col.n, len(focused))
    if store is not None and is_store(store):
        doc_texts = store.texts()
        col.spell = col.spell or store.token_strings
        harvested = set(doc_texts.values())
        skip = np.array([d for d, t in doc_texts.items() if t in focused], dtype=np.int64)
        for cols in store.rows("all", ("acts", "token_ids", "doc_ids", "starts", "ends"), None):
            if col.n >= max_tokens:
                break
            tok = pd.DataFrame({"token_id": cols["token_ids"].numpy(), "doc_id": cols["doc_ids"].numpy(),
                                "start": cols["starts"].numpy(), "end": cols["ends"].numpy()})
            before = col.n
            col.add(cols["acts"].float(), tok, doc_texts, skip)
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
            from featuretree.activations import as_texts

            pool = as_texts(texts)
        elif acts is None:  # the run's corpus, minus the documents the store harvested
            from featuretree.corpus import corpus_texts

            with contextlib.suppress(FeatureTreeError, OSError, ValueError):
                pool = corpus_texts(tree.config.corpus)
    if pool is not None:
        order = [i for i in range(len(pool)) if pool[i].strip() and pool[i] not in harvested
                 and pool[i] not in focused]
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
        for s in range(0, len(order), chunk_docs):
            if col.n >= max_tokens or col.n_scanned >= budget:
                break
            before = col.n
            _stream(col, tree, [pool[i] for i in order[s:s + chunk_docs]], wrapped(), layer)
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


def _stream(col: _Collector, tree, chunk: list[str], model, layer: int | None) -> None:
    """Run `chunk` through `model` (loaded) and add the rows where the node fires to `col`."""
    from featuretree.harvest import collect

    max_length = tree.config.max_length if tree.config is not None else 128
    with quiet(), tempfile.TemporaryDirectory(prefix="featuretree-stream-") as tmp:
        part = collect(model, tree_layer(tree, layer), chunk, n_tokens=10**12, out=tmp,
                       progress=False, max_length=max_length, site=tree_site(tree))
        col.spell = col.spell or _vocab_of(part)
        col.add(part.load("all"), part.tokens("all"), part.texts())


def _vocab_of(store) -> Callable[[Any], list[str]]:
    import json

    vocab = json.loads((store.path / "vocab.json").read_text(encoding="utf-8"))
    return lambda ids: [vocab[int(i)] or "" for i in ids]


def local_split(region: Region):
    """(training rows, held-out mask or None) of a region: every tenth document is held out when there are
    >= 1000 tokens with text (else the local dictionary is evaluated on what it trained on).

    Parameters
    ----------
    region : Region
        The tokens where a node fires (`collect_region`); the rows are `region.x`, all of them.

    Example:
        >>> import torch
        >>> n = 1000
        >>> tok = pd.DataFrame({"token_id": 0, "doc_id": np.arange(n) % 20, "start": 0, "end": 1})
        >>> x, held = local_split(Region(torch.zeros(n, 4), tok, {0: "a"}, None))
        >>> x.shape[0], int(held.sum())
        (1000, 100)
    """
    held = (region.tokens["doc_id"].to_numpy() % 10 == 0) if region.has_text and len(region) >= 1000 else None
    if held is not None and (held.all() or not held.any()):
        held = None
    return region.x, held
