"""Activations: the on-disk store of one layer's token activations, and every way to stream it (or a Tensor).

A store is a directory of `shard_00000.safetensors`, ... (`acts` (n, d_model), `token_ids`, `doc_ids`,
`positions`, `starts`, `ends`), `docs.jsonl`, `vocab.json` and `meta.json` (written last by
featuretree.harvest.collect: a directory without it is unfinished). `batches` reads row chunks straight from
the memory-mapped shards in a random order across all of them into one bounded buffer; documents with
`doc_id % heldout_every == 0` form the held-out split. `iter_batches`, `n_rows` and `d_model_of` treat a
store and a plain Tensor [n, d_model] alike.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from featuretree.checkpoint import file_matches
from featuretree.config import FeatureTreeError

__all__ = ["Activations", "as_texts", "d_model_of", "is_store", "iter_batches", "n_rows", "SPLITS"]

log = logging.getLogger(__name__)

SPLITS = ("train", "heldout", "all")
_COLUMNS = ("token_ids", "doc_ids", "positions", "starts", "ends")


def as_texts(texts: Any) -> list[str]:
    """`texts` (a list of strings, or an object with a `.texts` list such as a Corpus) as a list of strings,
    or a clear error for a single string, an empty list or a non-string item.

    Example:
        >>> as_texts(["a cat", "a dog"])
        ['a cat', 'a dog']
    """
    texts = getattr(texts, "texts", texts)
    if isinstance(texts, (str, bytes)):
        raise FeatureTreeError("texts must be a list of strings, not a single string: wrap it as [text]")
    texts = list(texts)
    if not texts:
        raise FeatureTreeError("texts is empty: pass at least one non-empty text")
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise FeatureTreeError(f"texts[{bad}] is a {type(texts[bad]).__name__}, not a str")
    return texts


class Activations:
    """An on-disk activation store written by `collect`: open it with `Activations(path)`.

    Example:
        >>> acts = Activations(path)                        # doctest: +SKIP
        >>> for x in acts.batches(4096, epochs=2):          # doctest: +SKIP
        ...     ...                                         # x: (4096, d_model) float32
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.exists():
            raise FeatureTreeError(
                f"{self.path} has no meta.json: not a complete activation store; rerun collect"
            )
        self.meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
        self.d_model: int = int(self.meta["d_model"])
        self.n_tokens: int = int(self.meta["n_tokens"])
        self.heldout_every: int = int(self.meta["heldout_every"])
        self._shards = [self.path / name for name in self.meta["shards"]]
        missing = [p.name for p in self._shards if not p.exists()]
        if missing:
            raise FeatureTreeError(f"{self.path} is missing shards {missing[:3]}: rerun the same `featuretree build` "
                                   "(or collect(..., resume=True)) to recompute them")
        for info in self.meta.get("shard_info", []):  # sizes are cheap to check; checksums: verify()
            size = (self.path / info["name"]).stat().st_size
            if size != info["bytes"]:
                raise FeatureTreeError(
                    f"shard {self.path / info['name']} has {size} bytes, not the {info['bytes']} recorded: it is "
                    "truncated or damaged; rerun the same `featuretree build` (or collect(..., resume=True)) to "
                    "recompute it")
        self._vocab: list[str] | None = None

    def __len__(self) -> int:
        return self.n_tokens

    def verify(self) -> list[str]:
        """Names of the shards whose size or sha256 differs from the one recorded at harvest ([] if all good).

        Example:
            >>> acts.verify()                                 # doctest: +SKIP
            []
        """
        return [info["name"] for info in self.meta.get("shard_info", []) if not file_matches(self.path / info["name"], info)]

    def __repr__(self) -> str:
        return (
            f"Activations({str(self.path)!r}, n_tokens={self.n_tokens}, d_model={self.d_model}, "
            f"layer={self.meta.get('layer')}, model={self.meta.get('model')!r})"
        )

    def is_heldout(self, doc_ids: Any) -> torch.Tensor:
        """Bool mask: True where the doc is held out (`doc_id % heldout_every == 0`).

        Example:
            >>> acts.is_heldout(torch.tensor([0, 1, 10]))     # doctest: +SKIP
            tensor([ True, False,  True])
        """
        doc_ids = torch.as_tensor(doc_ids)
        if self.heldout_every == 0:
            return torch.zeros(doc_ids.shape, dtype=torch.bool)
        return doc_ids % self.heldout_every == 0

    def n_rows(self, split: str = "train") -> int:
        """Number of tokens in `split` ("train", "heldout" or "all"); reads only the doc-id columns.

        Example:
            >>> acts.n_rows("heldout") + acts.n_rows("train") == len(acts)   # doctest: +SKIP
            True
        """
        return sum(len(c["doc_ids"]) for c in self.rows(split, ("doc_ids",), None))

    def _split_mask(self, doc_ids: torch.Tensor, split: str) -> torch.Tensor | None:
        if split not in SPLITS:
            raise FeatureTreeError(f"split={split!r} is not one of {SPLITS}")
        if split == "all":
            return None
        held = self.is_heldout(doc_ids)
        return held if split == "heldout" else ~held

    @staticmethod
    def _read_file(shard: Path, names: Sequence[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        try:
            with safe_open(str(shard), framework="pt") as f:
                return {n: f.get_tensor(n) for n in names}
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise FeatureTreeError(f"{shard} is not a readable safetensors shard ({e}): it is truncated or corrupt; "
                                   "rerun the same `featuretree build` (or collect(..., resume=True)) to "
                                   "recompute it") from e

    def _read(self, shard: Path, names: Sequence[str]) -> dict[str, torch.Tensor]:
        return self._read_file(shard, names)

    def rows(
        self, split: str, names: Sequence[str], max_tokens: int | None
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Shard-by-shard columns of `split` in store order, stopping after `max_tokens` rows."""
        left = math.inf if max_tokens is None else int(max_tokens)
        for shard in self._shards:
            if left <= 0:
                return
            cols = self._read(shard, sorted(set(names) | {"doc_ids"}))
            if "acts" in cols:
                cols["acts"] = cols["acts"].float()  # a bf16 / fp16 store reads back as float32
            mask = self._split_mask(cols["doc_ids"], split)
            cols = {n: cols[n] if mask is None else cols[n][mask] for n in names}
            n = len(next(iter(cols.values())))
            if n > left:
                cols = {k: v[: int(left)] for k, v in cols.items()}
                n = int(left)
            left -= n
            yield cols

    def batches(
        self,
        batch_size: int,
        *,
        split: str = "train",
        shuffle: bool = True,
        seed: int = 0,
        epochs: int = 1,
        buffer_rows: int = 262_144,
        chunk_rows: int = 8192,
    ) -> Iterator[torch.Tensor]:
        """Stream (batch_size, d_model) float32 batches holding at most `buffer_rows` (+ a chunk) rows in memory.

        Each epoch cuts every shard into chunks of `chunk_rows` rows and visits the chunks of all shards in
        a fresh random order, reading each straight from the memory-mapped file (a safetensors slice: no
        shard, however large, has to fit in memory); chunks gather in one buffer of `buffer_rows` rows whose
        rows are yielded in a random permutation, so batches mix tokens from many shards. Only the last
        batch of an epoch may be smaller. `shuffle=False` yields rows in store order (that of `load(split)`).
        A bf16 / fp16 store is widened to float32 here.

        Example:
            >>> for x in acts.batches(4096, split="train", epochs=2):   # doctest: +SKIP
            ...     loss = sae(x)                                       # x: (<=4096, d_model)
        """
        if min(batch_size, buffer_rows, chunk_rows, epochs) <= 0:
            raise FeatureTreeError("batch_size, buffer_rows, chunk_rows and epochs must be positive integers")
        self._split_mask(torch.zeros(0, dtype=torch.long), split)  # validate split early
        sizes = self.meta["shard_sizes"]
        chunks = [(i, a) for i, n in enumerate(sizes) for a in range(0, n, chunk_rows)]
        buf = torch.empty(buffer_rows + chunk_rows + batch_size, self.d_model)  # reused by every fill
        for epoch in range(epochs):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = torch.randperm(len(chunks), generator=gen).tolist() if shuffle else range(len(chunks))
            n = 0  # rows in buf; rows a fill left over (< batch_size) stay at its front
            for c in order:
                i, a = chunks[c]
                rows = self._slice(i, a, a + chunk_rows, split)  # (<= chunk_rows, d_model)
                buf[n : n + len(rows)] = rows
                n += len(rows)
                if n >= buffer_rows:
                    yield from self._drain(buf, n, batch_size, gen if shuffle else None)
                    n = n % batch_size
            if n:
                yield from self._drain(buf, n, batch_size, gen if shuffle else None, last=True)

    @staticmethod
    def _drain(buf: torch.Tensor, n: int, batch_size: int, gen, last: bool = False) -> Iterator[torch.Tensor]:
        """Yield buf[:n] as batches (permuted with `gen`); the remainder (< batch_size) moves to buf's front."""
        idx = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
        n_full = n if last else n // batch_size * batch_size
        for s in range(0, n_full, batch_size):
            yield buf.index_select(0, idx[s : s + batch_size])  # a copy: buf is refilled afterwards
        if not last and n > n_full:
            buf[: n - n_full] = buf.index_select(0, idx[n_full:n])

    def _slice(self, i: int, a: int, b: int, split: str) -> torch.Tensor:
        """Rows [a, b) of shard i that belong to `split`, as float32, read through the file's memory map."""
        from safetensors import safe_open

        shard = self._shards[i]
        try:
            with safe_open(str(shard), framework="pt") as f:
                acts, doc_ids = f.get_slice("acts")[a:b], f.get_slice("doc_ids")[a:b]
        except Exception as e:  # safetensors' own error types for damaged files
            raise FeatureTreeError(f"{shard} is not a readable safetensors shard ({e}): rerun the same `featuretree "
                                   "build` (or collect(..., resume=True)) to recompute it") from e
        mask = self._split_mask(doc_ids, split)
        return (acts if mask is None else acts[mask]).float()

    def load(self, split: str = "heldout", max_tokens: int | None = None) -> torch.Tensor:
        """All activations of `split` in store order, as one (n, d_model) float32 tensor.

        Example:
            >>> x = acts.load("heldout", max_tokens=10_000)   # doctest: +SKIP
            >>> x.shape                                       # doctest: +SKIP
            torch.Size([10000, 384])
        """
        parts = [c["acts"] for c in self.rows(split, ("acts",), max_tokens)]
        return torch.cat(parts) if parts else torch.empty(0, self.d_model)  # (n, d_model)

    def tokens(self, split: str = "all", max_tokens: int | None = None):
        """Per-token metadata of `split` as a DataFrame; row i describes row i of `load(split)`.

        Columns: token_id, doc_id, position (index in the doc's tokenization), start, end (char offsets
        in the doc's text; -1 without a fast tokenizer).

        Example:
            >>> df = acts.tokens("heldout")                   # doctest: +SKIP
            >>> list(df.columns)                              # doctest: +SKIP
            ['token_id', 'doc_id', 'position', 'start', 'end']
        """
        import pandas as pd

        parts = list(self.rows(split, _COLUMNS, max_tokens))
        empty = torch.empty(0, dtype=torch.long)
        # "token_ids" -> "token_id", "positions" -> "position", ...
        return pd.DataFrame(
            {col[:-1]: (torch.cat([p[col] for p in parts]) if parts else empty).numpy() for col in _COLUMNS}
        )

    def texts(self) -> dict[int, str]:
        """doc_id -> text of every harvested document.

        Example:
            >>> acts.texts()[0]                               # doctest: +SKIP
            'a cat sat on the mat'
        """
        with open(self.path / "docs.jsonl", encoding="utf-8") as f:
            return {d["doc_id"]: d["text"] for d in map(json.loads, f)}

    def token_strings(self, ids: Any) -> list[str]:
        """Vocabulary strings of token ids (the tokenizer's `convert_ids_to_tokens`).

        Example:
            >>> acts.token_strings([1037, 4937])              # doctest: +SKIP
            ['a', 'cat']
        """
        if self._vocab is None:
            self._vocab = json.loads((self.path / "vocab.json").read_text(encoding="utf-8"))
        ids = torch.as_tensor(ids).reshape(-1).tolist()
        return [self._vocab[i] or "" for i in ids]


def is_store(acts) -> bool:
    """True for an Activations store (anything with `batches` and `d_model`), False for a Tensor.

    Parameters
    ----------
    acts : Activations or Tensor
        The object to test.

    Example:
        >>> is_store(torch.zeros(2, 3))
        False
    """
    return hasattr(acts, "batches") and hasattr(acts, "d_model")


def iter_batches(acts, batch_size: int, *, split: str = "train", epochs: int = 1, seed: int = 0,
                 shuffle: bool = True) -> Iterator[Tensor]:
    """Shuffled (b, d_model) float32 batches from an Activations store or a Tensor [n, d_model].

    A Tensor is used whole (`split` is ignored); a store yields its `split` part.

    Parameters
    ----------
    acts : Activations or Tensor [n, d_model]
        Where the rows come from.
    batch_size : int
        Rows per batch (the last batch of an epoch may be smaller).
    split : str
        "train", "heldout" or "all": the part of a store to read (ignored for a Tensor).
    epochs : int
        Passes over the rows.
    seed : int
        Seed of the shuffle order.
    shuffle : bool
        Shuffle the rows (False: store / row order).

    Example:
        >>> [b.shape[0] for b in iter_batches(torch.randn(10, 4), 4)]
        [4, 4, 2]
    """
    if is_store(acts):
        yield from acts.batches(batch_size, split=split, shuffle=shuffle, seed=seed, epochs=epochs)
        return
    x = torch.as_tensor(acts)
    if x.ndim != 2:
        raise FeatureTreeError(f"activations must be a 2-D tensor [n, d_model]; got shape {tuple(x.shape)}")
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=gen) if shuffle else torch.arange(x.shape[0])
        for i in range(0, x.shape[0], batch_size):
            yield x[order[i:i + batch_size]].float()


def n_rows(acts, split: str = "train") -> int:
    """Number of rows `iter_batches` yields per epoch.

    Parameters
    ----------
    acts : Activations or Tensor [n, d_model]
        A store or a Tensor (a Tensor counts all its rows).
    split : str
        "train", "heldout" or "all": the part of a store to count (ignored for a Tensor).

    Example:
        >>> n_rows(torch.zeros(7, 3))
        7
    """
    return acts.n_rows(split) if is_store(acts) else int(acts.shape[0])


def d_model_of(acts) -> int:
    """Width of the activation vectors.

    Parameters
    ----------
    acts : Activations or Tensor [n, d_model]
        A store (its `d_model`) or a Tensor (its second dimension).

    Example:
        >>> d_model_of(torch.zeros(7, 3))
        3
    """
    return int(acts.d_model) if is_store(acts) else int(acts.shape[1])
