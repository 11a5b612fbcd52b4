"""Sparse dictionaries: TopKSAE (trained here; a sparse (k-row) encoder backward and decoder, saved in SAELens'
format) and ThresholdSAE (JumpReLU / BatchTopK / ReLU dictionaries loaded from SAELens, Gemma Scope or
sparsify files); `load_dictionary` reads any of them. Any of them is a rung.

    pre     = (x - b_dec) @ W_enc + b_enc             # (n, width)
    indices = topk(pre, k); values = relu(pre[indices])  # (n, k) each
    x_hat   = sum_j values_j * W_dec[indices_j] + b_dec    # (n, d_model), an embedding_bag

Only the k chosen pre-activations need gradients, so the encoder's backward touches k columns of W_enc
per token (an embedding_bag backward and a sparse matmul) instead of a dense (n, width) gradient.
Decoder rows are kept unit-norm, so `values` are the feature's coefficient along its direction.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from featuretree.config import FeatureTreeError
from featuretree.native import (
    available,
    csr_pattern,
    csr_tensor,
    dots,
    fast_int8_matmul,
    int8_candidates,
    refine_topk,
    topk_indices,
)
from featuretree.utils import SAFETENSORS_HINT, check_safetensors, save_tensors, write_json

__all__ = ["CFG_FILE", "GEMMA_SCOPE_WEIGHTS", "INT8_MARGIN", "INT8_MIN_WIDTH", "load_dictionary", "MAX_CODES",
           "SPARSIFY_WEIGHTS", "THRESHOLD_ARCHITECTURES", "ThresholdSAE", "TopKSAE", "WEIGHTS_FILE"]

log = logging.getLogger(__name__)

WEIGHTS_FILE = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"  # sparsify's SparseCoder.save_to_disk
INT8_MIN_WIDTH = 1024  # below this the fp32 encoder matmul is cheap and selection stays exact fp32
INT8_MARGIN = 16  # extra int8-ranked candidates re-ranked exactly in fp32
CFG_FILE = "cfg.json"


def _scatter_matmul(pattern: tuple[Tensor, Tensor, Tensor], weights: Tensor, dense: Tensor, width: int) -> Tensor:
    """sum over entries (r, j) of weights[r, j] * dense[r] into row indices[r, j]: (width, d) via CSR @ dense."""
    order, crow, col = pattern
    S = csr_tensor(crow, col, weights.reshape(-1)[order], (width, dense.shape[0]))
    return S @ dense


def _pattern_of(indices: Tensor, width: int) -> tuple[Tensor, Tensor, Tensor]:
    pattern = getattr(indices, "_ft_csr", None)
    if pattern is None:
        pattern = csr_pattern(indices, width)
    return pattern


class _GatheredPreacts(torch.autograd.Function):
    """values = pre[indices] for pre = (x - b_dec) @ W_enc + b_enc, with a backward over the k chosen columns.

    Only the parameters need gradients (x is data), so the input gradient is never formed: b_dec's
    gradient, -sum_rows grad_rows @ W_enc[:, indices].T, equals -W_enc @ grad_b_enc.
    """

    @staticmethod
    def forward(ctx, xc: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, indices: Tensor,
                values: Tensor) -> Tensor:
        ctx.save_for_backward(xc, W_enc, indices, *_pattern_of(indices, b_enc.shape[0]))
        ctx.width = b_enc.shape[0]
        return values

    @staticmethod
    def backward(ctx, grad: Tensor):  # grad: (n, k)
        xc, W_enc, indices, *pattern = ctx.saved_tensors
        flat_idx = indices.reshape(-1)
        grad_W = None
        # per-feature sum of the gradient: b_enc's gradient, and (through W_enc) b_dec's
        grad_b = torch.zeros(ctx.width, dtype=grad.dtype, device=grad.device).index_add_(0, flat_idx, grad.reshape(-1))
        if ctx.needs_input_grad[1]:  # (d, width): only the chosen columns are non-zero
            grad_W = _scatter_matmul(pattern, grad, xc, ctx.width).t()
        grad_b_dec = -(W_enc @ grad_b) if ctx.needs_input_grad[3] else None
        return None, grad_W, grad_b, grad_b_dec, None, None


class _SparseDecode(torch.autograd.Function):
    """x_hat - b_dec = sum_j values_j * W_dec[indices_j]: an embedding_bag whose backward builds W_dec's
    gradient from the k active rows per token with one sparse matmul (no sort-based dense backward)."""

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
        ctx.save_for_backward(values, indices, W_dec, *_pattern_of(indices, W_dec.shape[0]))
        return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")  # (n, d)

    @staticmethod
    def backward(ctx, grad: Tensor):  # grad: (n, d)
        values, indices, W_dec, *pattern = ctx.saved_tensors
        grad_values = grad_W = None
        if ctx.needs_input_grad[0]:  # grad . W_dec[indices_j] for each active feature: (n, k)
            grad_values = dots(grad.contiguous(), W_dec, indices)
        if ctx.needs_input_grad[2]:
            grad_W = _scatter_matmul(pattern, values, grad, W_dec.shape[0])  # (width, d)
        return grad_values, None, grad_W


class TopKSAE(nn.Module):
    """TopK sparse autoencoder: exactly k features are active per token.

    Parameters
    ----------
    d_model : int
        Width of the activation vectors it reads.
    width : int
        Number of features (dictionary rows).
    k : int
        Active features per token, 1 <= k < width.
    seed : int, optional
        Seed of the random unit decoder rows (the encoder starts as their transpose); None: torch's
        global RNG.
    metadata : dict, optional
        Free-form facts saved in cfg.json (e.g. the model and layer it was trained on).

    Example:
        >>> sae = TopKSAE(d_model=16, width=64, k=4)
        >>> x = torch.randn(8, 16)
        >>> values, indices = sae.encode(x)
        >>> values.shape, indices.shape
        (torch.Size([8, 4]), torch.Size([8, 4]))
        >>> torch.allclose(sae.decode(values, indices), sae(x))
        True
    """

    def __init__(self, d_model: int = 384, width: int = 1024, k: int = 16, *, seed: int | None = 0,
                 metadata: dict[str, Any] | None = None) -> None:
        super().__init__()
        if width <= 0 or d_model <= 0:
            raise FeatureTreeError(f"width={width} and d_model={d_model} must be positive integers")
        if not 0 < k < width:
            raise FeatureTreeError(f"k={k} must be at least 1 and below width={width}: lower k or widen the dictionary")
        self.d_model, self.width, self.k = int(d_model), int(width), int(k)
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.metrics: dict[str, float] = {}
        # rank features with an int8 matmul before the exact fp32 top-k (see _select_int8); None = where it pays
        self.int8_select: bool | None = None
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        W_dec = torch.randn(width, d_model, generator=gen)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)  # (width, d_model), unit rows
        self.W_enc = nn.Parameter(W_dec.t().clone())  # (d_model, width)
        self.b_enc = nn.Parameter(torch.zeros(width))
        self.b_dec = nn.Parameter(torch.zeros(d_model))

    # ---- forward maths -------------------------------------------------------------------------
    def preacts(self, x: Tensor) -> Tensor:
        """Dense pre-activations (x - b_dec) @ W_enc + b_enc, shape (n, width).

        Example:
            >>> TopKSAE(8, 32, 2).preacts(torch.randn(3, 8)).shape
            torch.Size([3, 32])
        """
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)  # (n, width)

    def encode(self, x: Tensor, *, k: int | None = None, among: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The k active features of each row: (values (n, k) >= 0, indices (n, k) int64).

        Differentiable w.r.t. the parameters through the k chosen columns only. `k` overrides the
        dictionary's k and `among` (a (width,) bool mask) restricts the choice (AuxK uses both).

        Example:
            >>> v, i = TopKSAE(8, 32, 2).encode(torch.randn(3, 8))
            >>> bool((v >= 0).all()), i.shape
            (True, torch.Size([3, 2]))
        """
        x = x.to(device=self.W_enc.device, dtype=self.W_enc.dtype)
        k = k or self.k
        with torch.no_grad():
            xc = x - self.b_dec  # (n, d_model)
            int8 = fast_int8_matmul() if self.int8_select is None else self.int8_select
            if int8 and self.width >= INT8_MIN_WIDTH and k + INT8_MARGIN < self.width and xc.device.type == "cpu" \
                    and available():
                top, indices = self._select_int8(xc, k, among)
            else:
                pre = torch.addmm(self.b_enc, xc, self.W_enc)  # (n, width)
                if among is not None:
                    pre.masked_fill_(~among, float("-inf"))
                indices = topk_indices(pre, k)  # (n, k)
                top = pre.gather(1, indices)
        if torch.is_grad_enabled() and self.W_enc.requires_grad:
            indices._ft_csr = csr_pattern(indices, self.width)  # shared by the encoder and decoder backward
            top = _GatheredPreacts.apply(xc, self.W_enc, self.b_enc, self.b_dec, indices, top)
        return F.relu(top), indices

    def _select_int8(self, xc: Tensor, k: int, among: Tensor | None) -> tuple[Tensor, Tensor]:
        """Top-k ranked by an int8 matmul among k + INT8_MARGIN candidates, then chosen exactly in fp32.

        The int8 matmul runs ~2x faster than fp32 on CPUs with VNNI/AMX (native.fast_int8_matmul); its
        rounding only reorders features whose pre-activations nearly tie, so re-ranking INT8_MARGIN extra
        candidates with exact fp32 dot products returns the fp32 top-k except in near-ties (tested), and the
        values are always exact fp32.
        """
        cand = int8_candidates(xc, self.W_enc, self.b_enc, k + INT8_MARGIN, among)  # (n, k + margin)
        return refine_topk(xc, self.W_enc.t(), self.b_enc, cand, k, among)  # exact fp32 values, (n, k) each

    def decode(self, values: Tensor, indices: Tensor) -> Tensor:
        """Reconstruct (n, d_model) from sparse codes: sum_j values_j * W_dec[indices_j] + b_dec.

        Example:
            >>> sae = TopKSAE(8, 32, 2)
            >>> sae.decode(torch.ones(1, 2), torch.tensor([[0, 1]])).shape
            torch.Size([1, 8])
        """
        values = values.to(self.W_dec.dtype)
        if torch.is_grad_enabled() and self.W_dec.requires_grad:
            out = _SparseDecode.apply(values, indices, self.W_dec)
        else:
            out = F.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum")
        return out + self.b_dec  # (n, d_model)

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction decode(encode(x)), shape (n, d_model).

        Example:
            >>> TopKSAE(8, 32, 2)(torch.randn(3, 8)).shape
            torch.Size([3, 8])
        """
        return self.decode(*self.encode(x))

    def dense_codes(self, x: Tensor) -> Tensor:
        """The (n, width) activation matrix with zeros off the top-k (for small inputs and analysis).

        Example:
            >>> int((TopKSAE(8, 32, 2).dense_codes(torch.randn(3, 8)) != 0).sum(1).max()) <= 2
            True
        """
        values, indices = self.encode(x)
        return torch.zeros(x.shape[0], self.width, dtype=values.dtype, device=values.device).scatter_(1, indices, values)

    @torch.no_grad()
    def prefix(self, width: int) -> TopKSAE:
        """A dictionary of this one's first `width` features (same k): a rung of a nested (Matryoshka) ladder.

        Example:
            >>> sae = TopKSAE(8, 32, 2)
            >>> small = sae.prefix(16)
            >>> small.width, torch.equal(small.W_dec, sae.W_dec[:16])
            (16, True)
        """
        if not self.k < width <= self.width:
            raise FeatureTreeError(f"prefix width {width} must be above k={self.k} and at most {self.width}")
        out = TopKSAE(self.d_model, width, self.k, seed=None, metadata=dict(self.metadata))
        out.W_enc.copy_(self.W_enc[:, :width])
        out.b_enc.copy_(self.b_enc[:width])
        out.W_dec.copy_(self.W_dec[:width])
        out.b_dec.copy_(self.b_dec)
        out.int8_select = self.int8_select
        out.requires_grad_(self.W_dec.requires_grad)
        return out

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every decoder row to unit norm (call after each optimiser step).

        Example:
            >>> sae = TopKSAE(8, 32, 2); sae.W_dec.data *= 3; sae.normalize_decoder()
            >>> torch.allclose(sae.W_dec.norm(dim=1), torch.ones(32))
            True
        """
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the part of W_dec's gradient along each row, which unit-normalising would undo anyway.

        Example:
            >>> sae = TopKSAE(4, 8, 2); sae.W_dec.grad = sae.W_dec.detach().clone()
            >>> sae.remove_parallel_grad(); float(sae.W_dec.grad.abs().max()) < 1e-6
            True
        """
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
        self.W_dec.grad -= parallel * self.W_dec

    # ---- SAELens format ------------------------------------------------------------------------
    def cfg_dict(self) -> dict[str, Any]:
        """SAELens-style cfg.json contents (architecture 'topk', d_in, d_sae, k, metadata).

        Example:
            >>> TopKSAE(8, 32, 2).cfg_dict()["d_sae"]
            32
        """
        return {
            "architecture": "topk",
            "d_in": self.d_model,
            "d_sae": self.width,
            "k": self.k,
            "dtype": str(self.W_dec.dtype).removeprefix("torch."),
            "device": "cpu",
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "metadata": {**self.metadata, "featuretree_metrics": self.metrics},
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write `cfg.json` + `sae_weights.safetensors` (SAELens layout) into directory `path`.

        Example:
            >>> import tempfile
            >>> d = TopKSAE(8, 32, 2).save(tempfile.mkdtemp())
            >>> sorted(p.name for p in d.iterdir())
            ['cfg.json', 'sae_weights.safetensors']
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_tensors(path / WEIGHTS_FILE, {n: getattr(self, n) for n in self._saved_tensors()})
        write_json(path / CFG_FILE, self.cfg_dict())
        return path

    def _saved_tensors(self) -> tuple[str, ...]:
        return ("W_enc", "b_enc", "W_dec", "b_dec")

    @classmethod
    def load(cls, path: str | os.PathLike) -> TopKSAE:
        """Load a TopK dictionary from a directory: featuretree's / SAELens' layout (cfg.json +
        sae_weights.safetensors) or sparsify's (cfg.json + sae.safetensors). Only safetensors are read,
        never pickles; shapes are checked against cfg.json. SAELens dictionaries that do not subtract b_dec
        from the input are folded exactly into this form (b_enc += b_dec @ W_enc).

        Example:
            >>> import tempfile
            >>> d = TopKSAE(8, 32, 2).save(tempfile.mkdtemp())
            >>> TopKSAE.load(d).width
            32
        """
        path = Path(path)
        if path.is_file():
            raise FeatureTreeError(f"{path} is a file: pass the directory that holds cfg.json and "
                                   f"{WEIGHTS_FILE} (SAELens) or {SPARSIFY_WEIGHTS} (sparsify)")
        cfg_path = path / CFG_FILE
        if not cfg_path.is_file():
            raise FeatureTreeError(f"{path} is not a saved dictionary: expected {CFG_FILE} and {WEIGHTS_FILE} "
                                   f"(or sparsify's {SPARSIFY_WEIGHTS}) inside it")
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            if not isinstance(cfg, dict):
                raise TypeError(f"it holds a JSON {type(cfg).__name__}, not an object")
        except (ValueError, TypeError, OSError) as e:
            raise FeatureTreeError(f"{cfg_path} is not a readable JSON config ({e}): re-save the dictionary") from e
        if (path / WEIGHTS_FILE).is_file():
            return cls._load_saelens(path, cfg)
        if (path / SPARSIFY_WEIGHTS).is_file():
            return cls._load_sparsify(path, cfg)
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".pt", ".pth", ".bin", ".pkl", ".ckpt"))
        if pickles:
            raise FeatureTreeError(f"{path} holds {', '.join(pickles)} but no {WEIGHTS_FILE}: {SAFETENSORS_HINT}")
        raise FeatureTreeError(f"{path} has {CFG_FILE} but no {WEIGHTS_FILE} (or {SPARSIFY_WEIGHTS}): the weights "
                               "are missing; re-save the dictionary")

    @classmethod
    def _weights(cls, w_path: Path, expected: dict[str, tuple[int, ...]], source: str) -> dict[str, Tensor]:
        from safetensors.torch import load_file

        check_safetensors(w_path)
        try:
            weights = load_file(str(w_path))
        except Exception as e:  # safetensors raises its own error types on damaged files
            raise FeatureTreeError(f"{w_path} is not a readable safetensors file ({e}); re-save or retrain it") from e
        return _checked(weights, expected, w_path, source)

    @classmethod
    def _load_saelens(cls, path: Path, cfg: dict) -> TopKSAE:
        cfg_path, w_path = path / CFG_FILE, path / WEIGHTS_FILE
        try:
            d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
            k = int(cfg.get("k") or (cfg.get("activation_fn_kwargs") or {})["k"])
        except (ValueError, KeyError, TypeError) as e:
            raise FeatureTreeError(f"{cfg_path} is not a valid TopK SAE config (missing or bad {e}): it needs d_in, "
                                   "d_sae and k") from e
        arch = cfg.get("architecture", "topk")
        if arch != "topk":
            raise FeatureTreeError(f"{cfg_path}: architecture {arch!r} is not a TopK SAE; featuretree links TopK "
                                   "dictionaries (architecture 'topk')")
        _check_raw_inputs(cfg_path, cfg)
        if not 0 < k < d_sae or d_in <= 0:
            raise FeatureTreeError(f"{cfg_path}: k={k}, d_in={d_in}, d_sae={d_sae}: need 0 < k < d_sae and d_in > 0")
        weights = cls._weights(w_path, {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in),
                                        "b_dec": (d_in,)}, CFG_FILE)
        meta = dict(cfg.get("metadata") or {})
        metrics = meta.pop("featuretree_metrics", {}) or {}
        sae = cls(d_in, d_sae, k, seed=None, metadata=meta)
        _fill(sae, weights["W_enc"], weights["b_enc"], weights["W_dec"], weights["b_dec"],
              fold_b_dec=cfg.get("apply_b_dec_to_input", True) is False)
        sae.metrics = dict(metrics)
        return sae

    @classmethod
    def _load_sparsify(cls, path: Path, cfg: dict) -> TopKSAE:
        """sparsify's SparseCoder: encoder = nn.Linear (weight (latents, d_in)), W_dec (latents, d_in), b_dec."""
        cfg_path = path / CFG_FILE
        for flag, why in (("transcode", "a transcoder predicts another module's output"),
                          ("skip_connection", "its linear skip connection has no place in a TopK SAE")):
            if cfg.get(flag):
                raise FeatureTreeError(f"{cfg_path}: {flag}=true: {why}; featuretree reads plain TopK autoencoders")
        if cfg.get("activation", "topk") != "topk":
            raise FeatureTreeError(f"{cfg_path}: activation {cfg['activation']!r} is not TopK")
        try:
            d_in, k = int(cfg["d_in"]), int(cfg["k"])
            width = int(cfg.get("num_latents") or 0) or d_in * int(cfg["expansion_factor"])
        except (ValueError, KeyError, TypeError) as e:
            raise FeatureTreeError(f"{cfg_path} is not a valid sparsify config (missing or bad {e}): it needs d_in, "
                                   "k and num_latents or expansion_factor") from e
        if not 0 < k < width:
            raise FeatureTreeError(f"{cfg_path}: k={k} must be below the {width} latents")
        w = cls._weights(path / SPARSIFY_WEIGHTS, {"encoder.weight": (width, d_in), "encoder.bias": (width,),
                                                   "W_dec": (width, d_in), "b_dec": (d_in,)}, CFG_FILE)
        sae = cls(d_in, width, k, seed=None, metadata={"source": "sparsify", "sparsify_cfg": cfg})
        _fill(sae, w["encoder.weight"].t(), w["encoder.bias"], w["W_dec"], w["b_dec"], fold_b_dec=False)
        return sae


# ---- dictionaries that fire by threshold: JumpReLU, BatchTopK (at inference), ReLU ------------------------
MAX_CODES = 128
"""Codes a threshold dictionary returns per token at most (its `k`): the strongest, the rest dropped and counted."""

THRESHOLD_ARCHITECTURES = ("jumprelu", "batchtopk", "relu")
"""featuretree's names: JumpReLU (a threshold per feature), BatchTopK at inference (one threshold for all
features), ReLU / L1 ("standard" in SAELens; it fires wherever the pre-activation is positive)."""


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
        out = ThresholdSAE(self.d_model, width, self.threshold[:width], architecture=self.architecture,
                           max_codes=self.k, metadata=dict(self.metadata))
        out.W_enc.copy_(self.W_enc[:, :width])
        out.b_enc.copy_(self.b_enc[:width])
        out.W_dec.copy_(self.W_dec[:width])
        out.b_dec.copy_(self.b_dec)
        return out

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
        return out

    def _saved_tensors(self) -> tuple[str, ...]:  # `save` writes "threshold" too, except for a ReLU SAE
        return super()._saved_tensors() + (() if self.architecture == "relu" else ("threshold",))


GEMMA_SCOPE_WEIGHTS = "params.npz"  # Gemma Scope's own files: W_enc, W_dec, b_enc, b_dec, threshold


def load_dictionary(path: str | os.PathLike, *, max_codes: int = MAX_CODES) -> TopKSAE:
    """Load any sparse dictionary featuretree can link, by what its files say: SAELens' layout (cfg.json +
    sae_weights.safetensors) for architecture "topk", "jumprelu", "standard" (ReLU) and the training
    layout of "batchtopk" (one `topk_threshold`); sparsify's (cfg.json + sae.safetensors, TopK); Gemma
    Scope's params.npz (JumpReLU; read with allow_pickle=False). Never unpickles: dictionary_learning's
    `ae.pt` is refused with the one line that converts it.

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
    cfg_path = path / CFG_FILE
    if path.is_dir() and cfg_path.is_file() and (path / WEIGHTS_FILE).is_file():
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as e:
            raise FeatureTreeError(f"{cfg_path} is not a readable JSON config ({e}): re-save the dictionary") from e
        arch = cfg.get("architecture", "topk") if isinstance(cfg, dict) else "topk"
        if arch != "topk":
            return _load_saelens_threshold(path, cfg, arch, max_codes)
    return TopKSAE.load(path)


def _load_saelens_threshold(path: Path, cfg: dict, arch: str, max_codes: int) -> ThresholdSAE:
    cfg_path = path / CFG_FILE
    known = {"jumprelu": "jumprelu", "standard": "relu", "relu": "relu", "batchtopk": "batchtopk"}
    if arch not in known:
        raise FeatureTreeError(f"{cfg_path}: architecture {arch!r} is not one featuretree reads; it reads topk, "
                               "jumprelu, standard (ReLU), batchtopk (and matryoshka ladders of those); gated SAEs "
                               "and transcoders are not supported yet")
    for flag in ("rescale_acts_by_decoder_norm",):
        if cfg.get(flag):
            raise FeatureTreeError(f"{cfg_path}: {flag}=true is not supported: save the SAE with the decoder norm "
                                   "folded into W_enc / b_enc")
    _check_raw_inputs(cfg_path, cfg)
    try:
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    except (ValueError, KeyError, TypeError) as e:
        raise FeatureTreeError(f"{cfg_path} is not a valid SAE config (missing or bad {e}): it needs d_in and d_sae") from e
    w_path = path / WEIGHTS_FILE
    # every tensor of the file, read once; the four every SAE has are checked here, a threshold below
    weights = TopKSAE._weights(w_path, {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in),
                                        "b_dec": (d_in,)}, CFG_FILE)
    if known[arch] == "jumprelu":
        key = next((k for k in ("threshold", "log_threshold") if k in weights), None)
        if key is None:
            raise FeatureTreeError(f"{w_path}: a JumpReLU SAE needs a 'threshold' (or 'log_threshold') tensor; "
                                   "it has none")
        t = _checked(weights, {key: (d_sae,)}, w_path, CFG_FILE)[key].float()
        threshold = t if key == "threshold" else t.exp()
    elif known[arch] == "batchtopk":  # SAELens' training layout: one scalar threshold for every feature
        if "topk_threshold" not in weights:
            raise FeatureTreeError(f"{w_path}: a BatchTopK SAE needs its 'topk_threshold'; save it for inference "
                                   "(SAELens converts it to a JumpReLU threshold) or keep the training state")
        threshold = weights["topk_threshold"].float().reshape(-1)[0]
    else:
        threshold = torch.tensor(0.0)
    meta = dict(cfg.get("metadata") or {})
    meta.pop("featuretree_metrics", None)
    inner = meta.pop("featuretree_architecture", None)
    cap = int(meta.pop("featuretree_max_codes", 0) or max_codes)
    sae = ThresholdSAE(d_in, d_sae, threshold, architecture=inner if inner in THRESHOLD_ARCHITECTURES else known[arch],
                       max_codes=cap, metadata={**meta, "source": meta.get("source", "saelens"),
                                                "saelens_architecture": arch})
    _fill(sae, weights["W_enc"], weights["b_enc"], weights["W_dec"], weights["b_dec"],
          fold_b_dec=cfg.get("apply_b_dec_to_input", True) is False)
    sae.metrics = dict((cfg.get("metadata") or {}).get("featuretree_metrics") or {})
    return sae


def _checked(weights: dict[str, Tensor], expected: dict[str, tuple[int, ...]], w_path: Path,
             source: str) -> dict[str, Tensor]:
    """`weights`, once each expected tensor is there with its shape and finite; FeatureTreeError otherwise."""
    for name, shape in expected.items():
        if name not in weights or tuple(weights[name].shape) != shape:
            got = tuple(weights[name].shape) if name in weights else "missing"
            raise FeatureTreeError(f"{w_path}: {name} has shape {got}, expected {shape} from {source}")
        if not torch.isfinite(weights[name]).all():
            raise FeatureTreeError(f"{w_path}: {name} holds NaN or Inf: the dictionary is broken; retrain it")
    return weights


def _check_raw_inputs(cfg_path: Path, cfg: dict) -> None:
    """Refuse a SAELens config whose SAE expects rescaled inputs (featuretree feeds raw activations)."""
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise FeatureTreeError(f"{cfg_path}: normalize_activations={cfg['normalize_activations']!r} means the "
                               "SAE expects rescaled inputs; featuretree feeds raw activations, so it is refused")


def _fill(sae: TopKSAE, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, *, fold_b_dec: bool) -> None:
    """Copy weights into `sae`; with fold_b_dec (inputs not centred by b_dec) b_enc absorbs it exactly."""
    b_enc = b_enc.float()
    if fold_b_dec:  # pre = x W_enc + b_enc = (x - b_dec) W_enc + (b_enc + b_dec W_enc)
        b_enc = b_enc + b_dec.float() @ W_enc.float()
    with torch.no_grad():
        sae.W_enc.copy_(W_enc.float())
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(W_dec.float())
        sae.b_dec.copy_(b_dec.float())


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
    for k, shape in (("W_dec", (w, d)), ("b_enc", (w,)), ("b_dec", (d,)), ("threshold", (w,))):
        if tuple(arrays[k].shape) != shape:
            raise FeatureTreeError(f"{p}: {k} has shape {tuple(arrays[k].shape)}, expected {shape} from W_enc {(d, w)}")
    sae = ThresholdSAE(d, w, arrays["threshold"], architecture="jumprelu", max_codes=max_codes,
                       metadata={"source": "gemma-scope", "file": p.name})
    _fill(sae, arrays["W_enc"], arrays["b_enc"], arrays["W_dec"], arrays["b_dec"], fold_b_dec=True)
    return sae
