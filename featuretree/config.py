"""The settings, as one small dataclass per operation, composed into Config (the CLI parses the same fields).

A run is: harvest `n_tokens` activations of `layer` of `model` on `corpus` (HarvestConfig), train one TopK
dictionary per width in `widths` from that single stream (TrainConfig), and link each rung's features to
the narrower rungs (LinkConfig). Config is all three plus where the work runs; refinement and search take a
RefineConfig. Every field is documented once, under its definition; `add_arguments` turns fields into CLI
flags with that text as help, so the CLI never repeats a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DEFAULT_MODEL", "Config", "FeatureTreeError", "HarvestConfig", "LinkConfig", "RefineConfig",
           "TrainConfig", "field_docs", "list_flag", "settings"]

DEFAULT_MODEL = "all-MiniLM-L6-v2"


class FeatureTreeError(ValueError):
    """A user-facing error: the message says what was wrong and how to fix it.

    Example:
        >>> raise FeatureTreeError("layer 9 out of range 0..5: pass --layer between 0 and 5")
        Traceback (most recent call last):
        ...
        featuretree.config.FeatureTreeError: layer 9 out of range 0..5: pass --layer between 0 and 5
    """


class _Settings:
    """What every settings dataclass shares: validation of each part, dict / JSON round trips, CLI flags."""

    def __post_init__(self) -> None:
        for cls in reversed(type(self).__mro__):  # every part checks its own fields, once
            check = cls.__dict__.get("_check")
            if check is not None:
                check(self)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict.

        Example:
            >>> Config(k=8).to_dict()["k"]
            8
        """
        d = dataclasses.asdict(self)
        for name, v in d.items():
            if isinstance(v, tuple):
                d[name] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """Rebuild from `to_dict()` output; unknown keys are an error naming them.

        Example:
            >>> Config.from_dict({"k": 8}).k
            8
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise FeatureTreeError(f"unknown {cls.__name__} fields {unknown}; valid fields are {sorted(names)}")
        return cls(**d)

    @classmethod
    def add_arguments(cls, parser, fields: tuple[str, ...] | None = None, base=None) -> None:
        """Add one `--flag` per field to an argparse parser (help = the field's docstring).

        Flags default to None, so `from_args` keeps the default of every flag not given. `fields` limits the
        flags (default: every field but `extra`); `base` holds the defaults shown (default: `cls()`). List fields
        take `--widths 512,2048` or `--widths 512 2048`.

        Example:
            >>> import argparse
            >>> p = argparse.ArgumentParser(); Config.add_arguments(p)
            >>> Config.from_args(p.parse_args(["--widths", "64", "256", "--k", "8"])).widths
            (64, 256)
        """
        docs, defaults = field_docs(cls), base if base is not None else cls()
        types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        for name in fields or [f.name for f in dataclasses.fields(cls) if f.name != "extra"]:
            default = getattr(defaults, name)
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            kw: dict[str, Any] = {"default": None, "help": f"{docs.get(name, '')} (default: {shown})"}
            if "tuple" in types[name]:
                kw.update(list_flag(next((t for t in (float, str) if t.__name__ in types[name]), int)))
            elif "bool" in types[name]:
                kw["action"] = argparse.BooleanOptionalAction
            elif "float" in types[name]:
                kw["type"] = float
            elif "int" in types[name]:
                kw["type"] = int
            parser.add_argument("--" + name.replace("_", "-"), **kw)

    @classmethod
    def from_args(cls, args, base=None):
        """Settings from parsed `add_arguments` flags: the flags given, over `base` (default: the defaults).

        Example:
            >>> import argparse
            >>> Config.from_args(argparse.Namespace(k=4, layer=None)).k
            4
        """
        names = {f.name for f in dataclasses.fields(cls)}
        given = {n: v for n, v in vars(args).items() if n in names and v is not None}
        return cls.from_dict({**(base or cls()).to_dict(), **given})

    def to_json(self) -> str:
        """The settings as indented JSON text.

        Example:
            >>> '"k": 16' in Config().to_json()
            True
        """
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def settings(cls, config=None, **overrides):
    """An instance of settings class `cls`: the fields of `config` (any settings object sharing them, e.g. a
    whole Config for a TrainConfig) with `overrides` on top. Unknown overrides are an error naming them.

    Parameters
    ----------
    cls : type
        The settings dataclass wanted, e.g. TrainConfig.
    config : settings object, optional
        Where the fields come from (None: the defaults).
    **overrides
        Field values that replace those of `config`; None means "keep".

    Example:
        >>> settings(TrainConfig, Config(k=4), epochs=1).k, settings(TrainConfig, epochs=1).epochs
        (4, 1)
    """
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise FeatureTreeError(f"unknown {cls.__name__} settings {unknown}; valid ones are {sorted(names)}")
    base = {n: getattr(config, n) for n in names if config is not None and hasattr(config, n)}
    return cls(**{**base, **{n: v for n, v in overrides.items() if v is not None}})


@dataclass
class _Placed(_Settings):
    device: str = "cpu"
    """Where the work runs: "cpu", "cuda" or "cuda:N". The model, the dictionaries, training batches and
    encodings move there (the store stays on disk, firing matrices on the CPU); "cuda" uses torch ops, the
    compiled kernels stay the CPU fast path."""

    def _check(self) -> None:
        if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", str(self.device)):
            raise FeatureTreeError(f"device={self.device!r} is not a device: use 'cpu', 'cuda' or 'cuda:N'")


@dataclass
class _Seeded(_Placed):
    seed: int = 0
    """Seed for corpus shuffling, batch order and dictionary initialisation."""


@dataclass
class HarvestConfig(_Seeded):
    """Where activations come from: model, layer, corpus, how many tokens.

    Example:
        >>> HarvestConfig(layer=2).n_tokens
        600000
    """

    model: str = DEFAULT_MODEL
    """HF model name or local path; the default is the embedded all-MiniLM-L6-v2 (no download)."""

    layer: int = 3
    """Index of the transformer block whose output is harvested (0-based; negative counts from the end)."""

    site: str = ""
    """A module inside block `layer` to harvest instead of the block's output, as a path relative to the block
    (e.g. "mlp": the MLP's output, as TransformerLens' hook_mlp_out on most models); "" is the block's output
    (the residual stream); a norm's path with ":normalized" reads its output with the gain taken out (the MLP's
    input as TransformerLens' ln2.hook_normalized and Gemma Scope's transcoders see it). `build --ladder` sets it
    from the dictionaries' hook names."""

    corpus: str = "wordnet"
    """'wordnet' (bundled WordNet 3.0 glosses), or a path to a .txt (one text per line) or .jsonl file."""

    n_tokens: int = 600_000
    """Activations to harvest (padding and special tokens excluded); a tenth is held out for linking."""

    max_length: int = 128
    """Tokenizer truncation length for each text during harvest."""

    def _check(self) -> None:
        for name in ("n_tokens", "max_length"):
            if int(getattr(self, name)) <= 0:
                raise FeatureTreeError(f"{name}={getattr(self, name)} must be a positive integer")
        if not isinstance(self.site, str) or (self.site and not re.fullmatch(r"[A-Za-z_]\w*(\.\w+)*(:normalized)?",
                                                                              self.site)):
            raise FeatureTreeError(f"site={self.site!r} is not a module path inside a block (e.g. 'mlp' or "
                                   "'self_attn'); pass '' for the block's output")


@dataclass
class TrainConfig(_Seeded):
    """How the ladder trains: widths, k, epochs, batch size, learning rate, AuxK.

    Example:
        >>> TrainConfig(widths=(64, 256), k=8).widths
        (64, 256)
    """

    widths: tuple[int, ...] = (128, 512, 2048, 8192)
    """Dictionary widths of the ladder, strictly increasing; each rung is linked to the one before it."""

    k: int = 16
    """Active features per token in every TopK dictionary (must be below the narrowest width; see max_k_frac)."""

    max_k_frac: float | None = 0.25
    """A rung's k is at most this fraction of its width: min(k, max(1, int(width * max_k_frac))); 1 (or None)
    keeps `k` everywhere. A narrow rung with k near its width fires most latents on every token and they hedge;
    on planted hierarchies with k 1.5-2x the true L0 the cap raises parent-edge precision / recall from
    0.83 / 0.82 to 0.87 / 0.88, and costs at most 0.02 elsewhere (docs/EVAL.md; a cap of width / 8 starves a
    narrow rung that must hold every root). The default ladder (k 16, narrowest width 128) is unchanged."""

    epochs: int = 3
    """Passes over the harvested training tokens; every rung sees every batch of every pass."""

    batch_size: int = 1024
    """Tokens per optimisation step."""

    lr: float | None = None
    """Adam learning rate; None scales it with width as 6e-4 / sqrt(width / 2**14) (3x sparsify's rule)."""

    nested: bool = False
    """Train one Matryoshka dictionary whose prefixes are the rungs, instead of one dictionary per width
    (docs/EVAL.md compares the trees)."""

    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss, which lets the top dead features reconstruct the residual so they revive."""

    dead_tokens: int | None = None
    """A feature is dead after this many tokens without firing; None: a fifth of an epoch (at most 10M)."""

    shuffle: bool = True
    """Shuffle the training stream; --no-shuffle streams rows in store order (benchmarks feed identical
    batches to other trainers that way)."""

    def _check(self) -> None:
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
        if self.max_k_frac is not None and not 0 < self.max_k_frac <= 1:
            raise FeatureTreeError(f"max_k_frac={self.max_k_frac} must lie in (0, 1] (1 or None keeps k in every rung)")
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) <= 0:
                raise FeatureTreeError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.lr is not None and not self.lr > 0:
            raise FeatureTreeError(f"lr={self.lr} must be positive (or None for the width-scaled default)")
        if self.auxk_alpha < 0:
            raise FeatureTreeError(f"auxk_alpha={self.auxk_alpha} must be >= 0 (0 turns AuxK off)")
        if self.dead_tokens is not None and int(self.dead_tokens) <= 0:
            raise FeatureTreeError(f"dead_tokens={self.dead_tokens} must be a positive integer (or None)")

    def k_of(self, width: int) -> int:
        """The k of the rung of this width: `k`, capped at max_k_frac of the width.

        Parameters
        ----------
        width : int
            The rung's width.

        Example:
            >>> TrainConfig(k=6, widths=(16, 64)).k_of(16), TrainConfig(k=6, widths=(16, 64)).k_of(64)
            (4, 6)
        """
        if self.max_k_frac is None:
            return int(self.k)
        return max(1, min(int(self.k), int(width * self.max_k_frac)))


@dataclass
class LinkConfig(_Placed):
    """How features are linked into a tree: coverage thresholds and the firing rule.

    Example:
        >>> LinkConfig().min_coverage
        0.5
    """

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

    def _check(self) -> None:
        for name in ("min_coverage", "same_threshold", "fire_rel"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise FeatureTreeError(f"{name}={getattr(self, name)} must lie in [0, 1]")
        if not self.within_coverage > 0.0:
            raise FeatureTreeError(f"within_coverage={self.within_coverage} must be positive (> 1 turns it off)")


@dataclass
class Config(LinkConfig, TrainConfig, HarvestConfig):
    """Settings of one featuretree run; every field has a default, so `Config()` runs offline on CPU.

    The harvest, training and linking settings (HarvestConfig, TrainConfig, LinkConfig) and free-form notes.
    Where the work runs (this process, Ray, torchrun) is chosen above the run: featuretree.scale.

    Example:
        >>> cfg = Config(widths=(64, 256), k=8, n_tokens=20_000)
        >>> cfg.widths
        (64, 256)
    """

    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form notes recorded with the run (not used by the pipeline)."""


@dataclass
class RefineConfig(_Placed):
    """How a node is refined: the local dictionary and the region it trains on.

    Example:
        >>> RefineConfig().width, RefineConfig().max_tokens
        (64, 20000)
    """

    width: int = 64
    """Features of each local dictionary trained where the node fires."""

    depth: int = 1
    """Levels of refinement below the node (children with enough tokens are refined again)."""

    k: int | None = None
    """Active features per token of a local dictionary; None: max(1, width // 64), which gave children purer
    than their parent (docs/EVAL.md)."""

    min_tokens: int = 500
    """Fewest tokens a region may have to train a local dictionary (fewer is an error, or a leaf in search)."""

    max_tokens: int = 20_000
    """Most tokens gathered into a region."""

    stream_tokens: int = 100_000
    """Most corpus tokens streamed through the model beyond the run's store while gathering a region."""

    max_children: int | None = None
    """With depth > 1, refine at most this many children of each node (largest first); None: all."""

    n_contexts: int = 5
    """Contexts kept on each new node for its label and the explorer."""

    def _check(self) -> None:
        if int(self.depth) < 1:
            raise FeatureTreeError(f"depth={self.depth} must be at least 1 (levels of refinement)")
        if int(self.width) < 2:
            raise FeatureTreeError(f"width={self.width} must be at least 2 features")
        if self.k is not None and not 0 < int(self.k) < int(self.width):
            raise FeatureTreeError(f"k={self.k} must be at least 1 and below width={self.width}")
        if self.min_tokens < 1 or self.max_tokens < self.min_tokens:
            raise FeatureTreeError(f"need 1 <= min_tokens ({self.min_tokens}) <= max_tokens ({self.max_tokens})")


def list_flag(item: type = int) -> dict[str, Any]:
    """argparse keywords for a list-valued flag: items separated by commas, spaces, or a mix of both.

    `--widths 512,2048,8192`, `--widths 512 2048 8192` and `--widths 512,2048 8192` all give
    (512, 2048, 8192): every word up to the next flag is split at commas, each piece converted with `item`.
    Config's list fields use it (`add_arguments`), and so do the CLI's own list flags. The flag takes every
    word after it, so a positional argument goes before it (or after `--`).

    Example:
        >>> p = argparse.ArgumentParser(); _ = p.add_argument("--ks", **list_flag(int))
        >>> p.parse_args(["--ks", "1,2", "4", "8"]).ks
        (1, 2, 4, 8)
    """
    what, e = {int: ("an integer", "512,2048,8192"), float: ("a number", "0.5,0.9")}.get(item, ("a value", "a,b"))

    def items(text: str) -> list:
        out = []
        for piece in text.replace(",", " ").split():
            try:
                out.append(item(piece))
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"{piece!r} is not {what}: give a list separated by commas or spaces, e.g. {e} or "
                    f"{e.replace(',', ' ')} (a list flag takes every word after it: put positional arguments "
                    f"before it, or end the list with --)") from None
        return out

    items.__name__ = item.__name__  # argparse names the type in some of its messages
    return {"type": items, "nargs": "+", "action": _Flatten}


class _Flatten(argparse.Action):
    """`--widths 512,2048 8192` -> (512, 2048, 8192): every value's items, in order."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, tuple(w for v in values for w in v))


def field_docs(cls: type = Config) -> dict[str, str]:
    """Docstrings written under each dataclass field of `cls` and the classes it is made of (used for CLI help).

    Example:
        >>> "embedded" in field_docs()["model"]
        True
    """
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for part in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        docs.update(_own_field_docs(part, ast, inspect, textwrap))
    return docs


def _own_field_docs(cls: type, ast, inspect, textwrap) -> dict[str, str]:
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
