"""Fast feature selection on this CPU: compiled top-k and sampled dot products, and an int8 encoder pre-pass.

A TopK SAE step on CPU is dominated by choosing each token's k features: the (batch, width) encoder matmul
and torch.topk over its output cost more than everything else together. Here:
  * `topk_indices`: the kernel in `_topk.cpp` finds a per-row threshold from strided group maxima in one
    vectorised pass and scans only the groups that reach it (3-4x faster than torch.topk at width 4096);
  * `int8_candidates`: where the CPU has int8 dot-product instructions (VNNI / AMX), an int8 matmul
    (torch._int_mm, ~2x faster than fp32 here) ranks the features and the kernel keeps the best m, dequantising
    on the fly; the caller re-ranks those m candidates exactly in fp32 (`dots`), so the chosen set is the
    fp32 one except among near-ties;
  * `dots`: a[r] . B[idx[r, t]] for row-major B, vectorised (several times faster than sparse.sampled_addmm).
The kernels are compiled on first use with the system C++ compiler (plain C++, no torch headers, ~2 s) into a
per-user cache keyed by source and CPU, and loaded with ctypes. Without a compiler, or with
FEATURETREE_NATIVE=0, `available()` is False and callers use torch ops (same results, slower).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["available", "cache_dir", "cpu_flags", "csr_pattern", "csr_tensor", "dots", "fast_int8_matmul",
           "int8_candidates", "quantize_int8", "refine_topk", "sampled_dots", "topk_indices"]

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("_topk.cpp")
_I64, _PTR, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_SIGNATURES = {
    "ft_topk_f32": [_PTR, _I64, _I64, _I64, _PTR, _INT],
    "ft_topk_i8mm": [_PTR, _I64, _I64, _PTR, _PTR, _PTR, _I64, _PTR, _INT],
    "ft_sampled_dots": [_PTR, _I64, _I64, _PTR, _PTR, _I64, _PTR, _INT],
    "ft_refine_topk": [_PTR, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _PTR, _PTR, _INT],
    "ft_quantize_int8": [_PTR, _I64, _I64, _INT, _PTR, _PTR, _INT],
    "ft_csr_pattern": [_PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR],
}


def cache_dir() -> Path:
    """Where compiled kernels live: $FEATURETREE_CACHE, else $XDG_CACHE_HOME/featuretree, else ~/.cache/featuretree.

    Example:
        >>> cache_dir().name == "featuretree" or "FEATURETREE_CACHE" in os.environ
        True
    """
    if os.environ.get("FEATURETREE_CACHE"):
        return Path(os.environ["FEATURETREE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "featuretree"


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags Linux reports (/proc/cpuinfo); empty elsewhere.

    Example:
        >>> isinstance(cpu_flags(), frozenset)
        True
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _compile(src: Path, out: Path) -> None:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        raise OSError("no C++ compiler found (install g++ or set CXX)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    base = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", str(src), "-o", tmp]
    # tuned for this CPU (the cache key includes its flags) and threaded with OpenMP (the libgomp.so.1 torch
    # ships and has already loaded); without either if the compiler refuses (serial kernels, still correct)
    try:
        for extra in (["-march=native", "-fopenmp"], ["-fopenmp"], []):
            try:
                subprocess.run(base + extra, check=True, capture_output=True, text=True, timeout=300)
                break
            except subprocess.CalledProcessError:
                if not extra:
                    raise
        os.replace(tmp, out)  # atomic: a concurrent or killed build never leaves a half-written library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    if os.environ.get("FEATURETREE_NATIVE", "1") == "0":
        return None
    ident = b"|".join([_SOURCE.read_bytes(), platform.machine().encode(), " ".join(sorted(cpu_flags())).encode()])
    lib_path = cache_dir() / f"kernels-{hashlib.sha256(ident).hexdigest()[:16]}.so"
    try:
        if not lib_path.exists():
            log.info("compiling featuretree's selection kernels into %s", lib_path)
            _compile(_SOURCE, lib_path)
        lib = ctypes.CDLL(str(lib_path))
    except (OSError, subprocess.SubprocessError) as e:
        detail = (getattr(e, "stderr", "") or str(e) or type(e).__name__).strip().splitlines()
        log.warning("featuretree's compiled kernels are unavailable (%s); using torch ops, which are slower",
                    detail[-1] if detail else type(e).__name__)
        return None
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = ctypes.c_int, argtypes
    return lib


def _cpu_library(*tensors: Tensor | None) -> ctypes.CDLL | None:
    """The compiled kernels when every tensor given lives on the CPU (they read host memory), else None."""
    if any(t is not None and t.device.type != "cpu" for t in tensors):
        return None
    return _library()


def available() -> bool:
    """True when the compiled kernels are in use (else callers fall back to torch ops).

    Example:
        >>> isinstance(available(), bool)
        True
    """
    return _library() is not None


def fast_int8_matmul() -> bool:
    """True when int8 ranking pays here: kernels compiled and the CPU has VNNI or AMX int8 instructions.

    FEATURETREE_INT8=0 / 1 overrides the CPU check. A CPU flag, not a timing, so every run on one machine takes
    the same path (deterministic). Measured here (AVX512-VNNI): torch._int_mm (4096, 384) x (384, 4096)
    26 ms vs 55 ms in fp32 and 85 ms in bf16 (no AMX here, so bf16 runs slower than fp32).

    Example:
        >>> isinstance(fast_int8_matmul(), bool)
        True
    """
    forced = os.environ.get("FEATURETREE_INT8")
    if forced in ("0", "1"):
        return forced == "1" and available()
    vnni = {"avx512_vnni", "avx_vnni", "amx_int8"}
    return available() and bool(vnni & cpu_flags())


def _check_2d(t: Tensor, name: str, dtypes: tuple[torch.dtype, ...]) -> None:
    if t.dim() != 2 or t.dtype not in dtypes:
        raise ValueError(f"{name} must be a 2-d tensor of {' or '.join(map(str, dtypes))}, got {t.dtype} of "
                         f"shape {tuple(t.shape)}")


def _check_m(m: int, width: int) -> None:
    if not 0 < m <= width:
        raise ValueError(f"m must be in 1..{width} (the row length), got {m}")


def topk_indices(pre: Tensor, m: int) -> Tensor:
    """Indices (n, m) int64 of the m largest values in each row of a (n, width) float32 matrix.

    In no particular order; ties are broken arbitrarily; -inf entries are chosen last. The same set as
    `pre.topk(m, dim=1).indices` up to ties.

    Example:
        >>> pre = torch.tensor([[0.5, 3.0, -1.0, 2.0], [1.0, -2.0, 0.0, 4.0]])
        >>> topk_indices(pre, 2).sort(dim=1).values.tolist()
        [[1, 3], [0, 3]]
    """
    _check_2d(pre, "pre", (torch.float32,))
    n, width = pre.shape
    _check_m(m, width)
    lib = _cpu_library(pre)
    if lib is None or n == 0:
        return pre.topk(m, dim=1, sorted=False).indices
    pre = pre.contiguous()
    out = torch.empty(n, m, dtype=torch.int64)
    _ok(lib.ft_topk_f32(pre.data_ptr(), n, width, m, out.data_ptr(), torch.get_num_threads()))
    return out


def quantize_int8(t: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Symmetric int8 quantisation of a 2-d float32 tensor, one scale per row (dim=1) or column (dim=0).

    Returns (int8 tensor, float32 scales) with t ~= q * scale (scales broadcast); an all-zero slice gets scale 1.
    Rounds half away from zero when compiled, half to even in the torch fallback.

    Example:
        >>> q, s = quantize_int8(torch.tensor([[1.0, -2.0], [0.5, 0.25]]), dim=1)
        >>> q.tolist(), [round(v, 4) for v in s.flatten().tolist()]
        ([[64, -127], [127, 64]], [0.0157, 0.0039])
    """
    _check_2d(t, "t", (torch.float32,))
    lib = _cpu_library(t)
    if lib is None:
        scale = t.abs().amax(dim=dim, keepdim=True).div_(127.0)
        scale.masked_fill_(scale == 0, 1.0)
        return torch.round(t / scale).to(torch.int8), scale
    t = t.detach().contiguous()
    q = torch.empty(t.shape, dtype=torch.int8)
    scale = torch.empty((t.shape[0], 1) if dim == 1 else (1, t.shape[1]))
    _ok(lib.ft_quantize_int8(t.data_ptr(), t.shape[0], t.shape[1], int(dim == 1), q.data_ptr(), scale.data_ptr(),
                             torch.get_num_threads()))
    return q, scale


def int8_candidates(x: Tensor, W: Tensor, bias: Tensor, m: int, among: Tensor | None = None) -> Tensor:
    """Indices (n, m) of the m largest entries of x @ W + bias per row, ranked by an int8 matmul.

    x (n, d) and W (d, width) are quantised with one scale per row of x and per column of W; the ranking
    is approximate (int8 rounding), so ask for a margin over the k you need and re-rank exactly. `among`
    (a (width,) bool mask) excludes the other columns. Needs the compiled kernels (`available()`).

    Example:
        >>> x, W, b = torch.randn(6, 32), torch.randn(32, 500), torch.zeros(500)
        >>> cand = int8_candidates(x, W, b, 20) if available() else (x @ W).topk(20, 1).indices
        >>> bool((cand == (x @ W).argmax(1, keepdim=True)).any(1).all())  # the best is always a candidate
        True
    """
    lib = _cpu_library(x, W, bias, among)
    if lib is None:
        raise RuntimeError("int8_candidates needs featuretree's compiled kernels and CPU tensors; check native.available() first")
    _check_2d(x, "x", (torch.float32,))
    _check_2d(W, "W", (torch.float32,))
    n, width = x.shape[0], W.shape[1]
    _check_m(m, width)
    xq, xs = quantize_int8(x, dim=1)  # (n, d), (n, 1)
    if W.t().is_contiguous():  # a (width, d) row-major encoder (TopKSAE's layout): per-row scales, no copy
        wq_t, ws_t = quantize_int8(W.t(), dim=1)
        wq, ws = wq_t.t(), ws_t.t()  # (d, width), (1, width)
    else:
        wq, ws = quantize_int8(W, dim=0)
    bias = bias.detach().float()
    if among is not None:
        bias = bias.masked_fill(~among, float("-inf"))
    out = torch.empty(n, m, dtype=torch.int64)
    xs, ws, bias = xs.contiguous(), ws.contiguous(), bias.contiguous()
    acc = torch._int_mm(xq, wq)  # (n, width) int32
    _ok(lib.ft_topk_i8mm(acc.data_ptr(), n, width, xs.data_ptr(), ws.data_ptr(), bias.data_ptr(), m, out.data_ptr(),
                         torch.get_num_threads()))
    return out


def dots(a: Tensor, B: Tensor, idx: Tensor) -> Tensor:
    """out[r, t] = a[r] . B[idx[r, t]] for a (n, d) and B (width, d), float32: a sampled matmul a @ B.T.

    Compiled when `available()`, else a gather-free torch fallback (torch.sparse.sampled_addmm).

    Example:
        >>> a, B, i = torch.randn(3, 4), torch.randn(10, 4), torch.tensor([[7, 1], [0, 9], [2, 3]])
        >>> torch.allclose(dots(a, B, i), (a @ B.T).gather(1, i), atol=1e-5)
        True
    """
    _check_2d(a, "a", (torch.float32,))
    _check_2d(B, "B", (torch.float32,))
    n, m = idx.shape
    if B.shape[1] != a.shape[1] or idx.shape[0] != n:
        raise ValueError(f"shapes do not chain: a {tuple(a.shape)}, B {tuple(B.shape)}, idx {tuple(idx.shape)}")
    lib = _cpu_library(a, B, idx)
    if lib is None:
        return sampled_dots(a, B.t(), idx)
    if idx.numel() and not 0 <= int(idx.min()) <= int(idx.max()) < B.shape[0]:
        raise ValueError(f"idx must lie in 0..{B.shape[0] - 1}")
    a, B, idx = a.contiguous(), B.contiguous(), idx.to(torch.int64).contiguous()
    out = torch.empty(n, m, dtype=torch.float32)
    _ok(lib.ft_sampled_dots(a.data_ptr(), n, a.shape[1], B.data_ptr(), idx.data_ptr(), m, out.data_ptr(),
                            torch.get_num_threads()))
    return out


def csr_tensor(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    """A CSR tensor without torch's once-per-process "CSR support is in beta" warning.

    Parameters
    ----------
    crow : Tensor (n_rows + 1,)
        Row pointers: row i's entries are col[crow[i]:crow[i + 1]].
    col : Tensor (nnz,)
        Column index of each entry.
    values : Tensor (nnz,)
        Value of each entry.
    size : (int, int)
        The dense shape (n_rows, n_cols).

    Example:
        >>> csr_tensor(torch.tensor([0, 1, 2]), torch.tensor([1, 0]), torch.ones(2), (2, 2)).to_dense().tolist()
        [[0.0, 1.0], [1.0, 0.0]]
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def sampled_dots(a: Tensor, B: Tensor, indices: Tensor) -> Tensor:
    """(a @ B)[r, indices[r, j]] for every (r, j), without forming a @ B: a sampled matmul (SDDMM).

    a (n, d), B (d, width), indices (n, m) distinct per row -> (n, m) in the order of `indices`. The torch
    fallback of `dots` (which takes B transposed).

    Example:
        >>> a, B, i = torch.randn(3, 4), torch.randn(4, 10), torch.tensor([[7, 1], [0, 9], [2, 3]])
        >>> torch.allclose(sampled_dots(a, B, i), (a @ B).gather(1, i), atol=1e-5)
        True
    """
    n, m = indices.shape
    cols, order = indices.sort(dim=1)  # CSR wants sorted columns within each row
    crow = torch.arange(0, n * m + 1, m, device=a.device)
    S = csr_tensor(crow, cols.reshape(-1), torch.zeros(n * m, dtype=a.dtype), (n, B.shape[1]))
    vals = torch.sparse.sampled_addmm(S, a, B).values().view(n, m)  # (n, m) in sorted-column order
    return torch.empty_like(vals).scatter_(1, order, vals)


def refine_topk(a: Tensor, Bt: Tensor, bias: Tensor, cand: Tensor, k: int,
                among: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The k best candidates per row by exact fp32 score a[r] . Bt[j] + bias[j]: (values (n, k), indices (n, k)).

    `cand` (n, m) holds candidate columns (distinct per row, e.g. from `int8_candidates`); Bt is (width, d)
    row-major; `among` (width,) bool gives -inf to the other columns. In no particular order.

    Example:
        >>> a, Bt, b = torch.randn(4, 8), torch.randn(50, 8), torch.randn(50)
        >>> cand = torch.stack([torch.randperm(50)[:10] for _ in range(4)])
        >>> v, i = refine_topk(a, Bt, b, cand, 3)
        >>> ref = (a @ Bt.T + b).gather(1, cand).topk(3, dim=1).values
        >>> torch.allclose(v.sort(1, descending=True).values, ref, atol=1e-5)
        True
    """
    n, m = cand.shape
    if not 0 < k <= m:
        raise ValueError(f"k must be in 1..{m} (the number of candidates), got {k}")
    lib = _cpu_library(a, Bt, bias, cand, among)
    if lib is None:
        vals = dots(a, Bt, cand) + bias[cand]
        if among is not None:
            vals.masked_fill_(~among[cand], float("-inf"))
        top, j = vals.topk(k, dim=1, sorted=False)
        return top, cand.gather(1, j)
    _check_2d(a, "a", (torch.float32,))
    _check_2d(Bt, "Bt", (torch.float32,))
    a, Bt, cand = a.detach().contiguous(), Bt.detach().contiguous(), cand.contiguous()
    bias = bias.detach().float().contiguous()
    mask = among.to(torch.uint8).contiguous() if among is not None else None
    vals, idx = torch.empty(n, k), torch.empty(n, k, dtype=torch.int64)
    _ok(lib.ft_refine_topk(a.data_ptr(), n, a.shape[1], Bt.data_ptr(), bias.data_ptr(),
                           mask.data_ptr() if mask is not None else None, cand.data_ptr(), m, k, vals.data_ptr(),
                           idx.data_ptr(), torch.get_num_threads()))
    return vals, idx


def csr_pattern(indices: Tensor, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """Sparsity pattern of the (width, n) matrix with a non-zero at (indices[r, j], r): (order, crow, col).

    `order` permutes the flattened (n * k) entries into feature-major CSR order (stable); shared by the
    encoder's and the decoder's backward, which both need a (width, n) sparse @ (n, d) product with these
    positions. A counting sort when compiled, else a stable argsort.

    Example:
        >>> order, crow, col = csr_pattern(torch.tensor([[2, 0], [2, 1]]), 3)
        >>> order.tolist(), crow.tolist(), col.tolist()
        ([1, 3, 0, 2], [0, 1, 2, 4], [0, 1, 0, 1])
    """
    n, k = indices.shape
    lib = _cpu_library(indices)
    if lib is None:
        flat = indices.reshape(-1)
        order = flat.argsort(stable=True)
        crow = torch.zeros(width + 1, dtype=torch.long, device=indices.device)
        crow[1:] = torch.bincount(flat, minlength=width).cumsum(0)
        return order, crow, torch.div(order, k, rounding_mode="floor")  # col: the token row of each entry
    indices = indices.to(torch.int64).contiguous()
    order, col = torch.empty(n * k, dtype=torch.int64), torch.empty(n * k, dtype=torch.int64)
    crow = torch.empty(width + 1, dtype=torch.int64)
    if lib.ft_csr_pattern(indices.data_ptr(), n, k, width, order.data_ptr(), crow.data_ptr(), col.data_ptr()):
        raise ValueError(f"indices must lie in 0..{width - 1}")
    return order, crow, col


def _ok(rc: int) -> None:
    if rc != 0:  # the kernels' own argument checks; unreachable after the Python-side checks
        raise RuntimeError(f"featuretree's compiled kernel failed with code {rc}")
