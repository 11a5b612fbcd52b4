"""Tiny shared helpers: atomic file writes (temp file + fsync + rename), safetensors saving, rung order, tree edge,
a quiet logger."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "check_safetensors", "graph_of", "quiet", "resolve_device", "rung_key", "rung_of",
           "SAFETENSORS_HINT", "save_tensors", "store_path", "tree_edge", "tree_parent", "write_json",
           "write_text"]


@contextlib.contextmanager
def quiet(name: str = "featuretree.harvest") -> Iterator[None]:
    """Silence a logger below errors inside the block (e.g. collect's "the corpus has only N tokens", expected
    when a few query or streamed texts are all there is).

    Parameters
    ----------
    name : str
        The logger's name; its level is restored when the block ends.

    Example:
        >>> import logging
        >>> with quiet("x"):
        ...     logging.getLogger("x").level
        40
    """
    import logging

    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def resolve_device(device: str | None = "cpu"):
    """The torch.device for `device` ("cpu", "cuda", "cuda:1"), or a FeatureTreeError saying why it is not here.

    Parameters
    ----------
    device : str or torch.device, optional
        None means "cpu".

    Example:
        >>> resolve_device("cpu").type
        'cpu'
    """
    import torch

    from featuretree.config import FeatureTreeError

    try:
        dev = torch.device(device or "cpu")
    except (RuntimeError, TypeError) as e:
        raise FeatureTreeError(f"device={device!r} is not a device ({e}): use 'cpu', 'cuda' or 'cuda:N'") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise FeatureTreeError(f"device={device!r} was asked for but torch {torch.__version__} sees no CUDA GPU "
                                   "(no GPU, no driver, or a CPU-only torch build): use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise FeatureTreeError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                                   f"numbered 0..{torch.cuda.device_count() - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise FeatureTreeError(f"device={device!r} was asked for but MPS is not available here: use --device cpu")
    return dev


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync it and rename it over `path`, else delete it.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> with atomic_path(d / "x.txt") as tmp:
        ...     _ = tmp.write_text("hi")
        >>> (d / "x.txt").read_text()
        'hi'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except OSError as e:  # name the file being written (a write error alone names none)
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write UTF-8 text to `path`.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> write_text(p, "x"); p.read_text()
        'x'
    """
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write `obj` as indented JSON.

    Parameters
    ----------
    path : str or Path
        The file to write (replaced if it exists).
    obj : Any
        JSON-able data, written with sorted keys and non-ASCII text kept as is.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.json"
        >>> write_json(p, {"a": 1}); json.loads(p.read_text())
        {'a': 1}
    """
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Atomically save a dict of tensors as safetensors (contiguous CPU copies).

    Parameters
    ----------
    path : str or Path
        The file to write (replaced if it exists).
    tensors : dict of str to Tensor
        The tensors, by name.
    metadata : dict of str to str, optional
        Stored in the file's header.

    Example:
        >>> import tempfile, pathlib, torch
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "t.safetensors"
        >>> save_tensors(p, {"a": torch.zeros(2)})
        >>> p.exists()
        True
    """
    from safetensors.torch import save_file

    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(flat, str(tmp), metadata=metadata)
        except Exception as e:  # safetensors reports a failed write (disk full, ...) as its own error type
            if isinstance(e, OSError):
                raise
            import errno
            import re

            code = re.search(r"os error (\d+)", str(e))  # the Rust side's "I/O error: ... (os error 28)"
            if code:
                raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from e
            raise OSError(errno.EIO, f"could not write the tensors ({e})", str(path)) from e


SAFETENSORS_HINT = ("featuretree reads only safetensors and never unpickles (a pickle can run code); convert it in "
                    "an environment you trust: safetensors.torch.save_file({k: v.contiguous() for k, v in "
                    "torch.load(f, weights_only=True).items()}, out)")


def check_safetensors(path: str | os.PathLike) -> None:
    """Refuse a file that is not safetensors (a pickle, torch.save zip, numpy file) without ever unpickling it.

    safetensors starts with an 8-byte little-endian header length and then the JSON header's "{".

    Parameters
    ----------
    path : str or Path
        The file to check; it is only read (its first 9 bytes and its size).

    Example:
        >>> import tempfile, pathlib, pickle
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "w.safetensors"; _ = p.write_bytes(pickle.dumps([1]))
        >>> check_safetensors(p)
        Traceback (most recent call last):
        ...
        featuretree.config.FeatureTreeError: ... is a pickle file, not safetensors: ...
    """
    from featuretree.config import FeatureTreeError

    with open(path, "rb") as f:
        head = f.read(9)
        size = os.fstat(f.fileno()).st_size
    n = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    if len(head) == 9 and head[8:9] == b"{" and 0 < n <= size - 8:
        return
    kind = ("a pickle file" if head[:1] == b"\x80" else "a torch.save (zip) file" if head[:4] == b"PK\x03\x04"
            else "a numpy file" if head[:6] == b"\x93NUMPY" else None)
    if kind is not None:
        raise FeatureTreeError(f"{path} is {kind}, not safetensors: {SAFETENSORS_HINT}")
    raise FeatureTreeError(f"{path} is {'empty' if not head else 'truncated or not a safetensors file'}: a write "
                           "was cut short or the file was damaged; re-save it (or rerun the step that made it)")


def rung_key(rung: str) -> tuple:
    """Sort key for rung names: ladder rungs by width, then refined rungs ("w512/7/r64") after them.

    Example:
        >>> sorted(["w512", "w128/3/r64", "w128"], key=rung_key)
        ['w128', 'w512', 'w128/3/r64']
    """
    last = rung.rsplit("/", 1)[-1]
    return rung.count("/"), int(last[1:]) if last[1:].isdigit() else 0, rung


def tree_edge(g, n: str) -> tuple[str | None, dict]:
    """The edge into node `n` of graph `g` from its primary parent (the virtual root included): (parent, data).

    The graph keeps one tree edge per child; if a hand-made graph has several, the best-covering wins.
    (None, {}) for a node without a parent.

    Example:
        >>> import networkx as nx
        >>> g = nx.DiGraph(); g.add_edge("a", "c", coverage=0.6); g.add_edge("b", "c", coverage=0.9)
        >>> tree_edge(g, "c")
        ('b', {'coverage': 0.9})
    """
    preds = list(g.predecessors(n))
    if not preds:
        return None, {}
    p = preds[0] if len(preds) == 1 else max(preds, key=lambda q: g.edges[q, n].get("coverage") or 0.0)
    return p, g.edges[p, n]


def store_path(tree) -> Path | None:
    """The run's activation store: the graph attribute "acts" (relative to `tree.path`, the run directory).

    None when the tree has no store or no run directory to resolve a relative one against.

    Example:
        >>> import networkx as nx
        >>> from types import SimpleNamespace
        >>> store_path(SimpleNamespace(graph=nx.DiGraph(acts="acts"), path=Path("runs/x"))).as_posix()
        'runs/x/acts'
    """
    g = tree if hasattr(tree, "nodes") else tree.graph
    acts, run = g.graph.get("acts"), getattr(tree, "path", None)
    if not acts or (run is None and not os.path.isabs(acts)):
        return None
    return Path(os.path.normpath(Path(run) / acts)) if run is not None else Path(acts)


def graph_of(tree):
    """The nx.DiGraph of a FeatureTree, or `tree` itself when it already is a graph.

    Example:
        >>> import networkx as nx
        >>> g = nx.DiGraph(); graph_of(g) is g
        True
    """
    return tree if hasattr(tree, "nodes") else tree.graph


def rung_of(g, n: str) -> str:
    """The rung of node `n`: its `rung` attribute, else its id without the last part ("w512/7" -> "w512").

    Example:
        >>> import networkx as nx
        >>> g = nx.DiGraph(); g.add_node("w512/7"); g.add_node("w8/1/r4/0", rung="w8/1/r4")
        >>> rung_of(g, "w512/7"), rung_of(g, "w8/1/r4/0")
        ('w512', 'w8/1/r4')
    """
    return str(g.nodes[n].get("rung") or str(n).rsplit("/", 1)[0])


def tree_parent(g, n: str) -> str | None:
    """The primary parent feature of `n` (see `tree_edge`); None for a top-level feature or one under the virtual root.

    Example:
        >>> import networkx as nx
        >>> g = nx.DiGraph([("root", "w2/0"), ("w2/0", "w8/1")]); g.nodes["root"]["virtual"] = True
        >>> tree_parent(g, "w8/1"), tree_parent(g, "w2/0")
        ('w2/0', None)
    """
    p, _ = tree_edge(g, n)
    return None if p is None or g.nodes[p].get("virtual") else p
