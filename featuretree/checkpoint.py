"""Resume after a kill: the ONE scheme every long step uses (harvest, ladder training, refinement, build).

A step's progress is a `Checkpoint`: one file, written atomically (temp file, fsync, rename), holding what
the step has done (a JSON `info` dict, and tensors when there are any, as safetensors) together with the
fingerprint of the settings that produced it: sha256 of their canonical JSON (`fingerprint`). Reopening a
checkpoint with other settings is refused, naming what differs, never mixed in; `finished=True` marks a
step that completed (a rerun returns its result at once). Inputs are identified by `data_fingerprint`
(an activation store's recipe and shard checksums, or a Tensor's bytes), `model_fingerprint` (a model's
files) and `file_record` / `file_matches` (a finished file's size and sha256).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featuretree.config import FeatureTreeError
from featuretree.utils import save_tensors

__all__ = ["Checkpoint", "data_fingerprint", "differences", "file_matches", "file_record", "file_sha256",
           "fingerprint", "load_state", "model_fingerprint", "Resume", "save_state"]

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

    Parameters
    ----------
    acts : Activations or Tensor
        The stream: a store (fingerprinted by its meta.json) or anything `torch.as_tensor` takes (by value).

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
    root = Path(d)  # a directory, or one file (a GGUF): then that file alone, named relative to its folder
    base = root.parent if root.is_file() else root
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {"name": str(model), "files": [[p.relative_to(base).as_posix(), p.stat().st_size, _ends_sha256(p)]
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


class SettingsMismatch(FeatureTreeError):
    """A checkpoint (or a finished step's record) was made with other settings than the ones asked for now."""


@dataclass
class Resume:
    """Where and how often a long step saves its progress: `path`, every `every` seconds (0: every step);
    `keep` keeps the state when the step ends, marked finished, so a rerun returns its result at once.

    Example:
        >>> Resume("ckpt/train.safetensors", every=30).every
        30
    """

    path: str | os.PathLike
    every: float = 60.0
    keep: bool = False


class Checkpoint:
    """The saved progress of one resumable step, tied to the settings that made it.

    Parameters
    ----------
    path : str or Path
        The state file: "*.json" holds `info` only, anything else a safetensors file of tensors + info.
    settings : dict
        Everything that changes the step's result (JSON-able); its fingerprint tags the file.
    what : str
        The step, for messages ("the harvest", "the ladder's training", ...).
    how_to_reset : str
        What the user does to start over when the saved state belongs to other settings.
    where : path, optional
        What the message names (default: `path`), e.g. the run directory that holds the file.

    Example:
        >>> import tempfile
        >>> c = Checkpoint(Path(tempfile.mkdtemp()) / "p.json", {"n": 1}, "a step")
        >>> c.load() is None
        True
        >>> c.save({"done": 3}); c.load()[1]["done"]
        3
        >>> Checkpoint(c.path, {"n": 2}, "a step").load()
        Traceback (most recent call last):
        ...
        featuretree.checkpoint.SettingsMismatch: ... holds a step with other settings (n 1 -> 2): ...
    """

    def __init__(self, path, settings: dict, what: str = "a step",
                 how_to_reset: str = "delete it (or choose another directory) to start over", where=None) -> None:
        self.path = Path(path)
        self.settings = json.loads(json.dumps(settings, default=str))  # as it reads back from the file
        self.fingerprint = fingerprint(self.settings)
        self.what, self.how_to_reset = what, how_to_reset
        self.where = Path(where) if where is not None else self.path

    @property
    def is_json(self) -> bool:
        return self.path.suffix == ".json"

    def load(self) -> tuple[dict, dict] | None:
        """(tensors, info) saved for these settings, None if nothing is saved; other settings raise
        SettingsMismatch, a damaged file FeatureTreeError."""
        if not self.path.is_file():
            return None
        if self.is_json:
            try:
                info, tensors = json.loads(self.path.read_text(encoding="utf-8")), {}
            except (OSError, ValueError) as e:
                raise FeatureTreeError(f"the saved state {self.path} is damaged ({e}): {self.how_to_reset}") from e
        else:
            tensors, info = load_state(self.path)
        if info.get("fingerprint") != self.fingerprint:
            diff = ", ".join(differences(info.get("settings") or {}, self.settings))
            raise SettingsMismatch(f"{self.where} holds {self.what} with other settings ({diff or 'another version'}): "
                                   f"{self.how_to_reset}")
        return tensors, info

    def save(self, info: dict, tensors: dict | None = None, *, finished: bool = False) -> None:
        """Write `info` (and `tensors`) atomically, tagged with the settings' fingerprint."""
        info = {**info, "fingerprint": self.fingerprint, "settings": self.settings, "finished": bool(finished)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.is_json:
            from featuretree.utils import write_json

            write_json(self.path, info)
        else:
            save_state(self.path, tensors or {}, info)

    def remove(self) -> None:
        """Delete the saved state (the step is over and its result is saved elsewhere)."""
        self.path.unlink(missing_ok=True)


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """What changed from `old` to `new` settings, one phrase per key ("k 16 -> 8", "inputs.corpus changed").

    Parameters
    ----------
    old, new : dict
        The settings before and after; nested dicts are compared key by key.
    prefix : str
        Put before every key named (the recursion passes "inputs." and so on).

    Example:
        >>> differences({"k": 16, "inputs": {"corpus": "a" * 64}}, {"k": 8, "inputs": {"corpus": "b" * 64}})
        ['k 16 -> 8', 'inputs.corpus changed']
    """
    out = []
    for key in [*new, *(k for k in old if k not in new)]:
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif len(repr(a)) + len(repr(b)) > 60:
            out.append(f"{prefix}{key} changed")
        else:
            out.append(f"{prefix}{key} {a!r} -> {b!r}")
    return out


def save_state(path: str | os.PathLike, tensors: dict, info: dict) -> None:
    """Write tensors and a JSON-able `info` dict as one safetensors file, atomically.

    Parameters
    ----------
    path : str or Path
        The file to write (replaced if it exists).
    tensors : dict of str to Tensor
        The tensors to store.
    info : dict
        JSON-able facts stored in the file's metadata; `load_state` returns them.

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

    Parameters
    ----------
    path : str or Path
        A file written by `save_state`.

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


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks.

    Parameters
    ----------
    path : str or Path
        The file to hash; it must exist.

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


def file_record(path: str | os.PathLike) -> dict:
    """What a finished file is: {"bytes": size, "sha256": checksum}, to check it against later.

    Parameters
    ----------
    path : str or Path
        The file to describe; it must exist.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x"; _ = p.write_bytes(b"abc")
        >>> file_record(p)["bytes"]
        3
    """
    return {"bytes": Path(path).stat().st_size, "sha256": file_sha256(path)}


def file_matches(path: str | os.PathLike, record: dict) -> bool:
    """Whether `path` exists with the size and checksum of `record` (a killed or damaged write fails).

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x"; _ = p.write_bytes(b"abc")
        >>> file_matches(p, file_record(p)), file_matches(p, {"bytes": 3, "sha256": "0"})
        (True, False)
    """
    try:
        return Path(path).stat().st_size == record["bytes"] and file_sha256(path) == record["sha256"]
    except OSError:
        return False
