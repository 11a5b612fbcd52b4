"""TopKSAE, the dictionary featuretree trains: a sparse (k-row) encoder backward and decoder, saved in SAELens'
layout, read from SAELens' or sparsify's files; plus the weight checks every format's loader shares (the other
architectures are in featuretree.dictionaries).

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

__all__ = ["CFG_FILE", "check_raw_inputs", "check_weights", "fill_weights", "INT8_MARGIN", "INT8_MIN_WIDTH",
           "read_weights", "SPARSIFY_WEIGHTS", "TopKSAE", "WEIGHTS_FILE"]

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
        save_tensors(path / WEIGHTS_FILE, self._saved_tensors())
        write_json(path / CFG_FILE, self.cfg_dict())
        return path

    def _saved_tensors(self) -> dict[str, Tensor]:  # {name in the file: tensor}
        return {n: getattr(self, n) for n in ("W_enc", "b_enc", "W_dec", "b_dec")}

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
        check_raw_inputs(cfg_path, cfg)
        if not 0 < k < d_sae or d_in <= 0:
            raise FeatureTreeError(f"{cfg_path}: k={k}, d_in={d_in}, d_sae={d_sae}: need 0 < k < d_sae and d_in > 0")
        weights = read_weights(w_path, {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in),
                                        "b_dec": (d_in,)}, CFG_FILE)
        meta = dict(cfg.get("metadata") or {})
        metrics = meta.pop("featuretree_metrics", {}) or {}
        sae = cls(d_in, d_sae, k, seed=None, metadata=meta)
        fill_weights(sae, weights["W_enc"], weights["b_enc"], weights["W_dec"], weights["b_dec"],
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
        w = read_weights(path / SPARSIFY_WEIGHTS, {"encoder.weight": (width, d_in), "encoder.bias": (width,),
                                                   "W_dec": (width, d_in), "b_dec": (d_in,)}, CFG_FILE)
        sae = cls(d_in, width, k, seed=None, metadata={"source": "sparsify", "sparsify_cfg": cfg})
        fill_weights(sae, w["encoder.weight"].t(), w["encoder.bias"], w["W_dec"], w["b_dec"], fold_b_dec=False)
        return sae


# ---- reading weights: shared by every format's loader -------------------------------------------------
def read_weights(w_path: Path, expected: dict[str, tuple[int, ...]], source: str) -> dict[str, Tensor]:
    """Every tensor of a safetensors file (never a pickle), once the `expected` ones are there with their shapes
    and finite.

    Parameters
    ----------
    w_path : Path
        The .safetensors file.
    expected : dict
        {name: shape} that must be present.
    source : str
        Where the shapes come from (named in the error, e.g. "cfg.json").

    Example:
        >>> import tempfile
        >>> d = TopKSAE(8, 32, 2).save(tempfile.mkdtemp())
        >>> sorted(read_weights(d / WEIGHTS_FILE, {"W_enc": (8, 32)}, CFG_FILE))
        ['W_dec', 'W_enc', 'b_dec', 'b_enc']
    """
    from safetensors.torch import load_file

    check_safetensors(w_path)
    try:
        weights = load_file(str(w_path))
    except Exception as e:  # safetensors raises its own error types on damaged files
        raise FeatureTreeError(f"{w_path} is not a readable safetensors file ({e}); re-save or retrain it") from e
    return check_weights(weights, expected, w_path, source)


def check_weights(weights: dict[str, Tensor], expected: dict[str, tuple[int, ...]], w_path: Path,
             source: str) -> dict[str, Tensor]:
    """`weights`, once each expected tensor is there with its shape and finite; FeatureTreeError otherwise.

    Parameters
    ----------
    weights : dict of Tensor
        The tensors read.
    expected : dict
        {name: shape} that must be present.
    w_path : Path
        The file they came from (named in the error).
    source : str
        Where the shapes come from.

    Example:
        >>> sorted(check_weights({"b": torch.zeros(3)}, {"b": (3,)}, Path("w.safetensors"), CFG_FILE))
        ['b']
    """
    for name, shape in expected.items():
        if name not in weights or tuple(weights[name].shape) != shape:
            got = tuple(weights[name].shape) if name in weights else "missing"
            raise FeatureTreeError(f"{w_path}: {name} has shape {got}, expected {shape} from {source}")
        if not torch.isfinite(weights[name]).all():
            raise FeatureTreeError(f"{w_path}: {name} holds NaN or Inf: the dictionary is broken; retrain it")
    return weights


def check_raw_inputs(cfg_path: Path, cfg: dict) -> None:
    """Refuse a SAELens config whose SAE expects rescaled inputs (featuretree feeds raw activations).

    Parameters
    ----------
    cfg_path : Path
        The config file (named in the error).
    cfg : dict
        Its contents.

    Example:
        >>> check_raw_inputs(Path(CFG_FILE), {"normalize_activations": "none"}) is None
        True
    """
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise FeatureTreeError(f"{cfg_path}: normalize_activations={cfg['normalize_activations']!r} means the "
                               "SAE expects rescaled inputs; featuretree feeds raw activations, so it is refused")


def fill_weights(sae: TopKSAE, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, *, fold_b_dec: bool) -> None:
    """Copy weights into `sae`; with fold_b_dec (inputs not centred by b_dec) b_enc absorbs it exactly:
    x W_enc + b_enc = (x - b_dec) W_enc + (b_enc + b_dec W_enc).

    Parameters
    ----------
    sae : TopKSAE
        The dictionary to fill (any subclass).
    W_enc, b_enc, W_dec, b_dec : Tensor
        The weights, in featuretree's shapes ((d, w), (w,), (w, d), (d,)).
    fold_b_dec : bool
        The source does not subtract b_dec from its input.

    Example:
        >>> sae = TopKSAE(4, 8, 2)
        >>> fill_weights(sae, torch.eye(4, 8), torch.zeros(8), torch.eye(8, 4), torch.ones(4), fold_b_dec=True)
        >>> sae.b_enc[:4].tolist()
        [1.0, 1.0, 1.0, 1.0]
    """
    b_enc = b_enc.float()
    if fold_b_dec:
        b_enc = b_enc + b_dec.float() @ W_enc.float()
    with torch.no_grad():
        sae.W_enc.copy_(W_enc.float())
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(W_dec.float())
        sae.b_dec.copy_(b_dec.float())
