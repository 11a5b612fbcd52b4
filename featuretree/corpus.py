"""Corpus: load the texts activations are harvested from (bundled WordNet glosses, a .txt/.jsonl file, or a list) plus a label table."""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import json
import logging
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from featuretree.config import FeatureTreeError

__all__ = ["Corpus", "corpus_file", "corpus_texts", "data_dir", "load_corpus", "SUFFIXES", "WORDNET_FILE",
           "WORDNET_LABELS"]

logger = logging.getLogger(__name__)

WORDNET_FILE = "wordnet.jsonl.gz"
WORDNET_LABELS = ("id", "pos", "lexname", "domains", "domains_direct", "hypernym_path", "lemmas")
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")
_NUL_FRACTION = 0.1  # more NUL bytes than this in a "text" file means binary or UTF-16, not UTF-8 text


@dataclass
class Corpus:
    """Texts to harvest from, and one row of labels per text (index = the text's position in the source).

    Example:
        >>> c = Corpus(texts=["a cat", "a dog"], labels=pd.DataFrame(index=[0, 1]))
        >>> len(c), list(c)
        (2, ['a cat', 'a dog'])
    """

    texts: list[str]
    """The texts, in source order; this is what downstream code reads."""

    labels: pd.DataFrame
    """One row per text, aligned with `texts`; columns depend on the source (none for a plain list)."""

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.texts):
            raise FeatureTreeError(
                f"Corpus has {len(self.texts)} texts but {len(self.labels)} label rows: give one label row per text"
            )

    def __len__(self) -> int:
        return len(self.texts)

    def __iter__(self) -> Iterator[str]:
        return iter(self.texts)


def data_dir() -> Path:
    """The directory holding bundled data: $FEATURETREE_DATA if set, else the package's own `featuretree/data/`.

    The bundled files are package data (they ship inside the wheel), found with `importlib.resources`, so
    they are read the same from a checkout, an editable install or an installed wheel, from any cwd.

    Example:
        >>> (data_dir() / "wordnet.jsonl.gz").is_file()
        True
    """
    env = os.environ.get("FEATURETREE_DATA")
    if env:
        return Path(env).expanduser()
    # featuretree is a regular package installed as files (not zipped), so the Traversable is a real path
    return Path(str(importlib.resources.files("featuretree") / "data"))


def load_corpus(
    source: str | os.PathLike | Sequence[str] = "wordnet", *, limit: int | None = None, seed: int = 0
) -> Corpus:
    """Load texts and labels from "wordnet", a .txt / .jsonl / .jsonl.gz path, or a list of strings.

    A .txt file holds one text per line; a .jsonl(.gz) file one JSON object per line whose "text" field is
    the text and whose other fields become label columns. Blank texts are dropped and NUL characters
    removed. `limit` keeps a random subset of that many texts (seeded, in source order).

    Example:
        >>> c = load_corpus(["the cat sat", "", "a dog barked"])
        >>> c.texts, list(c.labels.index)
        (['the cat sat', 'a dog barked'], [0, 2])
        >>> len(load_corpus("wordnet", limit=100, seed=1))
        100
    """
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit <= 0
    ):
        raise FeatureTreeError(f"limit={limit!r} must be a positive integer (or None for every text)")
    if isinstance(source, (list, tuple)):
        name = f"list of {len(source)} items"
        rows = _from_list(source)
    elif isinstance(source, (str, os.PathLike)):
        path, name = _resolve(source)
        rows = _read_jsonl(path) if path.name.endswith((".jsonl", ".jsonl.gz")) else _read_txt(path)
        if str(source).lower() == "wordnet":
            rows = [(i, t, {k: rec.get(k) for k in WORDNET_LABELS}) for i, t, rec in rows]
    else:
        raise FeatureTreeError(
            f"corpus source of type {type(source).__name__} is not supported: pass 'wordnet', "
            f"a path to a {'/'.join(SUFFIXES)} file, or a list of strings"
        )
    if not rows:
        raise FeatureTreeError(
            f"corpus {name} has no texts (it is empty or only whitespace): give at least one non-blank text"
        )
    n_all = len(rows)
    if limit is not None and limit < n_all:
        keep = np.sort(np.random.default_rng(seed).choice(n_all, size=int(limit), replace=False))
        rows = [rows[i] for i in keep]
    index = pd.Index([i for i, _, _ in rows], name="source_index")
    labels = pd.DataFrame.from_records([lab for _, _, lab in rows], index=index)
    logger.info("loaded %d of %d texts from %s", len(rows), n_all, name)
    return Corpus(texts=[t for _, t, _ in rows], labels=labels)


def corpus_texts(source: str | os.PathLike) -> list[str]:
    """The texts of a corpus file or "wordnet", cached per file version (path, size, mtime) in this process.

    find, refine and search read the run's corpus again and again (a phrase's contexts, texts to stream);
    the bundled WordNet takes seconds to parse. The list is shared: do not modify it.

    Parameters
    ----------
    source : str or Path
        "wordnet" (the bundled glosses) or a path to a .txt (one text per line) or .jsonl / .jsonl.gz file.

    Example:
        >>> corpus_texts("wordnet") is corpus_texts("wordnet")
        True
    """
    path, _ = _resolve(source)
    st = path.stat()
    return _cached_texts(str(path.resolve()), st.st_size, st.st_mtime_ns, str(source).lower() == "wordnet")


@functools.lru_cache(maxsize=4)
def _cached_texts(path: str, size: int, mtime_ns: int, wordnet: bool) -> list[str]:
    return load_corpus("wordnet" if wordnet else path).texts


def _resolve(source: str | os.PathLike) -> tuple[Path, str]:
    """Map a source string or path to an existing file, with an error that says how to fix a bad one."""
    if isinstance(source, str) and source.lower() == "wordnet":
        path = data_dir() / WORDNET_FILE
        if not path.is_file():
            raise FeatureTreeError(
                f"bundled WordNet corpus not found at {path}: set FEATURETREE_DATA to the directory holding "
                f"{WORDNET_FILE}, or rebuild it with `python data/build_wordnet.py` (needs apt-get install wordnet-base)"
            )
        return path, f"wordnet ({path})"
    path = Path(source).expanduser()
    if not path.name.endswith(SUFFIXES):
        if path.exists():
            raise FeatureTreeError(
                f"corpus file {path} has an unsupported extension: use a .txt file (one text per line) "
                f'or a .jsonl / .jsonl.gz file (one {{"text": ...}} object per line)'
            )
        raise FeatureTreeError(
            f"unknown corpus source {str(source)!r}: pass 'wordnet', a path to an existing "
            f"{'/'.join(SUFFIXES)} file, or a list of strings"
        )
    if not path.is_file():
        raise FeatureTreeError(
            f"corpus file {path} not found (cwd {Path.cwd()}): check the path, or pass 'wordnet' for the bundled corpus"
        )
    return path, str(path)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (0-based line number, decoded line) of a UTF-8 (optionally gzip'd) file, rejecting binary input."""
    how = "convert it to UTF-8 text (e.g. `iconv -t UTF-8`) or pass a different file"
    n_bytes = n_nul = 0
    try:
        with gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb") as fh:
            for i, raw in enumerate(fh):
                n_bytes += len(raw)
                n_nul += raw.count(b"\0")
                if n_bytes >= 65536 and n_nul > _NUL_FRACTION * n_bytes:
                    break
                try:
                    line = raw.decode("utf-8-sig" if i == 0 else "utf-8")
                except UnicodeDecodeError as e:
                    raise FeatureTreeError(
                        f"{path} is not UTF-8 text (line {i + 1}, byte {e.start}: {e.reason}); is it binary? {how}"
                    ) from None
                yield i, line.replace("\0", "")
    except (gzip.BadGzipFile, zlib.error, EOFError) as e:
        raise FeatureTreeError(
            f"{path} is not a valid gzip file ({e}): gzip it again, or rename it to .jsonl"
        ) from None
    if n_nul > _NUL_FRACTION * max(n_bytes, 1):
        raise FeatureTreeError(
            f"{path} looks binary ({n_nul} NUL bytes in {n_bytes}; UTF-16?), not UTF-8 text: {how}"
        )


def _read_txt(path: Path) -> list[tuple[int, str, dict[str, Any]]]:
    """One (line number, text, {}) per non-blank line of a text file."""
    return [(i, s, {}) for i, line in _lines(path) if (s := line.strip())]


def _read_jsonl(path: Path) -> list[tuple[int, str, dict[str, Any]]]:
    """One (line number, text, other fields) per JSON-lines record with a non-blank "text"."""
    rows = []
    for i, line in _lines(path):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise FeatureTreeError(
                f"{path} line {i + 1} is not valid JSON ({e.msg}): write one JSON object per line"
            ) from None
        if not isinstance(rec, dict) or "text" not in rec:
            raise FeatureTreeError(
                f'{path} line {i + 1} has no "text" field: every line must be an object like {{"text": "..."}} '
                f"(other fields become label columns)"
            )
        text = rec.pop("text")
        if not isinstance(text, str):
            raise FeatureTreeError(
                f'{path} line {i + 1}: "text" is {type(text).__name__}, it must be a string'
            )
        if text := text.replace("\0", "").strip():
            rows.append((i, text, rec))
    return rows


def _from_list(items: Sequence[Any]) -> list[tuple[int, str, dict[str, Any]]]:
    """One (list position, text, {}) per non-blank string of a list or tuple."""
    rows = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise FeatureTreeError(
                f"corpus item {i} is {type(item).__name__}, not str: pass a list of strings"
            )
        if text := item.replace("\0", "").strip():
            rows.append((i, text, {}))
    return rows


def corpus_file(source: str | os.PathLike) -> Path:
    """The file a corpus source names ('wordnet' -> the bundled file), or a clear error for a bad one.

    Example:
        >>> corpus_file("wordnet").name
        'wordnet.jsonl.gz'
    """
    return _resolve(source)[0]
