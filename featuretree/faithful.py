"""faithfulness: how much of a causal LM's next-token loss each rung's reconstruction keeps (loss recovered, KL).

The standard check of an SAE (SAELens' "CE loss score"): run the language model on held-out documents
three ways and compare the next-token cross-entropy (CE):

    clean   the model as it is
    zero    the output of block `layer` replaced by zeros (zero ablation)
    sae     the output of block `layer` replaced by the dictionary's reconstruction sae(x) = decode(encode(x))

    loss_recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean)    # 1: as good as the model, 0: as bad as zeros
    kl             = mean over predicted positions of KL(p_clean || p_sae)   (nats)

Which positions are spliced: the block output (the module `collect` harvests, `layer_module(model, layer)`;
a tuple's first element or the tensor itself) is replaced at the real, non-special tokens only. Special
tokens (BOS, CLS, SEP, EOS, ... but not [UNK]: the same rule as the harvest) keep their clean activation,
and so does padding. SAELens splices every position; featuretree's dictionaries never saw a special
token's activation (the harvest drops them, and the BOS activation of a decoder is huge and atypical), so
splicing it would charge the dictionary for inputs outside its training distribution.

Which tokens count: every prediction of a real (non-padding) token from the position before it: position t
predicts token t + 1 when both are inside the attention mask (the text is right-padded). Predictions made
at a special position (BOS predicting the first word) count too; they are the same in all three runs (the
model is causal and nothing up to them is spliced), so they cancel in loss_recovered's differences but
dilute the CEs and KL a little, as in SAELens. CEs and KL are token-weighted means over all counted
predictions of all documents (not per-document means), in nats. The KL direction is KL(clean || spliced)
= sum_v p_clean(v) (log p_clean(v) - log p_spliced(v)).

Mechanics: a plain torch forward hook on the block (`register_forward_hook` returning the edited output)
rather than an nnsight trace. Each of the 2 + R forwards per batch (clean, zero, one per rung) runs the
whole model to the logits, so nothing is gained from tracing, and a hook behaves the same whether a block
returns a tensor or a tuple, on every transformers and nnsight version (how an nnsight trace assigns a
module's output has changed across releases, and traced code must live in a file nnsight can read).
Everything runs under torch.no_grad; the logits and the dictionary's input are float32.

`load_model` loads a checkpoint with AutoModel, i.e. without its LM head; `causal_lm` loads the same local
checkpoint again with AutoModelForCausalLM when its config names a causal-LM architecture.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from featuretree.config import FeatureTreeError
from featuretree.harvest import forward_args, special_ids
from featuretree.utils import write_json

__all__ = ["causal_lm", "FAITHFUL_FILE", "faithfulness", "heldout_texts", "is_causal_lm", "METRIC_KEYS", "splice_blocker",
           "record_faithfulness", "Splice", "splice_batch"]

log = logging.getLogger(__name__)

FAITHFUL_FILE = "faithfulness.json"
"""The run directory's faithfulness table (written by `build` for causal LMs and by `featuretree faithful`)."""

METRIC_KEYS = ("loss_recovered", "kl", "ce_clean", "ce_sae", "ce_zero")
"""The columns of a faithfulness row copied into each dictionary's `.metrics` (and so its cfg.json)."""

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")  # LlamaForCausalLM, GPT2LMHeadModel, ...


def _module(model: Any) -> torch.nn.Module:
    module = getattr(model, "_module", model)
    if not isinstance(module, torch.nn.Module):
        raise FeatureTreeError(f"expected a model from featuretree.load_model, got {type(model).__name__}")
    return module


def _has_lm_head(module: torch.nn.Module) -> bool:
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    return type(module).__name__.endswith(_CAUSAL_SUFFIXES) and head is not None


def _causal_architecture(module: torch.nn.Module) -> str | None:
    """The causal-LM class the checkpoint was saved from (config.architectures), if any."""
    archs = getattr(getattr(module, "config", None), "architectures", None) or []
    return next((a for a in archs if isinstance(a, str) and a.endswith(_CAUSAL_SUFFIXES)), None)


def is_causal_lm(model: Any) -> bool:
    """Whether faithfulness can be measured: `model` has an LM head, or its checkpoint names a causal-LM class.

    Parameters
    ----------
    model : what `load_model` returns (or the module inside it).

    No weights are loaded and nothing is run: it reads the class name and `config.architectures`.

    Example:
        >>> from featuretree.model import load_model
        >>> is_causal_lm(load_model())             # the embedded MiniLM: an encoder, no LM head
        False
    """
    module = _module(model)
    return _has_lm_head(module) or _causal_architecture(module) is not None


def causal_lm(model: Any):
    """`model` with its LM head: itself when it has one, else its local checkpoint loaded as AutoModelForCausalLM.

    Parameters
    ----------
    model : what `load_model` returns. A model loaded by name or path (`load_model("/models/SmolLM2-135M")`
        loads the base model, without the head) is loaded again, offline, from the same directory, on the
        same device and in the same dtype, and wrapped by `load_model` with the same tokenizer.

    Example:
        >>> from featuretree.model import load_model
        >>> lm = causal_lm(load_model("/models/SmolLM2-135M"))  # doctest: +SKIP
        >>> type(lm._module).__name__                            # doctest: +SKIP
        'LlamaForCausalLM'
    """
    from featuretree.model import get_tokenizer, is_remote, load_model, model_name, resolve_model_dir

    module = _module(model)
    if is_remote(model):
        raise FeatureTreeError("faithfulness runs the model locally: load it without remote=True "
                               "(load_model(name) with the weights on this machine)")
    if _has_lm_head(module):
        return model
    arch = _causal_architecture(module)
    if arch is None:
        raise FeatureTreeError(
            f"next-token effects (faithfulness, effects, upstream) need a causal LM with an LM head: "
            f"{type(module).__name__} is not one (its checkpoint "
            f"names {getattr(getattr(module, 'config', None), 'architectures', None)}); pass a decoder such as "
            "GPT-2 or SmolLM2 (a *ForCausalLM / *LMHeadModel, or a directory saved from one)")
    path = resolve_model_dir(model_name(model))
    if path is None:
        raise FeatureTreeError(
            f"{type(module).__name__} has no LM head and its checkpoint ({model_name(model)!r}) is not on this "
            f"machine to load {arch} from: pass the causal LM itself, e.g. "
            "load_model((AutoModelForCausalLM.from_pretrained(path), tokenizer))")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # as load_model: transformers' "Loading weights" bar garbles the log
    try:
        lm = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as e:
        raise FeatureTreeError(f"could not load {arch} from {path} for faithfulness ({e}): pass the causal LM "
                               "itself as a (module, tokenizer) pair") from e
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    log.info("loaded %s from %s for its LM head", type(lm).__name__, path)
    return load_model((lm, get_tokenizer(model)), device=device, dtype=dtype)


def _named(saes: Any) -> dict[str, Any]:
    """{rung name: dictionary} from a {width: SAE} / {rung: SAE} mapping, a list, or one dictionary."""
    if hasattr(saes, "encode") and hasattr(saes, "decode"):
        saes = [saes]
    if isinstance(saes, Mapping):
        named = {f"w{k}" if isinstance(k, int) else str(k): s for k, s in saes.items()}
    elif isinstance(saes, Sequence):
        named = {}
        for i, s in enumerate(saes):
            named[f"w{s.width}" if getattr(s, "width", None) is not None and f"w{s.width}" not in named
                  else str(i)] = s
    else:
        raise FeatureTreeError(f"saes must be a dictionary, a list of them or a {{width: SAE}} mapping, got "
                               f"{type(saes).__name__}")
    if not named:
        raise FeatureTreeError("no dictionaries to measure: pass at least one SAE")
    for rung, s in named.items():
        if not (callable(getattr(s, "encode", None)) and callable(getattr(s, "decode", None))):
            raise FeatureTreeError(f"rung {rung}: {type(s).__name__} has no encode / decode; pass TopKSAE objects")
    return named


def _reconstruct(sae: Any, rows: torch.Tensor) -> torch.Tensor:
    """decode(encode(rows)) in float32 on the dictionary's device, returned on the rows' device and dtype."""
    params = getattr(sae, "parameters", None)
    p = next(params(), None) if callable(params) else None
    x = rows.to(p.device if p is not None else rows.device, torch.float32)
    out = sae.decode(*sae.encode(x))
    if out.shape != x.shape:
        raise FeatureTreeError(f"the dictionary reconstructs rows of shape {tuple(out.shape[1:])} from the layer's "
                               f"{tuple(x.shape[1:])}: it was trained on another model or layer")
    return out.to(rows.device, rows.dtype)


_ZERO = object()  # the zero ablation's splice mode (a sentinel: a rung may be called anything, "zero" too)


class Splice:
    """A forward hook on a block that edits its output at chosen positions (what faithfulness and effects use).

    Set `mask` ((batch, seq) bool: the positions to edit) and `mode` before each forward: None leaves the
    output as it is, a dictionary replaces the rows by its reconstruction, and any other callable maps the
    (n, d_model) rows at the masked positions to their replacement. `d_model` records the block's width;
    `seen` (when `record` is True) the last rows at the masked positions, before any edit.

    Example:
        >>> import torch
        >>> block = torch.nn.Linear(2, 2)
        >>> hook = Splice(); handle = block.register_forward_hook(hook)
        >>> hook.mask, hook.mode = torch.tensor([[True, False]]), (lambda rows: torch.zeros_like(rows))
        >>> out = block(torch.ones(1, 2, 2)); handle.remove()
        >>> out[0, 0].tolist(), hook.d_model
        ([0.0, 0.0], 2)
    """

    def __init__(self, record: bool = False) -> None:
        self.mask: torch.Tensor | None = None  # (b, seq) bool: positions to replace
        self.mode: Any = None  # None: clean; _ZERO; a dictionary; or a callable on the rows
        self.d_model: int | None = None
        self.record, self.seen = bool(record), None

    def __call__(self, module, args, output):
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        self.d_model = int(hidden.shape[-1])
        if self.record and self.mask is not None:
            self.seen = hidden[self.mask.to(hidden.device)].detach()
        if self.mode is None or not bool(self.mask.any()):
            return None
        new = hidden.clone()
        mask = self.mask.to(hidden.device)
        if self.mode is _ZERO:
            new[mask] = 0.0
        elif hasattr(self.mode, "decode"):
            new[mask] = _reconstruct(self.mode, hidden[mask])
        else:
            new[mask] = self.mode(hidden[mask]).to(hidden.dtype)
        if isinstance(output, tuple):
            return (new, *output[1:])
        if isinstance(output, list):
            return [new, *output[1:]]
        return new


def splice_batch(tokenizer: Any, texts: Sequence[str], max_length: int, special: torch.Tensor):
    """Tokenize a batch for splicing: (encoding, positions to splice, predictions to count), all (b, seq) bool.

    Right-padded; the spliced positions are the real, non-special tokens (the harvest's rule); position t's
    prediction of token t + 1 counts when both are inside the attention mask.

    Parameters
    ----------
    tokenizer : the model's tokenizer.
    texts : the batch's documents.
    max_length : truncation, as in the harvest.
    special : the ids never spliced (`special_ids(tokenizer)` as a LongTensor).

    Example:
        >>> from featuretree.model import get_tokenizer, load_model
        >>> tok = get_tokenizer(load_model())
        >>> enc, spliced, count = splice_batch(tok, ["a cat", "dogs bark loudly"], 16, torch.tensor(special_ids(tok)))
        >>> spliced.sum(1).tolist(), count.sum(1).tolist()     # [CLS] and [SEP] are never spliced
        ([2, 3], [3, 4])
    """
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=int(max_length), return_tensors="pt",
                    return_special_tokens_mask=True, padding_side="right")
    real = enc["attention_mask"].bool()
    spliced = real & ~enc.pop("special_tokens_mask").bool() & ~torch.isin(enc["input_ids"], special)
    count = torch.zeros_like(real)
    count[:, :-1] = real[:, :-1] & real[:, 1:]
    return enc, spliced, count


def splice_blocker(site: str, saes=()) -> str | None:
    """Why a splice at `site` cannot stand for these dictionaries' features (faithfulness, effects), or None when
    it can: transcoders reconstruct another module's output than they read, and a ":normalized" site is a norm's
    output with its gain taken out, not the module output a splice replaces.

    Parameters
    ----------
    site : str
        The harvested site.
    saes : iterable of dictionaries

    Example:
        >>> splice_blocker("") is None, splice_blocker("ln_2:normalized")[:24]
        (True, 'the dictionaries read a ')
    """
    from featuretree.model import NORMALIZED

    if str(site).endswith(NORMALIZED):
        return (f"the dictionaries read a norm's output with its gain taken out ({site}), which is not the module "
                "output a splice replaces")
    if any((getattr(s, "metadata", None) or {}).get("transcoder") for s in saes):
        return "transcoders write another module than the one they read"
    return None


def faithfulness(
    model: Any,
    layer: int,
    saes: Any,
    texts: Sequence[str],
    *,
    max_tokens: int = 20_000,
    batch_size: int = 8,
    max_length: int = 128,
    progress: bool = True,
    site: str = "",
):
    """Loss recovered and KL of each rung's reconstruction spliced into block `layer` of a causal LM.

    Parameters
    ----------
    model : what `load_model` returns; a decoder with an LM head, or one loaded by name / path whose
        checkpoint has one (see `causal_lm`). Encoders (the embedded MiniLM) are refused.
    layer : the block whose output the dictionaries reconstruct (the harvested one; negative from the end).
    saes : a {width: TopKSAE} (what `train_ladder` returns), {rung: TopKSAE} (`tree.saes`), a list, or one
        dictionary; anything with `encode(x) -> codes` and `decode(*codes) -> x_hat` works.
    texts : held-out documents (never trained on), e.g. `heldout_texts(acts)`.
    max_tokens : predictions counted at most (documents are read in order until this many).
    batch_size : documents per forward.
    max_length : tokenizer truncation, as in the harvest.
    progress : a tqdm bar over the batches.
    site : the submodule of the block the dictionaries read ("mlp"; "" the block's output), as harvested.

    Returns a DataFrame with one row per rung: rung, ce_clean, ce_zero, ce_sae, loss_recovered
    = (ce_zero - ce_sae) / (ce_zero - ce_clean), kl (mean KL(clean || spliced) per prediction, nats) and
    n_tokens (predictions counted). The module docstring says exactly which positions are spliced and
    which predictions count.

    Example:
        >>> import transformers
        >>> from featuretree.model import get_tokenizer, load_model
        >>> from featuretree.sae import TopKSAE
        >>> tok = get_tokenizer(load_model())
        >>> lm = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2,
        ...                                   vocab_size=len(tok), n_positions=64))
        >>> df = faithfulness(load_model((lm, tok)), 0, {32: TopKSAE(16, 32, 4)}, ["a cat sat", "dogs bark"],
        ...                   progress=False)
        >>> list(df.columns), int(df.n_tokens[0])
        (['rung', 'ce_clean', 'ce_zero', 'ce_sae', 'loss_recovered', 'kl', 'n_tokens'], 7)
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from featuretree.model import check_layer, get_tokenizer, site_module

    for name, value in (("max_tokens", max_tokens), ("batch_size", batch_size), ("max_length", max_length)):
        if isinstance(value, bool) or int(value) <= 0:
            raise FeatureTreeError(f"{name}={value} must be a positive integer")
    named = _named(saes)
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise FeatureTreeError("faithfulness needs held-out texts: pass a non-empty list of documents")
    why = splice_blocker(site, named.values())
    if why is not None:
        raise FeatureTreeError(f"faithfulness cannot splice these dictionaries: {why}")
    lm = causal_lm(model)
    module = _module(lm)
    index = check_layer(lm, layer)
    block = site_module(lm, index, site)  # the module layer_module(lm, layer, site) wraps: what collect harvests
    tokenizer = get_tokenizer(lm)
    special = torch.tensor(special_ids(tokenizer), dtype=torch.long)
    accepted = forward_args(module)
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    hidden_size = getattr(getattr(module, "config", None), "hidden_size", None)
    for rung, s in named.items():
        d = getattr(s, "d_model", None)
        if d is not None and hidden_size is not None and int(d) != int(hidden_size):
            raise FeatureTreeError(f"rung {rung} has d_model {d} but block {index} of {type(module).__name__} outputs "
                                   f"{hidden_size} features: pass dictionaries trained on this model's layer")

    ce_sum = {"clean": 0.0, "zero": 0.0}  # summed over the counted predictions, in float64
    ce_rung, kl_rung = dict.fromkeys(named, 0.0), dict.fromkeys(named, 0.0)
    n_done, checked = 0, False
    splice = Splice()
    handle = block.register_forward_hook(splice)
    batches = range(0, len(texts), int(batch_size))
    bar = tqdm(batches, unit="batch", desc=f"faithfulness layer {index}", disable=not progress)
    try:
        with torch.no_grad():
            for b in bar:
                if n_done >= max_tokens:
                    break
                enc, spliced, count = splice_batch(tokenizer, texts[b:b + int(batch_size)], max_length, special)
                count = count[:, :-1]  # (b, seq - 1): position t's prediction of token t + 1
                count &= (count.reshape(-1).cumsum(0) <= max_tokens - n_done).reshape(count.shape)
                n = int(count.sum())
                if n == 0:
                    continue
                splice.mask = spliced
                inputs = {k: v.to(device) for k, v in enc.items() if k in accepted}
                targets = enc["input_ids"][:, 1:][count]

                def logprobs(mode, inputs=inputs, count=count):
                    splice.mode = mode
                    logits = module(**inputs).logits  # on the last block's device (device_map spreads them)
                    logits = logits[:, :-1][count.to(logits.device)].float()  # (n, vocab)
                    return torch.log_softmax(logits, dim=-1)

                clean = logprobs(None)
                targets = targets.to(clean.device)
                if not checked and splice.d_model is not None:  # the block's real width (config may not say)
                    for rung, s in named.items():
                        d = getattr(s, "d_model", None)
                        if d is not None and int(d) != splice.d_model:
                            raise FeatureTreeError(
                                f"rung {rung} has d_model {d} but block {index} outputs {splice.d_model} features: "
                                "pass dictionaries trained on this model's layer")
                    checked = True
                p_clean = clean.exp()

                def nll(lp, targets=targets):
                    return float(-lp.gather(1, targets[:, None]).double().sum())

                ce_sum["clean"] += nll(clean)
                ce_sum["zero"] += nll(logprobs(_ZERO))
                for rung, s in named.items():
                    spliced = logprobs(s)
                    ce_rung[rung] += nll(spliced)
                    kl_rung[rung] += float((p_clean * (clean - spliced)).sum(-1).double().sum())
                n_done += n
                bar.set_postfix(tokens=n_done, refresh=False)
    finally:
        handle.remove()
        splice.mode = None
    if n_done == 0:
        raise FeatureTreeError("the texts gave no next-token predictions (each needs at least two tokens): "
                               "pass longer documents")
    rows = []
    ce_clean, ce_zero = ce_sum["clean"] / n_done, ce_sum["zero"] / n_done
    gap = ce_zero - ce_clean
    if not gap > 0:
        log.warning("zero-ablating block %d does not raise the loss (CE %.4f -> %.4f): loss recovered, a share "
                    "of that rise, means nothing here (is the model trained?)", index, ce_clean, ce_zero)
    for rung in named:
        ce_sae = ce_rung[rung] / n_done
        rows.append({"rung": rung, "ce_clean": ce_clean, "ce_zero": ce_zero, "ce_sae": ce_sae,
                     "loss_recovered": (ce_zero - ce_sae) / gap if gap != 0 else math.nan,
                     "kl": kl_rung[rung] / n_done, "n_tokens": n_done})
        log.info("rung %s: loss recovered %.4f  KL %.4f  (CE clean %.4f, sae %.4f, zero %.4f; %d tokens)", rung,
                 rows[-1]["loss_recovered"], rows[-1]["kl"], ce_clean, ce_sae, ce_zero, n_done)
    return pd.DataFrame(rows, columns=["rung", "ce_clean", "ce_zero", "ce_sae", "loss_recovered", "kl", "n_tokens"])


def heldout_texts(acts: Any, max_docs: int = 200) -> list[str]:
    """The store's held-out documents (`doc_id % acts.heldout_every == 0`), in doc-id order, at most `max_docs`.

    Parameters
    ----------
    acts : an `Activations` store (anything with `texts()` -> {doc_id: text} and `heldout_every`).
    max_docs : documents returned at most.

    A store that holds nothing out (heldout_every=0) gives its training documents, with a warning.

    Example:
        >>> from types import SimpleNamespace
        >>> store = SimpleNamespace(heldout_every=2, texts=lambda: {0: "a", 1: "b", 2: "c", 4: "e"})
        >>> heldout_texts(store, max_docs=2)
        ['a', 'c']
    """
    docs = acts.texts()
    every = int(acts.heldout_every)
    ids = sorted(d for d in docs if every and d % every == 0)
    if not ids:
        log.warning("the store holds no documents out (heldout_every=%d): measuring faithfulness on training "
                    "documents", every)
        ids = sorted(docs)
    return [docs[d] for d in ids[:max(int(max_docs), 0)]]


def record_faithfulness(
    model: Any,
    layer: int,
    saes: Any,
    acts: Any,
    out: str | os.PathLike | None = None,
    *,
    max_tokens: int = 20_000,
    max_docs: int = 200,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = True,
    site: str = "",
):
    """`faithfulness` on a store's held-out documents, written to OUT/faithfulness.json and each rung's `.metrics`.

    Parameters
    ----------
    model, layer, saes : as for `faithfulness`.
    acts : the `Activations` store the dictionaries were trained on (its held-out documents are used).
    out : the run directory for faithfulness.json (None: nothing written).
    max_tokens, max_docs : predictions and held-out documents read at most (seconds to a minute).
    batch_size : documents per forward.
    max_length : tokenizer truncation (default: the harvest's, from the store's meta.json).
    progress : a tqdm bar.
    site : as for `faithfulness`.

    Each dictionary's `.metrics` gains loss_recovered, kl, ce_clean, ce_sae and ce_zero, so saving it
    afterwards puts them in its cfg.json. `build` calls this for causal LMs before saving the ladder.

    Example:
        >>> df = record_faithfulness(load_model("/models/SmolLM2-135M"), 6, saes, acts, "runs/smol")  # doctest: +SKIP
        >>> saes[512].metrics["loss_recovered"]                                                   # doctest: +SKIP
        0.93
    """
    named = _named(saes)
    if max_length is None:
        max_length = int(getattr(acts, "meta", {}).get("max_length", 128))
    texts = heldout_texts(acts, max_docs)
    frame = faithfulness(model, layer, named, texts, max_tokens=max_tokens, batch_size=batch_size,
                         max_length=max_length, progress=progress, site=site)
    for row in frame.itertuples(index=False):
        named[row.rung].metrics = {**getattr(named[row.rung], "metrics", {}),
                                   **{k: float(getattr(row, k)) for k in METRIC_KEYS}}
    if out is not None:
        from featuretree.model import check_layer, model_name

        write_json(Path(out) / FAITHFUL_FILE, {
            "model": model_name(model), "layer": check_layer(model, layer), **({"site": site} if site else {}),
            "n_docs": len(texts),
            "max_length": int(max_length), "max_tokens": int(max_tokens),
            "rungs": [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                      for r in frame.to_dict("records")]})
    return frame
