"""Every sparse dictionary featuretree reads as a rung besides its own TopK: JumpReLU, BatchTopK, ReLU and gated
SAEs and (JumpReLU / ReLU) transcoders from SAELens' layout, Gemma Scope's params.npz and dictionary_learning's
(converted) files;
`load_dictionary` picks the reader by what a directory holds. They are loaded, never trained here.

    pre  = (x - b_dec) @ W_enc + b_enc                  # every one of them (b_dec folded where a source skips it)
    acts = relu(pre) * (pre > threshold)                # JumpReLU / BatchTopK / ReLU (threshold 0)
    acts = relu((pre - b_gate) * exp(r_mag) + b_mag) * (pre > 0)   # gated: pre uses b_gate as its b_enc

Each yields the strongest `max_codes` active features per token as (values, indices), zero-padded, so linking,
labels, find and the explorer read it as they read a TopK rung.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from featuretree.config import FeatureTreeError
from featuretree.sae import (
    CFG_FILE,
    WEIGHTS_FILE,
    TopKSAE,
    check_raw_inputs,
    check_weights,
    fill_weights,
    read_weights,
)

__all__ = ["DL_CONFIG", "DL_CONVERT", "DL_WEIGHTS", "GatedSAE", "GEMMA_SCOPE_WEIGHTS", "load_dictionary", "MAX_CODES",
           "THRESHOLD_ARCHITECTURES", "ThresholdSAE"]

log = logging.getLogger(__name__)

MAX_CODES = 128
"""Codes a threshold dictionary returns per token at most (its `k`): the strongest, the rest dropped and counted."""

THRESHOLD_ARCHITECTURES = ("jumprelu", "batchtopk", "relu", "gated")
"""featuretree's names: JumpReLU (a threshold per feature), BatchTopK at inference (one threshold for all
features), ReLU / L1 ("standard" in SAELens; it fires wherever the pre-activation is positive), gated (a gate
decides where a feature fires, a rescaled magnitude path how strongly)."""

GEMMA_SCOPE_WEIGHTS = "params.npz"  # Gemma Scope's own files: W_enc, W_dec, b_enc, b_dec, threshold
DL_CONFIG = "config.json"  # dictionary_learning: {"trainer": {"dict_class": ..., "k": ..., "layer": ...}, ...}
DL_WEIGHTS = "ae.safetensors"  # dictionary_learning's ae.pt, converted once (its state_dict, names unchanged)
DL_CONVERT = ("python -c \"import torch; from safetensors.torch import save_file; save_file({k: v.contiguous() "
              "for k, v in torch.load('ae.pt', weights_only=True).items()}, 'ae.safetensors')\"")
"""The one line that converts dictionary_learning's ae.pt (a pickle) where the file is trusted; `.contiguous()`
because its encoder weights are transposed views, which safetensors refuses."""


class ThresholdSAE(TopKSAE):
    """A sparse dictionary whose features fire where their pre-activation clears a threshold, not by rank:
    JumpReLU (Gemma Scope; a threshold per feature), BatchTopK at inference (one global threshold) or a
    ReLU / L1 SAE (threshold 0). It is a rung like any other: `encode` gives (values, indices) of the
    strongest `k` (= max_codes) active features of each token, zero-padded where fewer are active, so
    linking, labels, find and the explorer read it as they read a TopK rung. It is loaded, not trained
    (local dictionaries of a refinement stay TopK).

        pre  = (x - b_dec) @ W_enc + b_enc
        acts = relu(pre) * (pre > threshold)      # SAELens' JumpReLU; threshold 0 is a ReLU SAE

    Parameters
    ----------
    d_model, width : int
        Input size and number of features.
    threshold : float or Tensor (width,)
        Where each feature starts to fire (a float: the same for all).
    architecture : str
        "jumprelu", "batchtopk" or "relu" (what it was trained as; the encoding is the formula above).
    max_codes : int
        Most codes per token kept (`k`); a token with more active features keeps its strongest (counted
        in `over_cap`, and warned about once).
    metadata : dict, optional
        Facts saved in cfg.json.

    Example:
        >>> sae = ThresholdSAE(4, 6, threshold=0.5, architecture="jumprelu", max_codes=3)
        >>> with torch.no_grad():
        ...     _ = sae.W_enc.copy_(torch.eye(4, 6)), sae.b_enc.zero_(), sae.b_dec.zero_()
        >>> v, i = sae.encode(torch.tensor([[1.0, 0.2, 0.7, 0.0]]))
        >>> [(j, round(a, 2)) for j, a in zip(i[0].tolist(), v[0].tolist()) if a > 0]  # 0.2 is under the threshold
        [(0, 1.0), (2, 0.7)]
    """

    def __init__(self, d_model: int, width: int, threshold: float | Tensor = 0.0, *, architecture: str = "jumprelu",
                 max_codes: int = MAX_CODES, metadata: dict[str, Any] | None = None) -> None:
        if architecture not in THRESHOLD_ARCHITECTURES:
            raise FeatureTreeError(f"architecture {architecture!r} does not fire by threshold: use one of "
                                   f"{', '.join(THRESHOLD_ARCHITECTURES)}")
        if int(max_codes) < 1:
            raise FeatureTreeError(f"max_codes={max_codes} must be at least 1")
        super().__init__(d_model, width, max(1, min(int(max_codes), int(width) - 1)), seed=None, metadata=metadata)
        self.architecture = architecture
        t = torch.as_tensor(threshold, dtype=torch.float32)
        if t.dim() == 0:
            t = t.expand(int(width))
        if tuple(t.shape) != (int(width),):
            raise FeatureTreeError(f"threshold has shape {tuple(t.shape)}; expected a number or ({width},)")
        self.register_buffer("threshold", t.clone())
        self.requires_grad_(False)
        self.over_cap = 0  # tokens that had more than k active features (their weakest were dropped)
        self._warned = False

    def activations(self, x: Tensor) -> Tensor:
        """Dense feature activations relu(pre) * (pre > threshold), shape (n, width).

        Example:
            >>> ThresholdSAE(8, 32, 0.1).activations(torch.randn(3, 8)).shape
            torch.Size([3, 32])
        """
        with torch.no_grad():
            pre = self.preacts(x.to(device=self.W_enc.device, dtype=self.W_enc.dtype))
            return F.relu(pre) * (pre > self.threshold)

    def encode(self, x: Tensor, *, k: int | None = None, among: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The strongest `k` active features of each row: (values (n, k) >= 0, zero where fewer are active;
        indices (n, k) int64). `among` (a (width,) bool mask) keeps only those features.

        Example:
            >>> v, i = ThresholdSAE(8, 32, 10.0).encode(torch.randn(3, 8))  # a high threshold: nothing fires
            >>> float(v.abs().sum()), i.shape
            (0.0, torch.Size([3, 31]))
        """
        acts = self.activations(x)
        if among is not None:
            acts = acts.masked_fill(~among, 0.0)
        k = int(k or self.k)
        values, indices = torch.topk(acts, k, dim=1)
        over = int(((acts > 0).sum(1) > k).sum())
        if over:
            self.over_cap += over
            if not self._warned:
                self._warned = True
                log.warning("%s dictionary (width %d): %d of %d tokens have more than %d active features; the weakest "
                            "are dropped (raise max_codes to keep them)", self.architecture, self.width, over,
                            acts.shape[0], k)
        return values, indices

    def dense_codes(self, x: Tensor) -> Tensor:
        """All active features' activations (n, width), none dropped.

        Example:
            >>> ThresholdSAE(8, 32, 0.0).dense_codes(torch.randn(3, 8)).shape
            torch.Size([3, 32])
        """
        return self.activations(x)

    @torch.no_grad()
    def prefix(self, width: int) -> ThresholdSAE:
        """The first `width` features as a dictionary of their own, thresholds kept (a Matryoshka prefix).

        Example:
            >>> ThresholdSAE(8, 32, 0.1).prefix(16).threshold.shape
            torch.Size([16])
        """
        if not 1 < width <= self.width:
            raise FeatureTreeError(f"prefix width {width} must be between 2 and {self.width}")
        out = self._empty(width)
        for name, t in self._per_feature().items():
            getattr(out, name).copy_(t[:width])
        out.W_enc.copy_(self.W_enc[:, :width])
        out.W_dec.copy_(self.W_dec[:width])
        out.b_dec.copy_(self.b_dec)
        if getattr(self, "W_skip", None) is not None:
            out.register_buffer("W_skip", self.W_skip.clone())
        return out

    def _empty(self, width: int) -> ThresholdSAE:  # a dictionary of this kind with `width` features, to fill
        return ThresholdSAE(self.d_model, width, 0.0, architecture=self.architecture, max_codes=self.k,
                            metadata=dict(self.metadata))

    def _per_feature(self) -> dict[str, Tensor]:  # the (width,) tensors a prefix slices
        return {"b_enc": self.b_enc, "threshold": self.threshold}

    def cfg_dict(self) -> dict[str, Any]:
        """SAELens-style cfg.json: architecture "jumprelu" (JumpReLU, BatchTopK) or "standard" (ReLU).

        Example:
            >>> ThresholdSAE(8, 32, 0.0, architecture="relu").cfg_dict()["architecture"]
            'standard'
        """
        out = super().cfg_dict()
        out.pop("k")
        out["architecture"] = "standard" if self.architecture == "relu" else "jumprelu"
        out["metadata"] = {**out["metadata"], "featuretree_architecture": self.architecture,
                           "featuretree_max_codes": self.k}
        if self.metadata.get("transcoder"):  # SAELens' transcoder layout: no input centring, d_out
            kind = "skip_transcoder" if getattr(self, "W_skip", None) is not None else "transcoder"
            out.update(architecture=kind if self.architecture == "relu" else f"jumprelu_{kind}",
                       d_out=self.d_model, apply_b_dec_to_input=False,
                       hook_name=self.metadata.get("hook_name"), hook_name_out=self.metadata.get("hook_name_out"))
        return out

    def _saved_tensors(self) -> dict[str, Tensor]:  # `save` writes "threshold" too, except for a ReLU SAE
        out = {**super()._saved_tensors(), **({} if self.architecture == "relu" else {"threshold": self.threshold})}
        if self.metadata.get("transcoder"):  # b_enc as the transcoder reads x: un-fold the centring by b_dec
            out["b_enc"] = (self.b_enc - self.b_dec @ self.W_enc).detach()
        if getattr(self, "W_skip", None) is not None:
            out["W_skip"] = self.W_skip
        return out


class GatedSAE(ThresholdSAE):
    """A gated SAE (Rajamanoharan et al. 2024; SAELens "gated", dictionary_learning's GatedAutoEncoder): a gate
    decides where a feature fires, a magnitude path sharing W_enc (rescaled per feature by exp(r_mag)) how
    strongly. `b_enc` holds the gate's bias, so `preacts` is the gate's pre-activation.

        gate = (x - b_dec) @ W_enc + b_gate
        acts = relu((gate - b_gate) * exp(r_mag) + b_mag) * (gate > 0)

    Parameters
    ----------
    d_model, width : int
        Input size and number of features.
    max_codes : int
        Most codes per token kept (`k`).
    metadata : dict, optional
        Facts saved in cfg.json.

    Example:
        >>> sae = GatedSAE(4, 6, max_codes=3)
        >>> with torch.no_grad():
        ...     _ = sae.W_enc.copy_(torch.eye(4, 6)), sae.b_mag.fill_(-0.5)
        >>> v, i = sae.encode(torch.tensor([[1.0, 0.2, 0.0, 0.0]]))  # both gates open; feature 1's magnitude is < 0
        >>> [(j, round(a, 2)) for j, a in zip(i[0].tolist(), v[0].tolist()) if a > 0]
        [(0, 0.5)]
    """

    def __init__(self, d_model: int, width: int, *, max_codes: int = MAX_CODES,
                 metadata: dict[str, Any] | None = None) -> None:
        super().__init__(d_model, width, 0.0, architecture="gated", max_codes=max_codes, metadata=metadata)
        self.register_buffer("r_mag", torch.zeros(int(width)))
        self.register_buffer("b_mag", torch.zeros(int(width)))

    def activations(self, x: Tensor) -> Tensor:
        """Dense feature activations (n, width): the magnitude where the gate is open, 0 elsewhere.

        Example:
            >>> GatedSAE(8, 32).activations(torch.randn(3, 8)).shape
            torch.Size([3, 32])
        """
        with torch.no_grad():
            gate = self.preacts(x.to(device=self.W_enc.device, dtype=self.W_enc.dtype))
            magnitude = (gate - self.b_enc) * self.r_mag.exp() + self.b_mag
            return F.relu(magnitude) * (gate > 0)

    def _empty(self, width: int) -> GatedSAE:
        return GatedSAE(self.d_model, width, max_codes=self.k, metadata=dict(self.metadata))

    def _per_feature(self) -> dict[str, Tensor]:
        return {"b_enc": self.b_enc, "r_mag": self.r_mag, "b_mag": self.b_mag}

    def cfg_dict(self) -> dict[str, Any]:
        """SAELens-style cfg.json, architecture "gated".

        Example:
            >>> GatedSAE(8, 32).cfg_dict()["architecture"]
            'gated'
        """
        return {**super().cfg_dict(), "architecture": "gated"}

    def _saved_tensors(self) -> dict[str, Tensor]:  # SAELens' names: the gate's bias is b_gate, there is no b_enc
        return {"W_enc": self.W_enc, "b_gate": self.b_enc, "r_mag": self.r_mag, "b_mag": self.b_mag,
                "W_dec": self.W_dec, "b_dec": self.b_dec}


def load_dictionary(path: str | os.PathLike, *, max_codes: int = MAX_CODES) -> TopKSAE:
    """Load any sparse dictionary featuretree can link, by what its files say: SAELens' layout (cfg.json +
    sae_weights.safetensors) for architecture "topk", "jumprelu", "standard" (ReLU), "gated" and the training
    layout of "batchtopk" (one `topk_threshold`); sparsify's (cfg.json + sae.safetensors, TopK); Gemma
    Scope's params.npz (JumpReLU; read with allow_pickle=False); dictionary_learning's config.json +
    ae.safetensors (AutoEncoder, AutoEncoderNew, GatedAutoEncoder, JumpReluAutoEncoder, AutoEncoderTopK,
    BatchTopKSAE, MatryoshkaBatchTopKSAE). Never unpickles: dictionary_learning's `ae.pt` is refused with the
    one line that converts it.

    Parameters
    ----------
    path : str or Path
        The dictionary's directory.
    max_codes : int
        Threshold dictionaries: codes kept per token (their `k`).

    Example:
        >>> import tempfile
        >>> d = TopKSAE(8, 32, 2).save(tempfile.mkdtemp())
        >>> type(load_dictionary(d)).__name__, type(load_dictionary(ThresholdSAE(8, 32).save(tempfile.mkdtemp()))).__name__
        ('TopKSAE', 'ThresholdSAE')
    """
    path = Path(path)
    if path.is_dir() and (path / GEMMA_SCOPE_WEIGHTS).is_file() and not (path / WEIGHTS_FILE).is_file():
        return _load_npz(path / GEMMA_SCOPE_WEIGHTS, max_codes)
    if path.is_dir() and (path / DL_CONFIG).is_file() and not (path / CFG_FILE).is_file():
        return _load_dictionary_learning(path, max_codes)
    cfg_path = path / CFG_FILE
    if path.is_dir() and cfg_path.is_file() and (path / WEIGHTS_FILE).is_file():
        cfg = _read_json(cfg_path)
        arch = cfg.get("architecture", "topk")
        if arch != "topk":
            sae = _load_saelens_threshold(path, cfg, arch, max_codes)
        else:
            sae = TopKSAE.load(path)
        sae.metadata.update(_cfg_facts(cfg, sae.metadata))
        return sae
    return TopKSAE.load(path)


def _read_json(p: Path) -> dict:
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise FeatureTreeError(f"{p} is not a readable JSON config ({e}): re-save the dictionary") from e
    if not isinstance(cfg, dict):
        raise FeatureTreeError(f"{p} holds a JSON {type(cfg).__name__}, not an object: re-save the dictionary")
    return cfg


def _cfg_facts(cfg: dict, meta: dict) -> dict:
    """hook_name / model_name where the SAELens config names them (top level in older saves, metadata in 6.x),
    and a Matryoshka SAE's matryoshka_widths (its prefixes, which `load_ladder` makes rungs)."""
    out = {}
    for key in ("hook_name", "model_name"):
        v = cfg.get(key) or (cfg.get("metadata") or {}).get(key) or meta.get(key)
        if isinstance(v, str) and v:
            out[key] = v
    if cfg.get("matryoshka_widths"):
        out["matryoshka_widths"] = [int(w) for w in cfg["matryoshka_widths"]]
    return out


_SAELENS = {"jumprelu": "jumprelu", "standard": "relu", "relu": "relu", "batchtopk": "batchtopk", "gated": "gated",
            "matryoshka_batchtopk": "batchtopk", "transcoder": "relu", "jumprelu_transcoder": "jumprelu",
            "skip_transcoder": "relu", "jumprelu_skip_transcoder": "jumprelu"}
# (matryoshka_batchtopk's training layout: BatchTopK's one topk_threshold; its cfg's matryoshka_widths are the prefixes)
_TRANSCODERS = ("transcoder", "jumprelu_transcoder", "skip_transcoder", "jumprelu_skip_transcoder")


def _load_saelens_threshold(path: Path, cfg: dict, arch: str, max_codes: int) -> ThresholdSAE:
    cfg_path = path / CFG_FILE
    if arch in _TRANSCODERS and int(cfg.get("d_out", cfg.get("d_in", 0)) or 0) != int(cfg.get("d_in", -1) or -1):
        raise FeatureTreeError(f"{cfg_path}: a transcoder from d_in {cfg.get('d_in')} to d_out {cfg.get('d_out')}; "
                               "featuretree reads transcoders whose output has the input's width")
    if arch not in _SAELENS:
        raise FeatureTreeError(f"{cfg_path}: architecture {arch!r} is not one featuretree reads; it reads topk, "
                               "jumprelu, standard (ReLU), batchtopk, matryoshka_batchtopk, gated, transcoder, "
                               "jumprelu_transcoder (and matryoshka ladders of those)")
    for flag in ("rescale_acts_by_decoder_norm",):
        if cfg.get(flag):
            raise FeatureTreeError(f"{cfg_path}: {flag}=true is not supported: save the SAE with the decoder norm "
                                   "folded into W_enc / b_enc")
    check_raw_inputs(cfg_path, cfg)
    try:
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    except (ValueError, KeyError, TypeError) as e:
        raise FeatureTreeError(f"{cfg_path} is not a valid SAE config (missing or bad {e}): it needs d_in and d_sae") from e
    w_path = path / WEIGHTS_FILE
    kind = _SAELENS[arch]
    bias = "b_gate" if kind == "gated" else "b_enc"
    # every tensor of the file, read once; the four every SAE has are checked here, the rest below
    weights = read_weights(w_path, {"W_enc": (d_in, d_sae), bias: (d_sae,), "W_dec": (d_sae, d_in),
                                    "b_dec": (d_in,)}, CFG_FILE)
    meta = dict(cfg.get("metadata") or {})
    meta.pop("featuretree_metrics", None)
    inner = meta.pop("featuretree_architecture", None)
    cap = int(meta.pop("featuretree_max_codes", 0) or max_codes)
    meta = {**meta, "source": meta.get("source", "saelens"), "saelens_architecture": arch}
    fold = cfg.get("apply_b_dec_to_input", True) is False or arch in _TRANSCODERS  # a transcoder never centres x
    if arch in _TRANSCODERS:  # reads hook_name, writes hook_name_out (its decoder rows live there)
        meta.update(transcoder=True, hook_name_out=cfg.get("hook_name_out") or meta.get("hook_name_out"))
    skip = None
    if "skip" in arch:  # a linear path x @ W_skip.T added to the output: part of the reconstruction, not the codes
        skip = check_weights(weights, {"W_skip": (d_in, d_in)}, w_path, CFG_FILE)["W_skip"].float()
    if kind == "gated":
        check_weights(weights, {"r_mag": (d_sae,), "b_mag": (d_sae,)}, w_path, CFG_FILE)
        sae = _gated(d_in, d_sae, weights["W_enc"], weights["b_gate"], weights["r_mag"], weights["b_mag"],
                     weights["W_dec"], weights["b_dec"], fold_b_dec=fold, max_codes=cap, metadata=meta)
    else:
        sae = ThresholdSAE(d_in, d_sae, _threshold(weights, kind, d_sae, w_path),
                           architecture=inner if inner in THRESHOLD_ARCHITECTURES else kind, max_codes=cap,
                           metadata=meta)
        fill_weights(sae, weights["W_enc"], weights["b_enc"], weights["W_dec"], weights["b_dec"], fold_b_dec=fold)
    if skip is not None:
        sae.register_buffer("W_skip", skip)
    sae.metrics = dict((cfg.get("metadata") or {}).get("featuretree_metrics") or {})
    return sae


def _threshold(weights: dict[str, Tensor], kind: str, d_sae: int, w_path: Path) -> Tensor:
    """The firing threshold a SAELens file holds for architecture `kind` (featuretree's name)."""
    if kind == "jumprelu":
        key = next((k for k in ("threshold", "log_threshold") if k in weights), None)
        if key is None:
            raise FeatureTreeError(f"{w_path}: a JumpReLU SAE needs a 'threshold' (or 'log_threshold') tensor; "
                                   "it has none")
        t = check_weights(weights, {key: (d_sae,)}, w_path, CFG_FILE)[key].float()
        return t if key == "threshold" else t.exp()
    if kind == "batchtopk":  # SAELens' training layout: one scalar threshold for every feature
        if "topk_threshold" not in weights:
            raise FeatureTreeError(f"{w_path}: a BatchTopK SAE needs its 'topk_threshold'; save it for inference "
                                   "(SAELens converts it to a JumpReLU threshold) or keep the training state")
        return weights["topk_threshold"].float().reshape(-1)[0]
    return torch.tensor(0.0)


@torch.no_grad()
def _gated(d: int, w: int, W_enc: Tensor, b_gate: Tensor, r_mag: Tensor, b_mag: Tensor, W_dec: Tensor,
           b_dec: Tensor, *, fold_b_dec: bool, max_codes: int, metadata: dict) -> GatedSAE:
    """A GatedSAE from its six tensors; where the source does not centre inputs by b_dec, both biases absorb it
    (the magnitude path's share is rescaled by exp(r_mag) like the rest of its pre-activation)."""
    sae = GatedSAE(d, w, max_codes=max_codes, metadata=metadata)
    b_mag = b_mag.float()
    if fold_b_dec:
        b_mag = b_mag + (b_dec.float() @ W_enc.float()) * r_mag.float().exp()
    fill_weights(sae, W_enc, b_gate, W_dec, b_dec, fold_b_dec=fold_b_dec)
    sae.r_mag.copy_(r_mag.float())
    sae.b_mag.copy_(b_mag)
    return sae


def _load_npz(p: Path, max_codes: int) -> ThresholdSAE:
    """Gemma Scope's params.npz: W_enc (d, w), W_dec (w, d), b_enc (w,), b_dec (d,), threshold (w,); inputs are
    not centred by b_dec (pre = x W_enc + b_enc)."""
    import numpy as np

    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: torch.from_numpy(np.asarray(z[k], dtype=np.float32)) for k in z.files}
    except (ValueError, OSError) as e:
        raise FeatureTreeError(f"{p} is not a readable .npz of arrays ({e}); featuretree never unpickles") from e
    need = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
    missing = [k for k in need if k not in arrays]
    if missing:
        raise FeatureTreeError(f"{p} lacks {missing}: a Gemma Scope JumpReLU file holds {', '.join(need)}")
    d, w = arrays["W_enc"].shape
    check_weights(arrays, {"W_dec": (w, d), "b_enc": (w,), "b_dec": (d,), "threshold": (w,)}, p, f"W_enc {(d, w)}")
    sae = ThresholdSAE(d, w, arrays["threshold"], architecture="jumprelu", max_codes=max_codes,
                       metadata={"source": "gemma-scope", "file": p.name})
    fill_weights(sae, arrays["W_enc"], arrays["b_enc"], arrays["W_dec"], arrays["b_dec"], fold_b_dec=True)
    return sae


# ---- dictionary_learning (saprmarks/dictionary_learning): its state_dict names, converted to safetensors ------
def _load_dictionary_learning(path: Path, max_codes: int) -> TopKSAE:
    """config.json's trainer.dict_class says which of dictionary_learning's classes wrote ae.safetensors; each
    is read as that class's `encode` computes (and AutoEncoder's decoder normalised as its from_pretrained does)."""
    cfg_path, w_path = path / DL_CONFIG, path / DL_WEIGHTS
    trainer = _read_json(cfg_path).get("trainer")
    if not isinstance(trainer, dict) or not isinstance(trainer.get("dict_class"), str):
        raise FeatureTreeError(f"{cfg_path} has no trainer.dict_class: it is not dictionary_learning's config.json "
                               f"(a SAELens dictionary has {CFG_FILE} + {WEIGHTS_FILE})")
    cls = trainer["dict_class"]
    if not w_path.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".pt", ".pth"))
        if pickles:
            raise FeatureTreeError(f"{path} holds {', '.join(pickles)} but no {DL_WEIGHTS}: featuretree never "
                                   f"unpickles; convert it once, where you trust the file:  {DL_CONVERT}")
        raise FeatureTreeError(f"{path} has {DL_CONFIG} but no {DL_WEIGHTS}: the weights are missing")
    weights = read_weights(w_path, {}, DL_CONFIG)
    meta = {"source": "dictionary_learning", "dict_class": cls,
            **{f"dl_{k}": trainer[k] for k in ("lm_name", "layer", "submodule_name", "trainer_class") if k in trainer}}
    if isinstance(trainer.get("lm_name"), str):
        meta["model_name"] = trainer["lm_name"]
    if isinstance(trainer.get("layer"), int) and "resid" in str(trainer.get("submodule_name", "resid")):
        meta["hook_name"] = f"blocks.{trainer['layer']}.hook_resid_post"  # its get_submodule: the block's output
    shape = _dl_shape(weights, cls, w_path)
    if shape is None:
        raise FeatureTreeError(f"{cfg_path}: dict_class {cls!r} is not one featuretree reads; it reads AutoEncoder, "
                               "AutoEncoderNew, GatedAutoEncoder, JumpReluAutoEncoder, AutoEncoderTopK, BatchTopKSAE "
                               "and MatryoshkaBatchTopKSAE")
    d, w = shape
    need = _DL_LAYOUTS[cls](d, w)
    check_weights(weights, need, w_path, f"{cls} with activation_dim {d}, dict_size {w}")
    g = weights.get
    if cls in ("AutoEncoder", "AutoEncoderNew"):
        W_enc, b_enc, W_dec = g("encoder.weight").t(), g("encoder.bias"), g("decoder.weight").t()
        if cls == "AutoEncoder":  # from_pretrained(normalize_decoder=True): unit decoder columns, encoder rescaled
            norms = W_dec.norm(dim=1).clamp_min(1e-12)
            W_dec, W_enc, b_enc = W_dec / norms[:, None], W_enc * norms, b_enc * norms
        sae = ThresholdSAE(d, w, 0.0, architecture="relu", max_codes=max_codes, metadata=meta)
        fill_weights(sae, W_enc, b_enc, W_dec, g("bias") if cls == "AutoEncoder" else g("decoder.bias"),
                     fold_b_dec=cls == "AutoEncoderNew")
        return sae
    if cls == "GatedAutoEncoder":
        return _gated(d, w, g("encoder.weight").t(), g("gate_bias"), g("r_mag"), g("mag_bias"),
                      g("decoder.weight").t(), g("decoder_bias"), fold_b_dec=False, max_codes=max_codes, metadata=meta)
    if cls == "JumpReluAutoEncoder":  # apply_b_dec_to_input is False unless it was loaded from SAELens
        sae = ThresholdSAE(d, w, g("threshold"), architecture="jumprelu", max_codes=max_codes, metadata=meta)
        fill_weights(sae, g("W_enc"), g("b_enc"), g("W_dec"), g("b_dec"), fold_b_dec=True)
        return sae
    if cls == "MatryoshkaBatchTopKSAE":
        W_enc, b_enc, W_dec = g("W_enc"), g("b_enc"), g("W_dec")
        sizes = g("group_sizes")
        if sizes is None or sizes.dim() != 1 or int(sizes.sum()) != w or bool((sizes <= 0).any()):
            raise FeatureTreeError(f"{w_path}: a MatryoshkaBatchTopKSAE holds group_sizes (positive, summing to "
                                   f"dict_size {w}); this file's are {None if sizes is None else sizes.tolist()}")
        meta["matryoshka_widths"] = torch.cumsum(sizes.long(), 0).tolist()
    else:
        W_enc, b_enc, W_dec = g("encoder.weight").t(), g("encoder.bias"), g("decoder.weight").t()
    k = int(g("k").reshape(-1)[0]) if "k" in weights else int(trainer.get("k") or 0)
    meta["k"] = k
    if cls == "AutoEncoderTopK":  # encode() ranks; its threshold is used only when asked for
        if not 0 < k < w:
            raise FeatureTreeError(f"{w_path}: k={k} must be between 1 and dict_size-1 ({w - 1})")
        sae = TopKSAE(d, w, k, seed=None, metadata=meta)
    else:  # BatchTopK at inference: relu(pre) * (relu(pre) > threshold), one threshold for every feature
        t = float(g("threshold").reshape(-1)[0])
        if t < 0:
            log.warning("%s: its threshold was never set (%.1f): every positive pre-activation fires (a ReLU SAE)",
                        w_path, t)
        sae = ThresholdSAE(d, w, t, architecture="batchtopk", max_codes=max_codes, metadata=meta)
    fill_weights(sae, W_enc, b_enc, W_dec, g("b_dec"), fold_b_dec=False)
    return sae


def _dl_shape(weights: dict[str, Tensor], cls: str, w_path: Path) -> tuple[int, int] | None:
    """(activation_dim, dict_size) read off a dictionary_learning state dict, or None for an unknown class."""
    if cls not in _DL_LAYOUTS:
        return None
    key, transposed = ("W_enc", False) if cls in ("JumpReluAutoEncoder", "MatryoshkaBatchTopKSAE") else ("encoder.weight", True)
    if key not in weights or weights[key].dim() != 2:
        raise FeatureTreeError(f"{w_path}: a {cls} holds a 2-d {key!r}; this file has {sorted(weights)[:8]}")
    a, b = weights[key].shape
    return (int(b), int(a)) if transposed else (int(a), int(b))


_DL_LAYOUTS = {  # class -> {tensor: shape} for activation_dim d, dict_size w (its state_dict's names)
    "AutoEncoder": lambda d, w: {"encoder.weight": (w, d), "encoder.bias": (w,), "decoder.weight": (d, w),
                                 "bias": (d,)},
    "AutoEncoderNew": lambda d, w: {"encoder.weight": (w, d), "encoder.bias": (w,), "decoder.weight": (d, w),
                                    "decoder.bias": (d,)},
    "GatedAutoEncoder": lambda d, w: {"encoder.weight": (w, d), "decoder.weight": (d, w), "decoder_bias": (d,),
                                      "r_mag": (w,), "gate_bias": (w,), "mag_bias": (w,)},
    "JumpReluAutoEncoder": lambda d, w: {"W_enc": (d, w), "b_enc": (w,), "W_dec": (w, d), "b_dec": (d,),
                                         "threshold": (w,)},
    "AutoEncoderTopK": lambda d, w: {"encoder.weight": (w, d), "encoder.bias": (w,), "decoder.weight": (d, w),
                                     "b_dec": (d,)},
    "BatchTopKSAE": lambda d, w: {"encoder.weight": (w, d), "encoder.bias": (w,), "decoder.weight": (d, w),
                                  "b_dec": (d,), "threshold": ()},
    "MatryoshkaBatchTopKSAE": lambda d, w: {"W_enc": (d, w), "b_enc": (w,), "W_dec": (w, d), "b_dec": (d,),
                                            "threshold": ()},
}
