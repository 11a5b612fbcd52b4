"""Resume after a kill: fingerprints of what a run is made from, and state files written atomically.

A run directory records `run.json`: the config, a fingerprint of the config and of its inputs (the corpus
texts, the model's files) and how far the run got. Long steps save their state as one safetensors file
(tensors, plus a JSON header in its metadata) through a temporary file, fsync and rename, so a kill at any
moment leaves the previous state or the new one, never half of one. Resuming compares fingerprints: state
written for other settings is refused, never mixed in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from featuretree.config import FeatureTreeError
from featuretree.utils import save_tensors

log = logging.getLogger(__name__)

_STATE_KEY = "featuretree_state"


def fingerprint(obj: Any) -> str:
    """sha256 of `obj` as canonical JSON (sorted keys): equal settings give equal fingerprints.

    Example:
        >>> fingerprint({"a": 1, "b": [2]}) == fingerprint({"b": [2], "a": 1})
        True
    """
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def data_fingerprint(acts) -> str:
    """What a training stream is: an Activations store's recipe and shard checksums, or a Tensor's bytes.

    Example:
        >>> import torch
        >>> data_fingerprint(torch.zeros(2, 3)) == data_fingerprint(torch.zeros(2, 3))
        True
    """
    if hasattr(acts, "meta") and hasattr(acts, "batches"):
        meta = acts.meta
        return fingerprint({"recipe": meta.get("recipe"), "shards": [i.get("sha256") for i in meta.get("shard_info", [])],
                            "n_tokens": meta.get("n_tokens"), "path": None if meta.get("shard_info") else str(acts.path)})
    import torch

    x = torch.as_tensor(acts).detach().cpu().contiguous()
    h = hashlib.sha256(str((tuple(x.shape), str(x.dtype))).encode())
    h.update(x.view(torch.uint8).numpy().tobytes() if x.numel() else b"")
    return h.hexdigest()


def model_fingerprint(model: Any) -> dict:
    """Identity of a model given by name or path: every file's size and the sha256 of its first and last MiB.

    Hashing gigabytes of weights on every run would cost minutes; a changed file changes its size or its
    ends (safetensors and pickle headers sit at the front). Reinstalling the same files changes nothing. A
    model passed as an object has no files to check and is identified by its class name.

    Example:
        >>> model_fingerprint("all-MiniLM-L6-v2")["name"]
        'all-MiniLM-L6-v2'
    """
    from featuretree.model import resolve_model_dir

    if not isinstance(model, (str, os.PathLike)):
        return {"name": type(getattr(model, "_module", model)).__name__}
    d = resolve_model_dir(model)
    if d is None:
        return {"name": str(model)}
    files = sorted(p for p in Path(d).rglob("*") if p.is_file())
    return {"name": str(model), "files": [[p.relative_to(d).as_posix(), p.stat().st_size, _ends_sha256(p)]
                                           for p in files]}


def _ends_sha256(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(block))
        size = f.seek(0, os.SEEK_END)
        if size > 2 * block:
            f.seek(size - block)
            h.update(f.read(block))
        elif size > block:
            f.seek(block)
            h.update(f.read())
    return h.hexdigest()


def save_state(path: str | os.PathLike, tensors: dict, info: dict) -> None:
    """Write tensors and a JSON-able `info` dict as one safetensors file, atomically.

    Example:
        >>> import tempfile, torch
        >>> p = Path(tempfile.mkdtemp()) / "state.safetensors"
        >>> save_state(p, {"w": torch.ones(2)}, {"step": 3})
        >>> load_state(p)[1]["step"]
        3
    """
    save_tensors(path, tensors, metadata={_STATE_KEY: json.dumps(info, sort_keys=True)})


def load_state(path: str | os.PathLike) -> tuple[dict, dict]:
    """(tensors, info) written by `save_state`; a damaged file is an error that says how to start over.

    Example:
        >>> import tempfile, torch
        >>> p = Path(tempfile.mkdtemp()) / "s.safetensors"; save_state(p, {"w": torch.ones(1)}, {})
        >>> load_state(p)[0]["w"].tolist()
        [1.0]
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            info = json.loads((f.metadata() or {})[_STATE_KEY])
            return {k: f.get_tensor(k) for k in f.keys()}, info
    except Exception as e:  # safetensors' own error types, KeyError, JSON errors
        raise FeatureTreeError(f"the saved state {path} is damaged ({e}): delete it to start that step over") from e
