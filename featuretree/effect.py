"""effect: what a feature does to a causal LM: the loss change when it is ablated, the tokens it promotes, steering.

Three views of one node's feature (its decoder row d = W_dec[j] in its rung's dictionary, at the run's layer):

    ablation   run the model on texts where the node fires, once clean and once with the feature's own
               contribution a_j * d removed from the block output at the positions where it fires (the rest
               of the reconstruction and the dictionary's error stay: x -> x - a_j d, as SAE circuit work
               ablates a latent). loss_change = mean over those positions of CE_ablated - CE_clean for the
               next token (nats; > 0: the feature helped predict it); loss_change_after counts every
               prediction from the first firing position on (what the ablation did downstream too).
               The same for the node's subtree: per deeper rung, all its descendants there ablated together.
    logits     "logit lens": the unembedding applied to d (through the final norm's gain): the tokens it
               promotes and suppresses directly; and, measured, the mean drop of each token's log-probability
               when the feature is ablated at its firing positions (what it promotes on real contexts).
    steering   the top next tokens at the end of a prompt when `scale` x the feature's typical activation
               x d is added to the block output at every real position, against the clean model's.

Firing follows the tree's rule (`fire_rungs`: stored thresholds, gates of refined rungs) on the activations
the forward pass itself produces, so the positions are exactly where the node fires in those texts.
Encoders (the embedded MiniLM) have no next token: `effects` needs a causal LM (see `faithful.causal_lm`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from featuretree.config import FeatureTreeError
from featuretree.faithful import Splice, causal_lm, splice_batch, splice_blocker
from featuretree.firing import fire_rungs, tree_layer, tree_model, tree_site
from featuretree.harvest import forward_args, special_ids

__all__ = ["effects", "Effects", "feature_logits", "firing_texts", "steer"]

log = logging.getLogger(__name__)


@dataclass
class Effects:
    """What `effects` measured for one node: a summary and four tables (DataFrames); str() reads it out.

    Example:
        >>> e = effects(tree, "w512/7")                                        # doctest: +SKIP
        >>> e.summary["loss_change"], e.logits[e.logits.by == "lens"].token[:5]  # doctest: +SKIP
    """

    node: str
    summary: dict
    """n_docs, n_firing (positions), activation (mean where it fires), loss_change, loss_change_after."""
    docs: pd.DataFrame
    """Per document: doc, n_firing, loss_change, loss_change_after, text."""
    subtree: pd.DataFrame
    """Per rung of the node's subtree: rung, n_features ablated together, n_firing, loss_change, loss_change_after."""
    logits: pd.DataFrame
    """direction (promoted / suppressed), by (lens / measured: which score ranked the row), rank, token, lens
    (the logit the decoder row gives it), measured (mean drop of its log-probability when the feature is
    ablated where it fires)."""
    steering: pd.DataFrame
    """rank, token, p_steered, p_clean at the end of the prompt, and the prompt and scale used."""

    def __str__(self) -> str:
        s = self.summary
        lines = [f"{self.node}: fires at {s['n_firing']} positions of {s['n_docs']} texts (mean activation "
                 f"{s['activation']:.3g})",
                 f"  ablated: next-token loss {s['loss_change']:+.4f} nats where it fires, "
                 f"{s['loss_change_after']:+.4f} over every later prediction"]
        for r in self.subtree.itertuples():
            lines.append(f"  subtree {r.rung:<14} {r.n_features:>3} features ablated together: "
                         f"{r.loss_change:+.4f} where they fire ({r.n_firing} positions), {r.loss_change_after:+.4f} after")
        for direction in ("promoted", "suppressed"):
            for by in ("lens", "measured"):
                sub = self.logits[(self.logits.direction == direction) & (self.logits.by == by)]
                lead = f"  {direction}:" if by == "lens" else " " * (len(direction) + 3)
                lines.append(f"{lead} {by:<8} " + (", ".join(repr(t) for t in sub.token.head(8)) or "(none)"))
        if len(self.steering):
            st = self.steering.iloc[0]
            lines.append(f"  steering {st.prompt!r} at {st.scale:g}x: " + ", ".join(
                f"{r.token!r} {r.p_steered:.2f} (clean {r.p_clean:.2f})" for r in self.steering.head(6).itertuples()))
        return "\n".join(lines)


def _node(tree, node: str) -> tuple[str, int, Any]:
    g = tree.graph
    if node not in g or g.nodes[node].get("virtual") or "rung" not in g.nodes[node]:
        raise FeatureTreeError(f"{node!r} is not a feature of this tree: ids look like 'w512/7'; list them with "
                               "ft.to_frame(tree)")
    rung = str(g.nodes[node]["rung"])
    if rung not in tree.saes:
        raise FeatureTreeError(f"the tree has no dictionary for rung {rung}: load the run with its saes/")
    return rung, int(g.nodes[node]["index"]), tree.saes[rung]


def _head(lm) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The unembedding (vocab, d_model) and the final norm's gain (d_model,), if the model has one."""
    module = getattr(lm, "_module", lm)
    W_U = module.get_output_embeddings().weight.detach().float()
    base = getattr(module, "base_model", module)
    for name in ("norm", "ln_f", "final_layer_norm", "final_layernorm"):
        w = getattr(getattr(base, name, None), "weight", None)
        if isinstance(w, torch.Tensor) and w.shape[-1] == W_U.shape[1]:
            return W_U, w.detach().float()
    return W_U, None


def _tokens(tokenizer, ids) -> list[str]:
    return [tokenizer.decode([int(i)]) for i in ids]


def _lens(tree, node: str, lm) -> torch.Tensor:
    """W_U (g * d): the logit each token gets directly from the node's decoder row (vocab,)."""
    _, j, sae = _node(tree, node)
    W_U, gain = _head(lm)
    d = sae.W_dec[j].detach().float().to(W_U.device)
    return (W_U @ (d * gain.to(W_U.device) if gain is not None else d)).cpu()


def _top_tokens(tokenizer, scores: dict[str, torch.Tensor], top: int) -> pd.DataFrame:
    """Per direction, the `top` tokens by each score (promoted: largest positive; suppressed: most negative),
    each row with every score; rank within (direction, by)."""
    rows = []
    for direction, sign in (("promoted", 1.0), ("suppressed", -1.0)):
        for by, vals in scores.items():
            v, i = torch.topk(sign * vals, min(int(top), len(vals)))
            keep = [int(k) for k, x in zip(i.tolist(), v.tolist()) if x > 0]
            for r, (k, t) in enumerate(zip(keep, _tokens(tokenizer, keep))):
                rows.append({"direction": direction, "by": by, "rank": r + 1, "token": t,
                             **{name: float(s[k]) for name, s in scores.items()}})
    return pd.DataFrame(rows, columns=["direction", "by", "rank", "token", *scores])


def feature_logits(tree, node: str, *, model: Any = None, top: int = 10) -> pd.DataFrame:
    """The tokens a node's decoder direction promotes and suppresses directly ("logit lens"): W_U (g * d).

    Parameters
    ----------
    tree : FeatureTree
    node : str
        A feature id, e.g. "w512/7".
    model : optional
        The causal LM (anything `load_model` takes); default the tree's own model.
    top : int
        Tokens per direction.

    Returns a DataFrame: direction ("promoted": positive logits, largest first; "suppressed": negative, most
    negative first), by ("lens"), rank, token, lens (the logit).

    Example:
        >>> feature_logits(tree, "w512/7").head(3)  # doctest: +SKIP
    """
    from featuretree.model import get_tokenizer

    _node(tree, node)
    lm = causal_lm(tree_model(tree, model))
    return _top_tokens(get_tokenizer(lm), {"lens": _lens(tree, node, lm)}, top)


def _typical_activation(tree, node: str) -> float | None:
    d = tree.graph.nodes[node]
    at, rel = d.get("fire_at"), tree.graph.graph.get("fire_rel", 0.25)
    return float(at) / float(rel) if at is not None and np.isfinite(float(at)) and rel else None


def steer(tree, node: str, prompt: str, *, scale: float = 4.0, activation: float | None = None, model: Any = None,
          layer: int | None = None, top: int = 10) -> pd.DataFrame:
    """The top next tokens after `prompt` when the node's direction is added at its layer, against the clean model's.

    Parameters
    ----------
    tree : FeatureTree
    node : str
    prompt : str
        The text whose next token is read.
    scale : float
        How many times the feature's typical activation is added (negative: subtracted).
    activation : float, optional
        The typical activation (default: the node's firing threshold / fire_rel, i.e. its 90th-percentile
        activation when linked; 1.0 where the tree stores none).
    model, layer : optional
        Default: the tree's model and layer.
    top : int
        Tokens returned (the most likely under steering).

    Returns a DataFrame: rank, token, p_steered, p_clean, prompt, scale.

    Example:
        >>> steer(tree, "w512/7", "The weather today is", scale=8).token.head(3)  # doctest: +SKIP
    """
    rung, j, sae = _node(tree, node)
    lm = causal_lm(tree_model(tree, model))
    a = activation if activation is not None else (_typical_activation(tree, node) or 1.0)
    d = sae.W_dec[j].detach().float() * float(scale) * float(a)
    probs = {}
    with _spliced(lm, tree_layer(tree, layer), tree) as (module, block, splice, tok, special, accepted, device):
        enc, mask, _ = splice_batch(tok, [prompt], 512, special)
        last = int(enc["attention_mask"][0].sum()) - 1
        inputs = {k: v.to(device) for k, v in enc.items() if k in accepted}
        splice.mask = mask
        for name, mode in (("clean", None), ("steered", lambda rows: rows + d.to(rows.device, rows.dtype))):
            splice.mode = mode
            probs[name] = torch.softmax(module(**inputs).logits[0, last].float(), -1).cpu()
    p, i = torch.topk(probs["steered"], min(int(top), len(probs["steered"])))
    return pd.DataFrame({"rank": np.arange(1, len(i) + 1), "token": _tokens(tok, i.tolist()),
                         "p_steered": p.numpy(), "p_clean": probs["clean"][i].numpy(), "prompt": prompt,
                         "scale": float(scale)})


class _spliced:
    """Context: the causal LM's module, block `layer` with a recording Splice hook, tokenizer, special ids."""

    def __init__(self, lm, layer: int, tree) -> None:
        from featuretree.model import get_tokenizer, site_module

        site = tree_site(tree)
        why = splice_blocker(site, tree.saes.values())
        if why is not None:
            raise FeatureTreeError(f"effects edit the module the features read with their decoder directions, "
                                   f"so effects are not supported for this tree: {why}")
        self.module = getattr(lm, "_module", lm)
        self.block = site_module(lm, layer, site)  # the module whose output the tree's features read
        self.tok = get_tokenizer(lm)
        self.special = torch.tensor(special_ids(self.tok), dtype=torch.long)
        param = next(self.module.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")
        self.splice = Splice(record=True)

    def __enter__(self):
        self.handle = self.block.register_forward_hook(self.splice)
        self.grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        return (self.module, self.block, self.splice, self.tok, self.special, forward_args(self.module), self.device)

    def __exit__(self, *exc) -> None:
        self.handle.remove()
        torch.set_grad_enabled(self.grad)


def firing_texts(tree, node: str, max_docs: int = 16) -> list[str]:
    """Held-out texts of the run's store where `node` fires, the texts with the most firing tokens first.

    Parameters
    ----------
    tree : FeatureTree
        A tree loaded from a run directory (its `acts/` store).
    node : str
        The feature, e.g. "w512/7".
    max_docs : int
        Texts returned at most.

    Example:
        >>> firing_texts(tree, "w512/7", 3)  # doctest: +SKIP
    """
    from featuretree.activations import Activations
    from featuretree.utils import store_path

    store = store_path(tree)
    if store is None or not (store / "meta.json").is_file():
        raise FeatureTreeError("this tree has no activation store to find texts where the node fires: pass texts=[...]")
    acts = Activations(store)
    rung, j, _ = _node(tree, node)
    toks = acts.tokens("heldout")
    rows = fire_rungs(tree, acts.load("heldout"), [rung])[rung][:, j].nonzero()[0]
    if not len(rows):
        raise FeatureTreeError(f"{node} fires on none of the store's held-out tokens: pass texts=[...] where it fires")
    counts = toks["doc_id"].iloc[rows].value_counts()
    texts = acts.texts()
    return [texts[int(d)] for d in counts.index[:int(max_docs)] if int(d) in texts]


def _ablation_sets(tree, node: str) -> list[tuple[str, list[int]]]:
    """(rung, feature indices) to ablate: the node alone, then each deeper rung's descendants together."""
    import networkx as nx

    g = tree.graph
    rung, j, _ = _node(tree, node)
    sets = [(rung, [j])]
    by_rung: dict[str, list[int]] = {}
    for n in nx.descendants(g, node):
        d = g.nodes[n]
        if not d.get("virtual") and "rung" in d and str(d["rung"]) in tree.saes and str(d["rung"]) != rung:
            by_rung.setdefault(str(d["rung"]), []).append(int(d["index"]))
    from featuretree.utils import rung_key

    return sets + [(r, sorted(v)) for r, v in sorted(by_rung.items(), key=lambda kv: rung_key(kv[0]))]


def effects(tree, node: str, texts: list[str] | None = None, *, model: Any = None, layer: int | None = None,
            max_docs: int = 16, max_length: int = 128, batch_size: int = 8, top: int = 10,
            prompt: str | None = None, scale: float = 4.0, subtree: bool = True, progress: bool = True) -> Effects:
    """What a node's feature does to a causal LM: ablation loss change (node and subtree), promoted and
    suppressed tokens (lens and measured), and steering (the module docstring defines each).

    Parameters
    ----------
    tree : FeatureTree
        A tree built on a causal LM (SmolLM2, GPT-2, any *ForCausalLM).
    node : str
        The feature, e.g. "w512/7" (refined nodes too: they fire only where their gate does).
    texts : list of str, optional
        Documents to measure on (default: up to `max_docs` held-out texts of the run's store where it fires).
    model, layer : optional
        Default: the tree's own model and layer.
    max_docs, max_length, batch_size : int
        Default texts at most; tokenizer truncation; documents per forward.
    top : int
        Tokens per direction in the logits table; steering's top tokens.
    prompt : str, optional
        Steering's prompt (default: the first words of the first text, up to its first firing word).
    scale : float
        Steering strength in units of the feature's mean activation on the texts.
    subtree : bool
        Also ablate the node's descendants, rung by rung.
    progress : bool

    Example:
        >>> e = effects(tree, "w512/7")  # doctest: +SKIP
        >>> e.summary["loss_change"], e.logits.head()  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    rung, j, sae = _node(tree, node)
    layer = tree_layer(tree, layer)
    lm = causal_lm(tree_model(tree, model))
    if texts is None:
        texts = firing_texts(tree, node, max_docs)
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise FeatureTreeError("effects needs texts where the node fires: pass a non-empty list")
    sets = _ablation_sets(tree, node)
    if not subtree:
        sets = sets[:1]
    rungs = sorted({r for r, _ in sets})
    stats = [{"n": 0, "dl": 0.0, "n_after": 0, "dl_after": 0.0} for _ in sets]
    docs, drop_sum, act_sum, first_fire = [], None, 0.0, None
    with _spliced(lm, layer, tree) as (module, block, splice, tok, special, accepted, device):
        for b in tqdm(range(0, len(texts), int(batch_size)), desc=f"effects {node}", unit="batch",
                      disable=not progress):
            batch = texts[b:b + int(batch_size)]
            enc, mask, count = splice_batch(tok, batch, max_length, special)
            inputs = {k: v.to(device) for k, v in enc.items() if k in accepted}
            ids = enc["input_ids"]
            splice.mask, splice.mode = mask, None
            clean = torch.log_softmax(module(**inputs).logits.float(), -1).cpu()  # (b, seq, vocab)
            rows = splice.seen.float().cpu()
            F = fire_rungs(tree, rows, rungs)
            pos = mask.nonzero()  # (n_rows, 2): (doc in batch, position) of each spliced row
            nll_clean = -clean[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)  # (b, seq-1)
            for s, (r, feats) in enumerate(sets):
                sae_r = tree.saes[r]
                idx = torch.tensor(feats, dtype=torch.long)
                v, i = sae_r.encode(rows.to(next(sae_r.parameters()).device))
                v, i = v.detach().float().cpu(), i.cpu()
                fires = torch.from_numpy(F[r][:, feats].toarray() > 0)  # (n_rows, |S|)
                hit = (i[:, :, None] == idx[None, None, :])  # (n_rows, k, |S|)
                a = (v[:, :, None] * hit).sum(1) * fires  # (n_rows, |S|) activation where it fires
                any_fire = fires.any(1)
                if not bool(any_fire.any()):
                    continue
                contrib = a @ sae_r.W_dec.detach().float().cpu()[idx]  # (n_rows, d_model)
                splice.mode = lambda x, c=contrib: x - c.to(x.device, x.dtype)
                abl = torch.log_softmax(module(**inputs).logits.float(), -1).cpu()
                splice.mode = None
                nll_abl = -abl[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)
                at = torch.zeros_like(mask)
                at[pos[any_fire, 0], pos[any_fire, 1]] = True
                at_c = at[:, :-1] & count[:, :-1]
                first = torch.where(at.any(1), at.float().argmax(1), torch.full((len(batch),), at.shape[1]))
                after = (torch.arange(at.shape[1] - 1)[None, :] >= first[:, None]) & count[:, :-1]
                dl = nll_abl - nll_clean
                st = stats[s]
                st["n"] += int(at_c.sum())
                st["dl"] += float(dl[at_c].double().sum())
                st["n_after"] += int(after.sum())
                st["dl_after"] += float(dl[after].double().sum())
                if s == 0:
                    act_sum += float(a[any_fire].sum())
                    drop = (clean[:, :-1] - abl[:, :-1])[at_c].double().sum(0)  # (vocab,)
                    drop_sum = drop if drop_sum is None else drop_sum + drop
                    for k in range(len(batch)):
                        nk, na = int(at_c[k].sum()), int(after[k].sum())
                        docs.append({"doc": b + k, "n_firing": int(at[k].sum()),
                                     "loss_change": float(dl[k][at_c[k]].mean()) if nk else float("nan"),
                                     "loss_change_after": float(dl[k][after[k]].mean()) if na else float("nan"),
                                     "text": batch[k]})
                        if first_fire is None and nk:
                            first_fire = (batch[k], int(first[k]))
    st0 = stats[0]
    if st0["n"] == 0:
        raise FeatureTreeError(f"{node} fires on none of the {len(texts)} texts' predicting positions: pass texts "
                               "where it fires (default: the run's held-out texts where it does)")
    n_fire = sum(d["n_firing"] for d in docs)
    summary = {"n_docs": len(texts), "n_firing": n_fire, "activation": act_sum / max(n_fire, 1),
               "loss_change": st0["dl"] / st0["n"], "loss_change_after": st0["dl_after"] / max(st0["n_after"], 1)}
    sub_rows = [{"rung": r, "n_features": len(f), "n_firing": st["n"],
                 "loss_change": st["dl"] / st["n"] if st["n"] else float("nan"),
                 "loss_change_after": st["dl_after"] / st["n_after"] if st["n_after"] else float("nan")}
                for (r, f), st in zip(sets[1:], stats[1:])]
    from featuretree.model import get_tokenizer

    tok = get_tokenizer(lm)
    logits = _top_tokens(tok, {"lens": _lens(tree, node, lm), "measured": (drop_sum / st0["n"]).float()}, top)
    if prompt is None:
        text, t = first_fire
        offsets = tok(text, return_offsets_mapping=True, truncation=True, max_length=max_length)["offset_mapping"]
        cut = offsets[t][0] if t < len(offsets) and offsets[t][0] > 0 else len(text)
        prompt = text[:cut].rstrip() or text
    steering = steer(tree, node, prompt, scale=scale, activation=summary["activation"], model=lm, layer=layer,
                     top=top)
    log.info("%s: loss change %+.4f where it fires (%d positions, %d texts)", node, summary["loss_change"], n_fire,
             len(texts))
    return Effects(node, summary, pd.DataFrame(docs), pd.DataFrame(sub_rows, columns=[
        "rung", "n_features", "n_firing", "loss_change", "loss_change_after"]), logits, steering)
