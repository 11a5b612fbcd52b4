"""collect: harvest one layer's (or several layers') token activations through nnsight into activation stores.

The model runs (nnsight trace, stopped right after the layer) over length-bucketed batches of a shuffled
corpus; only real tokens are kept (no padding, no special tokens; [UNK] is kept). Rows are written as
`shard_00000.safetensors`, ... (`acts` (n, d_model), `token_ids`, `doc_ids`, `positions`, `starts`, `ends`)
at batch boundaries, each recorded with its size and sha256 in `progress.json` (featuretree.checkpoint),
then `docs.jsonl`, `vocab.json` and, last, `meta.json`: a directory without meta.json is an unfinished
harvest that `collect(resume=True)` continues. Documents with `doc_id % heldout_every == 0` are held out,
so no document is split between train and held-out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from featuretree.activations import Activations, as_texts
from featuretree.checkpoint import Checkpoint, SettingsMismatch, differences, file_matches, file_record
from featuretree.config import FeatureTreeError
from featuretree.utils import save_tensors, write_json, write_text

__all__ = ["PROGRESS_FILE", "STORE_DTYPES", "StoreMismatch", "collect", "collect_layers", "doc_batches", "forward_args", "special_ids",
           "texts_fingerprint", "write_shard"]

log = logging.getLogger(__name__)


_CHUNK_BATCHES = 16  # docs are length-sorted within chunks of this many batches


def _shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


StoreMismatch = SettingsMismatch
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
    site: str = "",
) -> Activations:
    """Harvest the output of block `layer` (or of its submodule `site`, e.g. "mlp") for up to `n_tokens` real
    tokens of `texts` into store `out`.

    `model` is what `load_model` returns (anything `load_model` accepts is loaded first); `texts` is a
    list of strings or an object with a `.texts` list. Doc order is shuffled with `seed`, so a partial
    harvest samples the whole corpus; `out=None` writes to a fresh temp dir. A shard is written (atomically,
    with its size and sha256 recorded in `progress.json`) once `shard_size` rows have gathered, at a batch
    boundary. `resume=True` continues a store at `out` that was killed mid-harvest, or checks a finished
    one, and recomputes any shard that is missing, truncated or fails its checksum: the result is the same
    store, bit for bit, as one harvest never interrupted. A store made with other settings (model, layer,
    texts, n_tokens, batch_size, max_length, shard_size, heldout_every, seed) is then an error; without
    `resume` an existing store at `out` is overwritten. `dtype="bfloat16"` (or "float16") stores activations
    at half the disk and read bandwidth; they are widened to float32 when read. `collect_layers` harvests
    several layers in one pass.

    Example:
        >>> from featuretree.model import load_model
        >>> acts = collect(load_model(), 3, ["A cat sat on the mat.", "Dogs bark."], progress=False)
        >>> acts.d_model, len(acts)
        (384, 10)
    """
    outs = {layer: Path(tempfile.mkdtemp(prefix="featuretree-acts-")) if out is None else Path(out)}
    return next(iter(collect_layers(model, [layer], texts, n_tokens, outs, batch_size=batch_size,
                                    max_length=max_length, shard_size=shard_size, heldout_every=heldout_every,
                                    seed=seed, dtype=dtype, resume=resume, progress=progress, site=site).values()))


def collect_layers(
    model: Any,
    layers: Sequence[int],
    texts: Any,
    n_tokens: int = 300_000,
    outs: dict | None = None,
    *,
    batch_size: int = 64,
    max_length: int = 128,
    shard_size: int = 65536,
    heldout_every: int = 10,
    seed: int = 0,
    dtype: str = "float32",
    resume: bool = False,
    progress: bool = True,
    site: str = "",
) -> dict[int, Activations]:
    """`collect` for several layers in ONE forward pass per batch: one store per layer, each the same, bit for
    bit, as `collect` at that layer alone would write (same documents, tokens and recipe).

    Parameters
    ----------
    model, texts, n_tokens, batch_size, max_length, shard_size, heldout_every, seed, dtype, resume, progress :
        As for `collect`.
    layers : sequence of int
        Distinct block indices (negative from the end); the pass stops after the deepest.
    site : str
        A submodule of each block to harvest instead of the block's output ("mlp", "self_attn"; "" the block).
    outs : dict, optional
        {layer: store directory} (default: fresh temp directories).

    Each store resumes on its own (a kill between two stores' shards costs only the batches since the
    lagging one's last shard). Returns {layer (as given): Activations}.

    Example:
        >>> from featuretree.model import load_model
        >>> stores = collect_layers(load_model(), [1, 4], ["A cat sat.", "Dogs bark."], progress=False)
        >>> [len(s) for s in stores.values()], stores[1].meta["layer"], stores[4].meta["layer"]
        ([7, 7], 1, 4)
    """
    import nnsight
    from tqdm.auto import tqdm

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
    texts = as_texts(texts)
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
    layers = list(layers)
    index = {layer: check_layer(model, layer) for layer in layers}
    if not layers or len(set(index.values())) != len(layers):
        raise FeatureTreeError(f"layers={layers} must name distinct blocks (got {sorted(index.values())})")
    order = sorted(layers, key=index.__getitem__)  # blocks in execution order: nnsight reads them in that order
    outs = {layer: Path(outs[layer]) if outs and layer in outs else Path(tempfile.mkdtemp(prefix="featuretree-acts-"))
            for layer in order}
    harvest = _Harvest(model, [layer_module(model, index[la], site) for la in order], get_tokenizer(model), texts,
                       batch_size, max_length, seed, STORE_DTYPES[dtype],
                       post=[_post(model, index[la], site) for la in order])
    writers = []
    for k, layer in enumerate(order):
        recipe = {"model": model_name(model), "layer": index[layer], "texts": texts_fingerprint(texts),
                  "n_tokens": int(n_tokens), "batch_size": int(batch_size), "max_length": int(max_length),
                  "shard_size": int(shard_size), "heldout_every": int(heldout_every), "seed": int(seed)}
        if dtype != "float32":  # (stores from before the option are float32 and their recipes lack the key)
            recipe["dtype"] = dtype
        if site:  # likewise: a block's output has no site
            recipe["site"] = site
        writers.append(_StoreWriter(outs[layer], recipe, harvest, k, int(n_tokens), int(shard_size), resume))
    todo = [w for w in writers if not w.done]
    if todo:
        start = min(w.state["next_batch"] for w in todo)
        done0 = min(w.state["n_done"] for w in todo)
        names = ", ".join(str(index[la]) for la in order)
        bar = tqdm(total=n_tokens, initial=done0, unit="tok", desc=f"harvest layer{'s' if len(order) > 1 else ''} "
                   f"{names}", disable=not progress)
        with bar:
            last = start - 1
            for last, rows in harvest.batches(start=start):
                before = min(w.state["n_done"] for w in todo)
                for w in todo:
                    w.add(last, rows[w.which])
                bar.update(min(w.state["n_done"] for w in todo) - before)
                if all(w.full for w in todo):
                    break
            for w in todo:
                w.close(last + 1)
        for w in todo:
            if w.state["n_done"] == 0:
                raise FeatureTreeError("the texts yielded no tokens besides special tokens: pass non-empty texts")
        if todo[0].state["n_done"] < n_tokens:
            log.warning("the corpus has only %d real tokens (asked for %d): collected them all",
                        todo[0].state["n_done"], n_tokens)
    result = {}
    for layer, w in zip(order, writers):
        if not w.done:
            hook = f"{find_layers(model)[0]}.{index[layer]}" + (f".{site}" if site else "")
            docs = _finish_store(w.out, w.state, harvest, texts, w.recipe, hook,
                                 heldout_every=heldout_every, max_length=max_length, dtype=dtype, seed=seed)
            log.info("collected %d tokens of %d docs at layer %d into %s", w.state["n_done"], len(docs), index[layer],
                     w.out)
        result[layer] = Activations(w.out)
    return {layer: result[layer] for layer in layers}


class _StoreWriter:
    """One store of a harvest: its recipe and resume state, the rows pending since its last shard, its shards."""

    def __init__(self, out: Path, recipe: dict, harvest: _Harvest, which: int, n_tokens: int, shard_size: int,
                 resume: bool) -> None:
        self.out, self.recipe, self.harvest, self.which = out, recipe, harvest, which
        self.n_tokens, self.shard_size = n_tokens, shard_size
        out.mkdir(parents=True, exist_ok=True)
        for tmp in out.glob(".*.tmp"):  # a write a kill cut short: never read, cleared here
            tmp.unlink(missing_ok=True)
        self.saved = Checkpoint(out / PROGRESS_FILE, recipe, "an unfinished harvest", "resume only continues the "
                                "same harvest; choose another directory or collect without resume to overwrite it",
                                where=out)
        state = _saved_state(out, self.saved) if resume else None
        if state is None:
            _clear_store(out)
            state = {"shards": [], "next_batch": 0, "n_done": 0, "done": False}
        self.state = state
        repaired = False
        for i, info in enumerate(state["shards"]):  # a shard a kill or a disk fault damaged is recomputed
            if not file_matches(out / info["name"], info):
                log.warning("shard %s is missing, truncated or corrupt: recomputing it", info["name"])
                rows = harvest.rows_of(*info["batches"], limit=info["rows"], which=which)
                state["shards"][i] = write_shard(out, info["name"], rows, info["batches"])
                repaired = True
        self.done = bool(state["done"])
        if self.done:
            if repaired:  # the same bytes in principle; record what is on disk in any case
                meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
                meta.update(shard_info=state["shards"], shard_sizes=[info["rows"] for info in state["shards"]])
                write_json(out / "meta.json", meta)
            log.info("the store at %s is complete and every shard checks out", out)
        elif state["shards"]:
            log.info("resuming the harvest in %s at batch %d (%d tokens already in %d shards)", out,
                     state["next_batch"], state["n_done"], len(state["shards"]))
        self.pending: list[dict[str, torch.Tensor]] = []
        self.n_pending = 0

    @property
    def full(self) -> bool:
        return self.state["n_done"] >= self.n_tokens

    def add(self, b: int, rows: dict[str, torch.Tensor]) -> None:
        """Batch `b`'s rows (skipped when this store already holds the batch or is full)."""
        if b < self.state["next_batch"] or self.full:
            return
        rows = _first(rows, self.n_tokens - self.state["n_done"])
        self.pending.append(rows)
        self.n_pending += len(rows["acts"])
        self.state["n_done"] += len(rows["acts"])
        if self.n_pending >= self.shard_size or self.full:
            self.flush(b + 1)

    def flush(self, upto_batch: int) -> None:
        """One shard of the pending rows, then the checkpoint that records it."""
        rows = {k: torch.cat([p[k] for p in self.pending]) for k in self.pending[0]}
        info = write_shard(self.out, _shard_name(len(self.state["shards"])), rows,
                           [self.state["next_batch"], upto_batch])
        self.state["shards"].append(info)
        self.state["next_batch"] = upto_batch
        self.saved.save({k: self.state[k] for k in ("shards", "next_batch", "n_done")})
        self.pending, self.n_pending = [], 0

    def close(self, upto_batch: int) -> None:
        if self.n_pending:
            self.flush(upto_batch)


def _version() -> str:
    """featuretree's version from the package metadata (a module must not import its own package)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("featuretree")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _finish_store(out: Path, state: dict, harvest: _Harvest, texts: list[str], recipe: dict, hook_name: str, *,
                  heldout_every: int, max_length: int, dtype: str, seed: int) -> list[int]:
    """Write docs.jsonl, vocab.json and, last, meta.json (its presence marks a complete store); the doc ids
    harvested, in harvest order."""
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
        "n_tokens": state["n_done"],
        "n_shards": len(state["shards"]),
        "shard_sizes": [info["rows"] for info in state["shards"]],
        "shards": [info["name"] for info in state["shards"]],
        "shard_info": state["shards"],
        "n_docs": len(harvested_docs),
        "model": recipe["model"],
        "layer": recipe["layer"],
        "hook_name": hook_name,  # the module whose output was harvested (a block, or a site inside it)
        **({"site": recipe["site"]} if recipe.get("site") else {}),
        "heldout_every": heldout_every,
        "max_length": max_length,
        "dtype": dtype,
        "seed": seed,
        "recipe": recipe,
        "created_by": f"featuretree {_version()}",
    }
    write_json(out / "meta.json", meta)  # last: its presence marks a complete store
    (out / PROGRESS_FILE).unlink(missing_ok=True)
    return harvested_docs


PROGRESS_FILE = "progress.json"  # an unfinished harvest: its recipe, finished shards and the next batch


def _saved_state(out: Path, progress: Checkpoint) -> dict | None:
    """What is already harvested in `out` for `progress`'s recipe: a finished store (meta.json holds its recipe)
    or a killed harvest's checkpoint; None to harvest from the start."""
    meta = out / "meta.json"
    if meta.is_file():
        try:
            saved = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            log.warning("%s is unreadable: harvesting %s from the start", meta, out)
            return None
        if saved.get("recipe") is None:  # a store from before recipes were recorded: it cannot be checked
            return None
        if saved["recipe"] != progress.settings:
            raise SettingsMismatch(
                f"the activation store in {out} was harvested with other settings "
                f"({', '.join(differences(saved['recipe'], progress.settings))}): {progress.how_to_reset}")
        shards, n_done, done = saved["shard_info"], saved["n_tokens"], True
    else:
        try:
            loaded = progress.load()
        except SettingsMismatch:
            raise
        except FeatureTreeError as e:
            log.warning("%s: harvesting %s from the start", e, out)
            return None
        if loaded is None:
            return None
        shards, n_done, done = loaded[1]["shards"], loaded[1]["n_done"], False
    return {"shards": list(shards), "next_batch": shards[-1]["batches"][1] if shards else 0,
            "n_done": int(n_done), "done": done}


def write_shard(out: Path, name: str, rows: dict[str, torch.Tensor], batches: list[int]) -> dict:
    """Write one shard atomically and return its record: name, rows, bytes, sha256, batch range [b0, b1).

    Parameters
    ----------
    out : Path
        The store directory.
    name : str
        The shard's file name inside `out`.
    rows : dict of str to Tensor
        The shard's columns; "acts" (one row per token) gives the row count.
    batches : list of int
        [b0, b1): the harvest batches the shard holds.

    Example:
        >>> import tempfile
        >>> write_shard(Path(tempfile.mkdtemp()), "s.safetensors", {"acts": torch.zeros(2, 3)}, [0, 1])["rows"]
        2
    """
    save_tensors(out / name, rows)
    p = out / name
    return {"name": name, "rows": int(len(rows["acts"])), **file_record(p), "batches": [int(batches[0]), int(batches[1])]}


def _d_model_of(shard: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(shard), framework="pt") as f:
        return int(f.get_slice("acts").get_shape()[1])


def _first(rows: dict[str, torch.Tensor], limit: int) -> dict[str, torch.Tensor]:
    return rows if len(rows["acts"]) <= limit else {k: v[:limit] for k, v in rows.items()}


class _Harvest:
    """The model side of `collect`: doc batches in a fixed order, and the real-token rows of any of them."""

    def __init__(self, model, blocks: list, tokenizer, texts: list[str], batch_size: int, max_length: int, seed: int,
                 dtype: torch.dtype = torch.float32, post: list | None = None):
        self.model, self.blocks, self.tokenizer, self.texts = model, list(blocks), tokenizer, texts
        self.post = list(post) if post is not None else [None] * len(self.blocks)  # per block: output -> stored rows
        self.max_length, self.dtype = max_length, dtype
        self.special_ids = torch.tensor(special_ids(tokenizer), dtype=torch.long)
        self.fast = bool(getattr(tokenizer, "is_fast", False))
        from featuretree.model import is_remote

        self.remote = is_remote(model)  # then the weights live on NDIF; inputs go as CPU tensors
        self.device = torch.device("cpu") if self.remote else next(model._module.parameters(), torch.zeros(0)).device
        self.accepted = forward_args(model._module)
        self.docs = list(doc_batches(texts, batch_size, seed))
        self.n_batches = len(self.docs)

    def rows(self, b: int) -> list[dict[str, torch.Tensor]]:
        """Store columns of the real tokens of batch `b` (no padding, no special tokens), one dict per block."""
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
            saved: list = []  # nnsight runs the traced body in its own frame: a list outside carries the outputs
            with self.model.trace(**inputs, **({"remote": True} if self.remote else {})) as tracer:
                for block in self.blocks:  # in execution order
                    saved.append(block.output.save())
                tracer.stop()  # later blocks never run
        out = []
        for hidden, post in zip(saved, self.post):
            hidden = hidden[0] if isinstance(hidden, (tuple, list)) else hidden
            if post is not None:
                hidden = post(hidden)
            rows = _real_rows(enc, hidden, batch_docs, self.special_ids)
            if not torch.isfinite(rows["acts"]).all():
                raise FeatureTreeError(
                    "the layer produced NaN/Inf activations: check the model's dtype (load it in float32) and weights"
                )
            rows["acts"] = rows["acts"].to(self.dtype)
            out.append(rows)
        return out

    def batches(self, start: int = 0) -> Iterator[tuple[int, list[dict[str, torch.Tensor]]]]:
        for b in range(start, self.n_batches):
            yield b, self.rows(b)

    def rows_of(self, b0: int, b1: int, limit: int, which: int = 0) -> dict[str, torch.Tensor]:
        """Block `which`'s rows of batches [b0, b1), the first `limit` of them (a shard recomputed)."""
        parts = [self.rows(b)[which] for b in range(b0, b1)]
        return _first({k: torch.cat([p[k] for p in parts]) for k in parts[0]}, limit)


def _post(model, layer: int, site: str):
    """What turns a site's output into stored rows: None, or for a ":normalized" site the norm's gain taken out."""
    from featuretree.model import NORMALIZED, normalized, site_module

    if not site.endswith(NORMALIZED):
        return None
    module = site_module(model, layer, site)
    return lambda y: normalized(module, y)


def doc_batches(texts: list[str], batch_size: int, seed: int) -> Iterator[list[int]]:
    """Doc ids in batches: shuffled corpus order, sorted by length within chunks of a few batches.

    Length-bucketed batches carry far less padding (nearly 2x harvest speed, FINDINGS.md), while the
    shuffle keeps a partial harvest a sample of the whole corpus.

    Parameters
    ----------
    texts : list of str
        The corpus; a doc id is a position in it.
    batch_size : int
        Documents per batch (the last batch of a chunk may be smaller).
    seed : int
        Seed of the shuffle.

    Example:
        >>> texts = ["aaa", "b", "cc", "dddd", "e"]
        >>> [[len(texts[i]) for i in b] for b in doc_batches(texts, 2, seed=0)]
        [[1, 1], [2, 3], [4]]
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


def special_ids(tokenizer: Any) -> list[int]:
    """Ids dropped from the harvest (and kept clean by featuretree.faithful): every special token, the added
    special tokens outside `all_special_ids` too (SmolLM2's <file_sep>, <jupyter_code>, ...), except an unknown
    token that stands for real text.

    The unknown token is real text when the tokenizer writes it for characters it cannot spell (BERT's [UNK]
    for a rare symbol); a byte-level BPE never does, and its "unk" (SmolLM2's <|endoftext|>, GPT-2's eos) is
    a control token, dropped with the others.

    Parameters
    ----------
    tokenizer : a Hugging Face tokenizer

    Example:
        >>> from featuretree.model import get_tokenizer, load_model
        >>> tok = get_tokenizer(load_model())
        >>> tok.cls_token_id in special_ids(tok), tok.unk_token_id in special_ids(tok)
        (True, False)
    """
    ids = set(tokenizer.all_special_ids)
    ids |= {int(i) for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()
            if getattr(t, "special", False)}
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and _unk_spells_text(tokenizer, unk):
        ids.discard(unk)
    return sorted(ids)


_RARE = "\U0001F9EC \u0F3A \U00013000 \u2BFF"  # a DNA emoji, a Tibetan mark, a hieroglyph, an unassigned point


def _unk_spells_text(tokenizer: Any, unk: int) -> bool:
    """Whether the tokenizer writes its unknown token for characters it cannot spell (WordPiece) or never (bytes)."""
    try:
        out = tokenizer(_RARE, add_special_tokens=False)["input_ids"]
    except Exception:  # noqa: BLE001 - a tokenizer that cannot take the probe: unk is text unless it has a role
        roles = ("bos_token_id", "eos_token_id", "pad_token_id", "cls_token_id", "sep_token_id", "mask_token_id")
        return unk not in {getattr(tokenizer, r, None) for r in roles}
    return unk in out


def forward_args(module: torch.nn.Module) -> set[str]:
    """Tokenizer outputs the model's forward takes (GPT-2 takes no token_type_ids from some tokenizers).

    Parameters
    ----------
    module : torch.nn.Module
        The model; its `forward` signature is read (a `**kwargs` forward takes all three).

    Example:
        >>> sorted(forward_args(torch.nn.Linear(2, 2)))
        []
    """
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
