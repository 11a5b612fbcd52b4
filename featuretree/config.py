"""Config: every setting of a featuretree run in one validated dataclass (the CLI parses the same fields).

A run is: harvest `n_tokens` activations of `layer` of `model` on `corpus`, train one TopK dictionary per
width in `widths` from that single stream, and link each rung's features to the next narrower rung.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MODEL = "all-MiniLM-L6-v2"


class FeatureTreeError(ValueError):
    """A user-facing error: the message says what was wrong and how to fix it.

    Example:
        >>> raise FeatureTreeError("layer 9 out of range 0..5: pass --layer between 0 and 5")
        Traceback (most recent call last):
        ...
        featuretree.config.FeatureTreeError: layer 9 out of range 0..5: pass --layer between 0 and 5
    """


@dataclass
class Config:
    """Settings of one featuretree run; every field has a default, so `Config()` runs offline on CPU.

    Example:
        >>> cfg = Config(widths=(64, 256), k=8, n_tokens=20_000)
        >>> cfg.widths
        (64, 256)
    """

    model: str = DEFAULT_MODEL
    """HF model name or local path; the default is the embedded all-MiniLM-L6-v2 (no download)."""

    layer: int = 3
    """Index of the transformer block whose output is harvested (0-based; negative counts from the end)."""

    corpus: str = "wordnet"
    """'wordnet' (bundled WordNet 3.0 glosses), or a path to a .txt (one text per line) or .jsonl file."""

    n_tokens: int = 600_000
    """Activations to harvest (padding and special tokens excluded); a tenth is held out for linking."""

    widths: tuple[int, ...] = (128, 512, 2048, 8192)
    """Dictionary widths of the ladder, strictly increasing; each rung is linked to the one before it."""

    k: int = 16
    """Active features per token in every TopK dictionary (must be below the narrowest width)."""

    epochs: int = 3
    """Passes over the harvested training tokens; every rung sees every batch of every pass."""

    batch_size: int = 1024
    """Tokens per optimisation step."""

    lr: float | None = None
    """Adam learning rate; None scales it with width as 6e-4 / sqrt(width / 2**14) (3x sparsify's rule)."""

    nested: bool = False
    """Train one Matryoshka dictionary whose prefixes are the rungs, instead of one dictionary per width
    (docs/EVAL.md compares the trees)."""

    min_coverage: float = 0.5
    """A feature gets a parent only if that parent fires on at least this fraction of its firing tokens
    (P(parent | child)); features no narrower feature covers are "novel". docs/EVAL.md: flat on planted
    hierarchies (`featuretree eval planted --sweep`); on WordNet higher values turn real children novel."""

    within_coverage: float = 0.9
    """Within one rung, p becomes c's parent when P(p | c) >= this and P(c | p) < this (the eval-HSAEs
    rule): a child the rung already resolves beside its parent. A value > 1 turns within-rung edges off."""

    same_threshold: float = 0.9
    """An edge is kind "same" (the feature did not split) when both P(p | c) and P(c | p) reach this."""

    fire_rel: float = 0.25
    """A feature "fires" on a token when its activation is at least this times its 90th-percentile
    activation: TopK fills k slots on every token and the weakest are noise that blurs co-activation."""

    max_length: int = 128
    """Tokenizer truncation length for each text during harvest."""

    seed: int = 0
    """Seed for corpus shuffling, batch order and dictionary initialisation."""

    executor: str = "serial"
    """Where rungs and sibling refinements train: "serial" (this process) or "ray" (one Ray task each, on the
    cluster `ray.init` finds; pip install 'featuretree[ray]'). The results are the same either way."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form notes recorded with the run (not used by the pipeline)."""

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        if not self.widths:
            raise FeatureTreeError("widths is empty: give at least one dictionary width, e.g. widths=(512, 2048)")
        if any(w <= 0 for w in self.widths):
            raise FeatureTreeError(f"widths {self.widths} contain a width <= 0: every width must be a positive integer")
        if list(self.widths) != sorted(set(self.widths)):
            raise FeatureTreeError(
                f"widths {self.widths} must be strictly increasing without duplicates, e.g. (512, 2048, 8192)"
            )
        if not 0 < self.k < self.widths[0]:
            raise FeatureTreeError(
                f"k={self.k} must be at least 1 and below the narrowest width {self.widths[0]}: lower k or widen the ladder"
            )
        for name in ("n_tokens", "epochs", "batch_size", "max_length"):
            if int(getattr(self, name)) <= 0:
                raise FeatureTreeError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.lr is not None and not self.lr > 0:
            raise FeatureTreeError(f"lr={self.lr} must be positive (or None for the width-scaled default)")
        for name in ("min_coverage", "same_threshold", "fire_rel"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise FeatureTreeError(f"{name}={getattr(self, name)} must lie in [0, 1]")
        if self.executor not in ("serial", "ray"):
            raise FeatureTreeError(f"executor={self.executor!r} must be 'serial' or 'ray'")
        if not self.within_coverage > 0.0:
            raise FeatureTreeError(f"within_coverage={self.within_coverage} must be positive (> 1 turns it off)")

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict.

        Example:
            >>> Config(k=8).to_dict()["k"]
            8
        """
        d = dataclasses.asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """Rebuild a Config from `to_dict()` output; unknown keys are an error naming them.

        Example:
            >>> Config.from_dict({"k": 8}).k
            8
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise FeatureTreeError(f"unknown config fields {unknown}; valid fields are {sorted(names)}")
        return cls(**d)

    @classmethod
    def add_arguments(cls, parser, fields: tuple[str, ...] | None = None) -> None:
        """Add one `--flag` per Config field to an argparse parser (help = the field's docstring).

        Flags default to None, so `from_args` keeps the Config default of every flag not given. `fields`
        limits the flags (default: every field but `extra`).

        Example:
            >>> import argparse
            >>> p = argparse.ArgumentParser(); Config.add_arguments(p)
            >>> Config.from_args(p.parse_args(["--widths", "64,256", "--k", "8"])).widths
            (64, 256)
        """
        docs, defaults = field_docs(cls), cls()
        types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        for name in fields or [f.name for f in dataclasses.fields(cls) if f.name != "extra"]:
            default = getattr(defaults, name)
            shown = ",".join(map(str, default)) if name == "widths" else default
            kw: dict[str, Any] = {"default": None, "help": f"{docs.get(name, '')} (default: {shown})"}
            if name == "widths":
                kw["type"] = _widths
            elif "bool" in types[name]:
                kw["action"] = "store_true"
            elif "float" in types[name]:
                kw["type"] = float
            elif "int" in types[name]:
                kw["type"] = int
            parser.add_argument("--" + name.replace("_", "-"), **kw)

    @classmethod
    def from_args(cls, args, base: Config | None = None) -> Config:
        """A Config from parsed `add_arguments` flags: the flags given, over `base` (default: the defaults).

        Example:
            >>> import argparse
            >>> Config.from_args(argparse.Namespace(k=4, layer=None)).k
            4
        """
        names = {f.name for f in dataclasses.fields(cls)}
        given = {n: v for n, v in vars(args).items() if n in names and v is not None}
        return cls.from_dict({**(base or cls()).to_dict(), **given})

    def to_json(self) -> str:
        """The config as indented JSON text.

        Example:
            >>> '"k": 16' in Config().to_json()
            True
        """
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _widths(text: str) -> tuple[int, ...]:
    import argparse

    try:
        return tuple(int(w) for w in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--widths {text!r}: give integers separated by commas, e.g. 512,2048,8192") from None


def field_docs(cls: type = Config) -> dict[str, str]:
    """Docstrings written under each dataclass field (used for CLI help).

    Example:
        >>> "embedded" in field_docs()["model"]
        True
    """
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for prev, node in zip(body, body[1:]):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(prev.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs
