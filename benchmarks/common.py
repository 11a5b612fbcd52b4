"""Helpers shared by the benchmarks: cached WordNet harvest, peak-RSS probes, machine facts, markdown tables.

Imported by `train_speed.py` and `harvest_speed.py` (run them as scripts; this directory is on sys.path).

Peak memory per phase: Linux keeps a resident-set high-water mark (VmHWM) that writing "5" to
/proc/self/clear_refs resets to the current RSS, so `PeakRSS` measures the peak of one phase inside a
process that ran other phases before. Freed heap is handed back first (gc + malloc_trim) so one phase's
leftovers do not hide the next phase's growth.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import resource
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def malloc_trim() -> None:
    """Return free heap pages to the OS (glibc), after a gc pass."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc malloc.h


def set_malloc(mode: str) -> str:
    """Give every trainer in this process the same glibc allocator policy; returns a description.

    featuretree's train_ladder (since 49ba767) calls `tune_malloc()`, a process-wide mallopt that keeps
    freed buffers in the heap; left alone, it would also speed up every trainer that runs after it.
    "tuned": apply that same mallopt now, before any trainer (the effect of MALLOC_MMAP_MAX_=0 with a
    large MALLOC_TRIM_THRESHOLD_). "default": glibc's defaults for all, featuretree's call disabled.
    """
    import featuretree.train as ftt

    if mode == "tuned":
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(2**30)) and libc.mallopt(M_MMAP_MAX, 0)
        return "tuned for all trainers: mallopt(M_TRIM_THRESHOLD=2**30, M_MMAP_MAX=0)" + ("" if ok else " FAILED")
    if hasattr(ftt, "tune_malloc"):
        ftt.tune_malloc = lambda: False  # train_ladder looks it up in its module at call time
    return "glibc defaults for all trainers (featuretree's tune_malloc disabled)"


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float:
    """Current resident set size of this process, MB."""
    kb = _status_kb("VmRSS")
    return kb / 1024 if kb is not None else float("nan")


class PeakRSS:
    """Context manager: peak RSS (MB) of the enclosed phase, and its growth over the RSS at entry.

    Example:
        >>> with PeakRSS() as mem:          # doctest: +SKIP
        ...     work()
        >>> mem.peak_mb, mem.delta_mb       # doctest: +SKIP
    """

    def __enter__(self) -> PeakRSS:
        malloc_trim()
        self.base_mb = rss_mb()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.exact = True
        except OSError:  # no clear_refs: fall back to the process-lifetime maximum
            self.exact = False
        return self

    def __exit__(self, *exc) -> None:
        kb = _status_kb("VmHWM") if self.exact else None
        if kb is None:
            kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.peak_mb = kb / 1024
        self.delta_mb = self.peak_mb - self.base_mb


def hwm_mb() -> float:
    """Peak RSS (VmHWM, MB) of this process since it started or since the last `PeakRSS` reset.

    Not ru_maxrss: for a child started by fork + exec, that also counts the parent's pages it mapped
    between fork and exec.
    """
    kb = _status_kb("VmHWM")
    return kb / 1024 if kb is not None else float("nan")


def harvest(n_tokens: int, cache: Path = CACHE, *, layer: int = 3, log=print):
    """Activations of `n_tokens` WordNet gloss tokens at `layer` of the embedded model, harvested once.

    Reuses `cache/wordnet-l<layer>-<n_tokens>/` when it holds a complete store (meta.json).
    """
    import featuretree as ft
    from featuretree.activations import Activations

    out = Path(cache) / f"wordnet-l{layer}-{n_tokens}"
    if (out / "meta.json").exists():
        try:
            return Activations(out)
        except ft.FeatureTreeError:
            pass  # incomplete: harvest again
    log(f"harvesting {n_tokens} tokens into {out} ...")
    t = time.perf_counter()
    acts = ft.collect(ft.load_model(), layer, ft.load_corpus("wordnet"), n_tokens=n_tokens, out=out,
                      progress=False)
    log(f"harvested {len(acts)} tokens in {time.perf_counter() - t:.0f} s")
    return acts


def machine_info() -> dict[str, str]:
    """CPU model, cores, torch version and threads, git commit of the repo, malloc env: the run's context."""
    import torch

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", str(HERE.parent), "log", "-1", "--format=%h"],
                                capture_output=True, text=True, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(HERE.parent), "status", "--porcelain", "featuretree"],
                               capture_output=True, text=True, check=False).stdout.strip()
        commit += " (featuretree/ has uncommitted changes)" if dirty else ""
    except OSError:
        commit = "unknown"
    malloc = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")) or "none"
    from featuretree import native

    flags = native.cpu_flags()
    isa = ", ".join(f for f in ("avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags) or "none of them"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": f"{cpu}, nproc {os.cpu_count()}",
        "python": platform.python_version(),
        "torch": f"{torch.__version__}, {torch.get_num_threads()} threads",
        "featuretree commit": commit,
        "malloc env": malloc,
        "cpu matmul extensions (avx512_vnni, avx512_bf16, amx_bf16, amx_int8)": isa,
        "featuretree kernels": ("compiled" if native.available() else "unavailable (torch ops)")
        + f", int8 ranking {'on' if native.fast_int8_matmul() else 'off'}",
        "load average (1/5/15 min) at start": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }


def print_info(info: dict[str, str]) -> None:
    for k, v in info.items():
        print(f"- {k}: {v}")
    print()


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; floats are printed as given (format them before)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
