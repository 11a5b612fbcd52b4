"""Activations: harvest one layer's token activations into safetensors shards, and stream them back.

`collect` runs the model (nnsight trace, stopped right after the layer) over length-bucketed batches
of a shuffled corpus, keeps real tokens only (no padding, no special tokens; [UNK] is kept) and writes
`shard_00000.safetensors`, ... (`acts` (n, d_model) float32, `token_ids`, `doc_ids`, `positions`,
`starts`, `ends`), `docs.jsonl`, `vocab.json` and, last, `meta.json`: a directory without meta.json
is an incomplete store. Documents with `doc_id % heldout_every == 0` are held out, so no document
is split between train and held-out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from featuretree.config import FeatureTreeError
from featuretree.utils import save_tensors, write_json, write_text

log = logging.getLogger(__name__)

SPLITS = ("train", "heldout", "all")
_COLUMNS = ("token_ids", "doc_ids", "positions", "starts", "ends")
_CHUNK_BATCHES = 16  # docs are length-sorted within chunks of this many batches


def _as_texts(texts: Any) -> list[str]:
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


def _shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class StoreMismatch(FeatureTreeError):
    """collect(resume=True) found a store harvested with other settings in its directory."""


def texts_fingerprint(texts: Sequence[str]) -> str:
    """sha256 of the texts in order (each followed by a NUL): which corpus a store or run was made from.

    Example:
        >>> texts_fingerprint(["a", "b"]) == texts_fingerprint(["a", "b"]) != texts_fingerprint(["ab"])
        True
    """
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x"; _ = p.write_bytes(b"abc")
        >>> file_sha256(p)[:12]
        'ba7816bf8f01'
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _shard_ok(out: Path, info: dict) -> bool:
    """Whether the shard file exists with the recorded size and checksum (a killed or damaged write fails)."""
    p = out / info["name"]
    try:
        return p.stat().st_size == info["bytes"] and file_sha256(p) == info["sha256"]
    except OSError:
        return False


def collect(
    model: Any,
    layer: int,
    texts: Any,
    n_tokens: int = 300_000,
    out: str | os.PathLike | None = None,
    *,
    batch_size: int = 64,
    max_length: int = 128,
    shard_size: int = 65536,
    heldout_every: int = 10,
    seed: int = 0,
    dtype: str = "float32",
    resume: bool = False,
    progress: bool = True,
) -> Activations:
    """Harvest the output of block `layer` for up to `n_tokens` real tokens of `texts` into store `out`.

    `model` is what `load_model` returns (anything `load_model` accepts is loaded first); `texts` is a
    list of strings or an object with a `.texts` list. Doc order is shuffled with `seed`, so a partial
    harvest samples the whole corpus; `out=None` writes to a fresh temp dir. A shard is written (atomically,
    with its size and sha256 recorded in `progress.json`) once `shard_size` rows have gathered, at a batch
    boundary. `resume=True` continues a store at `out` that was killed mid-harvest, or checks a finished
    one, and recomputes any shard that is missing, truncated or fails its checksum: the result is the same
    store, bit for bit, as one harvest never interrupted. A store made with other settings (model, layer,
    texts, n_tokens, batch_size, max_length, shard_size, heldout_every, seed) is then an error; without
    `resume` an existing store at `out` is overwritten. `dtype="bfloat16"` (or "float16") stores activations
    at half the disk and read bandwidth; they are widened to float32 when read.

    Example:
        >>> from featuretree.model import load_model
        >>> acts = collect(load_model(), 3, ["A cat sat on the mat.", "Dogs bark."], progress=False)
        >>> acts.d_model, len(acts)
        (384, 10)
    """
    import nnsight
    from tqdm.auto import tqdm

    from featuretree import __version__
    from featuretree.model import (
        check_layer,
        find_layers,
        get_tokenizer,
        layer_module,
        load_model,
        model_name,
    )

    if not isinstance(model, nnsight.NNsight):
        model = load_model(model)
    texts = _as_texts(texts)
    for name, value in (
        ("n_tokens", n_tokens),
        ("batch_size", batch_size),
        ("max_length", max_length),
        ("shard_size", shard_size),
    ):
        if int(value) <= 0:
            raise FeatureTreeError(f"{name}={value} must be a positive integer")
    if heldout_every < 0:
        raise FeatureTreeError(f"heldout_every={heldout_every} must be >= 0 (0 holds nothing out)")
    if dtype not in STORE_DTYPES:
        raise FeatureTreeError(f"dtype={dtype!r} is not a store dtype: use one of {sorted(STORE_DTYPES)}")
    layer_index = check_layer(model, layer)
    harvest = _Harvest(model, layer_module(model, layer_index), get_tokenizer(model), texts, batch_size, max_length,
                       seed, STORE_DTYPES[dtype])
    recipe = {"model": model_name(model), "layer": layer_index, "texts": texts_fingerprint(texts),
              "n_tokens": int(n_tokens), "batch_size": int(batch_size), "max_length": int(max_length),
              "shard_size": int(shard_size), "heldout_every": int(heldout_every), "seed": int(seed)}
    if dtype != "float32":  # (stores from before the option are float32 and their recipes lack the key)
        recipe["dtype"] = dtype

    out = Path(tempfile.mkdtemp(prefix="featuretree-acts-")) if out is None else Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob(".*.tmp"):  # a write a kill cut short: never read, cleared here
        tmp.unlink(missing_ok=True)
    state = _saved_state(out, recipe) if resume else None
    if state is None:
        _clear_store(out)
        state = {"shards": [], "next_batch": 0, "n_done": 0, "done": False}
    repaired = False
    for i, info in enumerate(state["shards"]):  # a shard a kill or a disk fault damaged is recomputed
        if not _shard_ok(out, info):
            log.warning("shard %s is missing, truncated or corrupt: recomputing it", info["name"])
            rows = harvest.rows_of(*info["batches"], limit=info["rows"])
            state["shards"][i] = _write_shard(out, info["name"], rows, info["batches"])
            repaired = True
    if state["done"]:
        if repaired:  # the same bytes in principle; record what is on disk in any case
            meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
            meta.update(shard_info=state["shards"], shard_sizes=[info["rows"] for info in state["shards"]])
            write_json(out / "meta.json", meta)
        log.info("the store at %s is complete and every shard checks out", out)
        return Activations(out)
    if state["shards"]:
        log.info("resuming the harvest in %s at batch %d (%d tokens already in %d shards)", out,
                 state["next_batch"], state["n_done"], len(state["shards"]))

    pending: list[dict[str, torch.Tensor]] = []  # rows of the batches since the last shard
    n_pending = 0

    def flush(upto_batch: int) -> None:  # one shard of the pending rows, then the checkpoint that records it
        nonlocal pending, n_pending
        rows = {k: torch.cat([p[k] for p in pending]) for k in pending[0]}
        info = _write_shard(out, _shard_name(len(state["shards"])), rows, [state["next_batch"], upto_batch])
        state["shards"].append(info)
        state["next_batch"] = upto_batch
        write_json(out / PROGRESS_FILE, {"recipe": recipe, **{k: state[k] for k in ("shards", "next_batch", "n_done")}})
        pending, n_pending = [], 0

    bar = tqdm(total=n_tokens, initial=state["n_done"], unit="tok", desc=f"harvest layer {layer_index}",
               disable=not progress)
    with bar:
        last = state["next_batch"] - 1
        for last, rows in harvest.batches(start=state["next_batch"]):
            rows = _first(rows, n_tokens - state["n_done"])
            pending.append(rows)
            n_pending += len(rows["acts"])
            state["n_done"] += len(rows["acts"])
            bar.update(len(rows["acts"]))
            if n_pending >= shard_size or state["n_done"] >= n_tokens:
                flush(last + 1)
            if state["n_done"] >= n_tokens:
                break
        if n_pending:
            flush(last + 1)
    n_done = state["n_done"]
    if n_done == 0:
        raise FeatureTreeError("the texts yielded no tokens besides special tokens: pass non-empty texts")
    if n_done < n_tokens:
        log.warning("the corpus has only %d real tokens (asked for %d): collected them all", n_done, n_tokens)

    harvested_docs: list[int] = []
    for info in state["shards"]:  # every doc lies in one batch, so first appearance = harvest order
        doc_ids = Activations._read_file(out / info["name"], ("doc_ids",))["doc_ids"]
        harvested_docs.extend(torch.unique_consecutive(doc_ids).tolist())
    write_text(
        out / "docs.jsonl",
        "".join(
            json.dumps({"doc_id": i, "text": texts[i]}, ensure_ascii=False) + "\n" for i in harvested_docs
        ),
    )
    write_json(out / "vocab.json", harvest.tokenizer.convert_ids_to_tokens(list(range(len(harvest.tokenizer)))))
    meta = {
        "d_model": _d_model_of(out / state["shards"][0]["name"]),
        "n_tokens": n_done,
        "n_shards": len(state["shards"]),
        "shard_sizes": [info["rows"] for info in state["shards"]],
        "shards": [info["name"] for info in state["shards"]],
        "shard_info": state["shards"],
        "n_docs": len(harvested_docs),
        "model": recipe["model"],
        "layer": layer_index,
        "hook_name": f"{find_layers(model)[0]}.{layer_index}",  # the block whose output was harvested
        "heldout_every": heldout_every,
        "max_length": max_length,
        "dtype": dtype,
        "seed": seed,
        "recipe": recipe,
        "created_by": f"featuretree {__version__}",
    }
    write_json(out / "meta.json", meta)  # last: its presence marks a complete store
    (out / PROGRESS_FILE).unlink(missing_ok=True)
    log.info(
        "collected %d tokens of %d docs at layer %d into %s", n_done, len(harvested_docs), layer_index, out
    )
    return Activations(out)


PROGRESS_FILE = "progress.json"  # an unfinished harvest: its recipe, finished shards and the next batch


def _saved_state(out: Path, recipe: dict) -> dict | None:
    """What is already harvested in `out` for `recipe`: a finished store or a killed harvest's progress."""
    for name, done in (("meta.json", True), (PROGRESS_FILE, False)):
        p = out / name
        if not p.is_file():
            continue
        try:
            saved = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            log.warning("%s is unreadable: harvesting %s from the start", p, out)
            return None
        old = saved.get("recipe")
        if old is None:  # a store from before recipes were recorded: it cannot be checked, so redo it
            return None
        if old != recipe:
            diff = ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in recipe.items() if old.get(k) != v)
            raise StoreMismatch(
                f"the activation store in {out} was harvested with other settings ({diff}): resume only "
                "continues the same harvest; choose another directory or collect without resume to overwrite it")
        shards = saved["shard_info"] if done else saved["shards"]
        n_done = saved["n_tokens"] if done else saved["n_done"]
        return {"shards": list(shards), "next_batch": shards[-1]["batches"][1] if shards else 0,
                "n_done": int(n_done), "done": done}
    return None


def _write_shard(out: Path, name: str, rows: dict[str, torch.Tensor], batches: list[int]) -> dict:
    """Write one shard atomically and return its record: name, rows, bytes, sha256, batch range [b0, b1)."""
    save_tensors(out / name, rows)
    p = out / name
    return {"name": name, "rows": int(len(rows["acts"])), "bytes": p.stat().st_size, "sha256": file_sha256(p),
            "batches": [int(batches[0]), int(batches[1])]}


def _d_model_of(shard: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(shard), framework="pt") as f:
        return int(f.get_slice("acts").get_shape()[1])


def _first(rows: dict[str, torch.Tensor], limit: int) -> dict[str, torch.Tensor]:
    return rows if len(rows["acts"]) <= limit else {k: v[:limit] for k, v in rows.items()}


class _Harvest:
    """The model side of `collect`: doc batches in a fixed order, and the real-token rows of any of them."""

    def __init__(self, model, block, tokenizer, texts: list[str], batch_size: int, max_length: int, seed: int,
                 dtype: torch.dtype = torch.float32):
        self.model, self.block, self.tokenizer, self.texts = model, block, tokenizer, texts
        self.max_length, self.dtype = max_length, dtype
        self.special_ids = torch.tensor(_special_ids(tokenizer), dtype=torch.long)
        self.fast = bool(getattr(tokenizer, "is_fast", False))
        from featuretree.model import is_remote

        self.remote = is_remote(model)  # then the weights live on NDIF; inputs go as CPU tensors
        self.device = torch.device("cpu") if self.remote else next(model._module.parameters(), torch.zeros(0)).device
        self.accepted = _forward_args(model._module)
        self.docs = list(_doc_batches(texts, batch_size, seed))
        self.n_batches = len(self.docs)

    def rows(self, b: int) -> dict[str, torch.Tensor]:
        """Store columns of the real tokens of batch `b` (no padding, no special tokens)."""
        batch_docs = self.docs[b]
        enc = self.tokenizer(
            [self.texts[i] for i in batch_docs],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
            return_special_tokens_mask=True,
            return_offsets_mapping=self.fast,
            padding_side="right",
        )
        inputs = {k: v.to(self.device) for k, v in enc.items() if k in self.accepted}
        with torch.inference_mode():  # the same trace runs locally, or on NDIF for a remote model
            with self.model.trace(**inputs, **({"remote": True} if self.remote else {})) as tracer:
                hidden = self.block.output.save()
                tracer.stop()  # later blocks never run
        hidden = hidden[0] if isinstance(hidden, (tuple, list)) else hidden
        rows = _real_rows(enc, hidden, batch_docs, self.special_ids)
        if not torch.isfinite(rows["acts"]).all():
            raise FeatureTreeError(
                "the layer produced NaN/Inf activations: check the model's dtype (load it in float32) and weights"
            )
        rows["acts"] = rows["acts"].to(self.dtype)
        return rows

    def batches(self, start: int = 0) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        for b in range(start, self.n_batches):
            yield b, self.rows(b)

    def rows_of(self, b0: int, b1: int, limit: int) -> dict[str, torch.Tensor]:
        """The rows of batches [b0, b1), the first `limit` of them (a shard recomputed)."""
        parts = [self.rows(b) for b in range(b0, b1)]
        return _first({k: torch.cat([p[k] for p in parts]) for k in parts[0]}, limit)


def _doc_batches(texts: list[str], batch_size: int, seed: int) -> Iterator[list[int]]:
    """Doc ids in batches: shuffled corpus order, sorted by length within chunks of a few batches.

    Length-bucketed batches carry far less padding (nearly 2x harvest speed, FINDINGS.md), while the
    shuffle keeps a partial harvest a sample of the whole corpus.
    """
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    chunk = batch_size * _CHUNK_BATCHES
    for c in range(0, len(order), chunk):
        docs = sorted(order[c : c + chunk], key=lambda i: len(texts[i]))
        for b in range(0, len(docs), batch_size):
            yield docs[b : b + batch_size]


def _real_rows(
    enc: Any, hidden: torch.Tensor, batch_docs: list[int], special_ids: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The real tokens of a padded batch (no padding, no special tokens) as store columns."""
    mask = enc["attention_mask"].bool() & ~enc["special_tokens_mask"].bool()
    mask &= ~torch.isin(enc["input_ids"], special_ids)  # (b, seq)
    rows, cols = mask.nonzero(as_tuple=True)  # row-major: doc by doc, each in token order
    if "offset_mapping" in enc:
        offsets = enc["offset_mapping"][rows, cols].long()  # (n, 2)
        starts, ends = offsets[:, 0], offsets[:, 1]
    else:
        starts = ends = torch.full((len(rows),), -1, dtype=torch.long)
    return {
        "acts": hidden[rows.to(hidden.device), cols.to(hidden.device)].to(
            "cpu", torch.float32
        ),  # (n, d_model)
        "token_ids": enc["input_ids"][rows, cols].long(),
        "doc_ids": torch.tensor(batch_docs, dtype=torch.long)[rows],
        # index into the doc's own tokenization, whatever the padding side
        "positions": (enc["attention_mask"].cumsum(1) - 1)[rows, cols].long(),
        "starts": starts,
        "ends": ends,
    }


def _special_ids(tokenizer: Any) -> list[int]:
    """Ids dropped from the harvest: every special token except [UNK], which stands for real text."""
    ids = set(tokenizer.all_special_ids)
    unk = getattr(tokenizer, "unk_token_id", None)
    roles = ("bos_token_id", "eos_token_id", "pad_token_id", "cls_token_id", "sep_token_id", "mask_token_id")
    if unk is not None and unk not in {getattr(tokenizer, r, None) for r in roles}:
        ids.discard(unk)  # GPT-2's unk is its eos, which stays dropped
    return sorted(ids)


def _forward_args(module: torch.nn.Module) -> set[str]:
    """Tokenizer outputs the model's forward takes (GPT-2 takes no token_type_ids from some tokenizers)."""
    import inspect

    params = inspect.signature(module.forward).parameters
    wanted = {"input_ids", "attention_mask", "token_type_ids"}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return wanted
    return wanted & set(params)


def _clear_store(out: Path) -> None:
    """Remove a previous store's files (meta.json first, so the dir reads as incomplete meanwhile)."""
    meta = out / "meta.json"
    if meta.exists():
        log.info("overwriting the activation store in %s", out)
        meta.unlink()
    for p in out.glob("shard_*.safetensors"):
        p.unlink()
    for name in ("docs.jsonl", "vocab.json", PROGRESS_FILE):
        if (out / name).exists():
            (out / name).unlink()


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
        return [info["name"] for info in self.meta.get("shard_info", []) if not _shard_ok(self.path, info)]

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
        return sum(len(c["doc_ids"]) for c in self._rows(split, ("doc_ids",), None))

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

    def _rows(
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
        parts = [c["acts"] for c in self._rows(split, ("acts",), max_tokens)]
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

        parts = list(self._rows(split, _COLUMNS, max_tokens))
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
