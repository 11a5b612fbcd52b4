"""train_ladder: train TopK dictionaries of several widths from ONE pass over an activation stream.

Every batch feeds every rung, so a ladder costs one harvest and one read of the data. Per rung:
    loss = FVU(x, x_hat) + auxk_alpha * AuxK,   FVU = ||x - x_hat||^2 / ||x - mean(x)||^2
AuxK (Gao et al. 2024) reconstructs the residual x - x_hat from the top `k_aux` *dead* features
(not fired for `dead_tokens` tokens) so they get gradient and revive. Adam with lr = 2e-4 / sqrt(width / 2^14)
unless given; decoder rows are unit-norm after every step and their gradient's radial part is removed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from featuretree.activations import d_model_of, is_store, iter_batches, n_rows
from featuretree.checkpoint import Checkpoint, Resume, data_fingerprint
from featuretree.config import FeatureTreeError, TrainConfig, settings
from featuretree.sae import TopKSAE
from featuretree.utils import resolve_device, write_json

__all__ = ["default_lr", "evaluate", "evaluate_many", "fit_local", "local_k", "LOCAL_MAX_LR", "train_ladder",
           "tune_malloc"]

log = logging.getLogger(__name__)


def default_lr(width: int) -> float:
    """Width-scaled Adam learning rate, 6e-4 / sqrt(width / 2**14): sparsify's rule times 3.

    sparsify's 2e-4 is tuned for runs of ~10^5 steps; featuretree ladders take ~10^3 (CPU, a few hundred
    thousand tokens). Measured on MiniLM layer 3 (300k WordNet tokens, batch 1024, 4 epochs): FVU of the
    2048 / 8192 rungs 0.243 / 0.256 at 1x vs 0.211 / 0.188 at 3x.

    Example:
        >>> round(default_lr(2**14), 6)
        0.0006
    """
    return 6e-4 / math.sqrt(width / 2**14)


def tune_malloc() -> bool:
    """Keep freed memory in glibc's heap instead of mmap/munmap-ing it every step; True if applied.

    Training allocates and frees the same large buffers every step; glibc serves blocks over 128 KiB
    with mmap and returns them at once, so each step pays page faults again. Measured here
    (d_model 384, k 32, batch 4096): 47k -> 50k tokens/s at width 4096, 20k -> 23k at width 16384 (the
    same as setting MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large> before start). Process-wide,
    so applied only when training starts; a no-op off glibc.

    Example:
        >>> isinstance(tune_malloc(), bool)
        True
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
        ok = bool(libc.mallopt(m_trim_threshold, ctypes.c_int(2**30))) and bool(libc.mallopt(m_mmap_max, 0))
    except (OSError, AttributeError):
        return False
    log.debug("glibc mallopt applied: %s", ok)
    return ok


def _check_finite(x: Tensor) -> None:
    if not torch.isfinite(x).all():
        raise FeatureTreeError("activations contain NaN or Inf: check the model's dtype or drop the bad rows before training")


class _Rung:
    """One dictionary's optimiser state and dead-feature clock (internal to train_ladder)."""

    def __init__(self, sae: TopKSAE, lr: float, dead_tokens: int, auxk_alpha: float,
                 prefixes: tuple[int, ...] = ()) -> None:
        self.sae = sae
        self.prefixes = prefixes  # nested (Matryoshka) training: also reconstruct from each prefix of features
        self.opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True)
        self.since_fired = torch.zeros(sae.width, dtype=torch.long, device=sae.W_dec.device)  # tokens since it fired
        self.dead_tokens, self.auxk_alpha = dead_tokens, auxk_alpha
        self.k_aux = min(sae.d_model // 2, sae.width - sae.k)
        self.stats = {"fvu": 0.0, "aux": 0.0, "n": 0}
        # running sums of [fvu, aux] x batch rows kept on the device, so a step never waits for the GPU to log
        self.sums = torch.zeros(2, dtype=torch.float64, device=sae.W_dec.device)
        self.logged = torch.zeros(2, device=sae.W_dec.device)

    @property
    def last_fvu(self) -> float:
        """The last step's batch FVU (reading it waits for the step to finish)."""
        return float(self.logged[0])

    def sync_stats(self) -> dict:
        """`stats` brought up to date from the device-side sums (call before reading or saving them)."""
        self.stats["fvu"], self.stats["aux"] = self.sums.tolist()
        return self.stats

    def restore_stats(self, stats: dict) -> None:
        self.stats = dict(stats)
        self.sums = torch.tensor([self.stats["fvu"], self.stats["aux"]], dtype=torch.float64, device=self.sums.device)

    def step(self, x: Tensor, denom: Tensor, comm=None, n_batch: int | None = None) -> None:
        """One optimiser step on `x` (this rank's rows of a batch of `n_batch` rows whose variance is `denom`)."""
        sae = self.sae
        n_batch = x.shape[0] if n_batch is None else n_batch
        values, indices = sae.encode(x)  # (n, k) each
        x_hat = sae.decode(values, indices)  # (n, d)
        err = x - x_hat
        fvu = err.pow(2).sum() / denom
        loss = fvu
        if self.prefixes:  # Matryoshka: the first w features alone must reconstruct x too, for every prefix w
            partial = [(x - sae.decode(values * (indices < w), indices)).pow(2).sum() / denom
                       for w in self.prefixes if w < sae.width]
            loss = (fvu + sum(partial)) / (1 + len(partial))
        dead = self.since_fired > self.dead_tokens  # (width,)
        aux = torch.zeros((), device=x.device)
        if self.auxk_alpha > 0 and bool(dead.any()):
            vals, idx = sae.encode(x, k=min(self.k_aux, int(dead.sum())), among=dead)  # (n, k_aux)
            aux_hat = F.embedding_bag(idx, sae.W_dec, per_sample_weights=vals, mode="sum")  # (n, d)
            resid = err.detach()
            if comm is None:
                resid_var = resid.sub(resid.mean(0)).pow(2).sum()
            else:  # the whole batch's residual variance: sum, sum of squares and count over ranks
                count = torch.tensor([resid.shape[0]], dtype=resid.dtype, device=x.device)
                m = comm.sum_(torch.cat([resid.sum(0), resid.pow(2).sum().view(1), count]))
                resid_var = m[-2] - m[:-2].pow(2).sum() / m[-1].clamp_min(1)
            aux = (resid - aux_hat).pow(2).sum() / resid_var.clamp_min(1e-8)
            loss = loss + self.auxk_alpha * aux
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if comm is not None:  # each rank's loss is its share of the batch's: summed gradients = the batch's
            for p in sae.parameters():
                if p.grad is not None:
                    comm.sum_(p.grad)
        sae.remove_parallel_grad()
        self.opt.step()
        sae.normalize_decoder()
        with torch.no_grad():
            fired = torch.zeros(sae.width, dtype=torch.uint8, device=x.device)  # scatter: no host sync
            fired.scatter_reduce_(0, indices.reshape(-1), (values > 0).reshape(-1).to(torch.uint8), reduce="amax")
            if comm is not None:
                comm.max_(fired)
            self.since_fired += n_batch
            self.since_fired[fired.bool()] = 0
            logged = torch.stack([fvu.detach(), aux.detach()])
            if comm is not None:
                comm.sum_(logged)
        self.logged = logged
        self.sums += logged.double() * n_batch  # the same float64 arithmetic as summing Python floats
        self.stats["n"] += n_batch


class _Prefix:
    """A prefix of a nested dictionary, shaped like a trained _Rung for train_ladder's bookkeeping."""

    def __init__(self, sae: TopKSAE, whole: _Rung) -> None:
        self.sae, self.stats, self.opt = sae, whole.stats, whole.opt


def evaluate(sae: TopKSAE, batches: Iterable[Tensor]) -> dict[str, float]:
    """FVU, mean L0 and dead fraction (features that never fire) of `sae` over `batches`.

    Example:
        >>> m = evaluate(TopKSAE(8, 32, 2), [torch.randn(64, 8)])
        >>> sorted(m)
        ['dead_fraction', 'fvu', 'l0', 'n_tokens']
    """
    return evaluate_many([sae], batches)[0]


@torch.no_grad()
def evaluate_many(saes: list[TopKSAE], batches: Iterable[Tensor]) -> list[dict[str, float]]:
    """`evaluate` for several dictionaries in one pass over `batches` (the data is read once).

    Parameters
    ----------
    saes : list of TopKSAE
        The dictionaries, all of the same d_model (batches move to the first one's device).
    batches : iterable of Tensor (b, d_model), or of (x, y) pairs
        The evaluation rows; a pair scores the reconstruction against `y` (a transcoder's target: the
        output of the module whose input `x` is).

    Example:
        >>> a, b = evaluate_many([TopKSAE(8, 32, 2), TopKSAE(8, 64, 2)], [torch.randn(64, 8)])
        >>> a["n_tokens"] == b["n_tokens"] == 64
        True
    """
    sse = [torch.zeros((), dtype=torch.float64) for _ in saes]
    l0 = [0 for _ in saes]
    fired = [torch.zeros(sae.width, dtype=torch.bool, device=sae.W_dec.device) for sae in saes]
    sx = sxx = None
    n = 0
    device = saes[0].W_dec.device if saes else torch.device("cpu")
    for item in batches:
        pair = isinstance(item, tuple)
        x = (item[0] if pair else item).to(device=device, dtype=torch.float32)
        y = item[1].to(device=device, dtype=torch.float32) if pair else x
        for j, sae in enumerate(saes):
            values, indices = sae.encode(x)
            recon = sae.decode(values, indices)
            skip = getattr(sae, "W_skip", None)  # a skip transcoder's linear path is part of its reconstruction
            if skip is not None:
                recon = recon + x @ skip.T
            sse[j] += (y - recon).double().pow(2).sum()
            active = values > 0
            l0[j] += int(active.sum())
            fired[j][indices[active]] = True
        sx = y.double().sum(0) if sx is None else sx + y.double().sum(0)  # float64 sums (also on CUDA)
        sxx = y.double().pow(2).sum() if sxx is None else sxx + y.double().pow(2).sum()
        n += x.shape[0]
    if n == 0:
        raise FeatureTreeError("no tokens to evaluate on: collect more tokens (held-out docs are a tenth of them)")
    total_var = sxx - sx.pow(2).sum() / n
    return [{"fvu": float(e / total_var), "l0": c / n, "dead_fraction": float((~f).float().mean()), "n_tokens": n}
            for e, c, f in zip(sse, l0, fired)]


def _pack(rungs: dict[int, _Rung]) -> tuple[dict[str, Tensor], dict]:
    """Every rung's weights, Adam state and dead-feature clock as named tensors, plus the JSON-able rest."""
    tensors: dict[str, Tensor] = {}
    info: dict = {"rungs": {}}
    for w, r in rungs.items():
        for name, param in r.sae.named_parameters():
            tensors[f"w{w}/{name}"] = param.detach().cpu()
        opt = r.opt.state_dict()
        for i, st in opt["state"].items():
            for key, v in st.items():
                tensors[f"w{w}/opt/{i}/{key}"] = v.cpu()
        tensors[f"w{w}/since_fired"] = r.since_fired.cpu()
        info["rungs"][str(w)] = {"stats": dict(r.sync_stats()), "param_groups": opt["param_groups"]}
    return tensors, info


def _unpack(rungs: dict[int, _Rung], tensors: dict[str, Tensor], info: dict) -> None:
    """Restore what `_pack` saved into freshly built rungs (bit for bit)."""
    with torch.no_grad():
        for w, r in rungs.items():
            for name, param in r.sae.named_parameters():
                param.copy_(tensors[f"w{w}/{name}"])
            state: dict[int, dict] = {}
            prefix = f"w{w}/opt/"
            for key, v in tensors.items():
                if key.startswith(prefix):
                    i, name = key[len(prefix):].split("/", 1)
                    state.setdefault(int(i), {})[name] = v  # load_state_dict moves them to the parameter's device
            r.opt.load_state_dict({"state": state, "param_groups": info["rungs"][str(w)]["param_groups"]})
            for param in r.sae.parameters():  # moments laid out like their parameter (W_enc is column-major):
                st = r.opt.state[param]  # the fused step's vectorised and strided loops round differently
                for key, v in st.items():
                    if v.shape == param.shape:
                        st[key] = torch.empty_like(param).copy_(v)
            r.since_fired.copy_(tensors[f"w{w}/since_fired"])
            r.restore_stats(info["rungs"][str(w)]["stats"])


def _source_of(acts) -> dict:
    """SAELens' metadata fields for where the activations came from (a store knows; a Tensor does not)."""
    if not is_store(acts):
        return {}
    m = acts.meta
    out = {"model_name": m.get("model"), "hook_name": m.get("hook_name"), "hook_layer": m.get("layer"),
           "context_size": m.get("max_length"), "prepend_bos": True}
    return {k: v for k, v in out.items() if v is not None}


def train_ladder(acts, widths=None, k: int | None = None, *, config: TrainConfig | None = None, out=None,
                 eval_acts=None, callback=None, checkpoint=None, init: dict | None = None, comm=None,
                 progress: bool = True, **overrides) -> dict[int, TopKSAE]:
    """Train one TopK dictionary per width from a single pass over `acts` (all rungs see every batch).

    Each returned SAE has `.metrics` (fvu, l0, dead_fraction, n_tokens, train_fvu). `nested=True` trains ONE
    dictionary of the widest width whose first w features must also reconstruct the input alone, for every
    width w (a Matryoshka SAE); the rungs returned are its prefixes (`TopKSAE.prefix`).

    Parameters
    ----------
    acts : Activations or Tensor
        A store (its train split is streamed, its held-out split evaluated) or a Tensor [n, d_model]
        (trained on, and evaluated on `eval_acts` or itself).
    widths, k : optional
        Shorthands for the TrainConfig fields of the same names (a settings object as `widths` is `config`).
    config : TrainConfig or Config, optional
        widths, k, epochs, batch_size, lr, nested, seed, auxk_alpha, dead_tokens, shuffle (see TrainConfig);
        `overrides` (field=value) replace fields.
    out : path, optional
        Save every rung to `out/w<width>/` and the metrics to `out/metrics.json`.
    eval_acts : Tensor, optional
        Rows to evaluate on instead of the store's held-out split.
    callback : callable, optional
        `callback(step, tokens, {width: batch FVU})` after every step (live logging, timing).
    checkpoint : path or featuretree.checkpoint.Resume, optional
        Save the whole ladder's state (weights, Adam moments, dead-feature clocks, step) there atomically
        every `Resume.every` seconds (a path: every 60 s); a later call with the same settings and data
        resumes from it and returns the same dictionaries, bit for bit, as a run never interrupted. The
        file is removed at the end unless `Resume.keep` (then it is marked finished and a rerun returns at
        once); one written for other settings is an error.
    init : dict, optional
        {width: TopKSAE} to start from instead of freshly initialised dictionaries (e.g. one rung of a
        ladder trained alone, as featuretree.scale does).
    comm : optional
        A process group from featuretree.scale (torchrun): every batch is split across processes and their
        gradients summed; only rank 0 writes `out` and the checkpoint.
    progress : bool
        Show a tqdm bar.

    Example:
        >>> x = torch.randn(2048, 16)
        >>> saes = train_ladder(x, (32, 64), k=4, epochs=1, batch_size=256, progress=False)
        >>> sorted(saes), saes[64].width
        ([32, 64], 64)
    """
    if dataclasses.is_dataclass(widths):  # train_ladder(acts, cfg)
        config, widths = widths, None
    cfg = settings(TrainConfig, config, widths=widths, k=k, **overrides)
    widths, epochs, batch_size, seed = cfg.widths, cfg.epochs, cfg.batch_size, cfg.seed
    d_model = d_model_of(acts)
    n_train = n_rows(acts, "train")
    if n_train < batch_size:
        log.warning("only %d training tokens for batch_size %d: using one batch of all of them", n_train, batch_size)
        batch_size = max(1, n_train)
    # A feature is dead after ~ a fifth of an epoch without firing (sparsify uses 10M tokens at scale).
    dead_tokens = int(cfg.dead_tokens if cfg.dead_tokens is not None else max(batch_size, min(10_000_000, n_train // 5)))
    tune_malloc()
    torch.manual_seed(seed)
    device = resolve_device(cfg.device)
    rungs = _new_rungs(cfg, d_model, dead_tokens, init or {}, device)
    first, step, seen, finished = True, 0, 0, False
    writer = comm is None or comm.rank == 0  # data parallel: one rank writes files, every rank computes
    resume = None if checkpoint is None else (checkpoint if isinstance(checkpoint, Resume) else Resume(checkpoint))
    if resume is not None:
        state = Checkpoint(resume.path, {**cfg.to_dict(), "dead_tokens": dead_tokens, "batch_size": batch_size,
                                         "data": data_fingerprint(acts)},
                           "the training state of a ladder", "it was written for other settings or data: delete it (or choose "
                           "another run directory) to train from the start")
        saved = state.load()
        if saved is not None:
            tensors, info = saved
            _unpack(rungs, tensors, info)
            first, step, seen = False, int(info["step"]), int(info["seen"])
            finished = bool(info.get("finished"))
            log.info("resuming training from %s at step %d (%d tokens seen)%s", resume.path, step, seen,
                     ": training had finished" if finished else "")
        last_save = time.monotonic()
    total = n_train * epochs
    bar = tqdm(total=total, initial=seen, unit="tok", unit_scale=True, desc=f"train {len(widths)} rungs",
               disable=not progress)
    done_before = step
    stream = iter_batches(acts, batch_size, split="train", epochs=epochs, seed=seed, shuffle=cfg.shuffle)
    for i, x in enumerate(() if finished else _on_device(stream, device)):
        if i < done_before:  # resumed: these batches were trained on before the checkpoint
            continue
        _check_finite(x)
        if first:  # start b_dec at the data mean so the first steps fit directions, not the offset
            for r in rungs.values():
                r.sae.b_dec.data.copy_(x.mean(0))
            first = False
        denom = (x - x.mean(0)).pow(2).sum().clamp_min(1e-8)
        mine = x if comm is None else comm.part(x)  # data parallel: this rank's rows of the batch
        for r in rungs.values():
            r.step(mine, denom, comm, x.shape[0])
        bar.update(x.shape[0])
        step, seen = step + 1, seen + x.shape[0]
        if resume is not None and time.monotonic() - last_save >= resume.every:
            if writer:
                tensors, info = _pack(rungs)
                state.save({**info, "step": step, "seen": seen}, tensors)
            last_save = time.monotonic()
        if callback is not None:
            callback(step, seen, {w: r.last_fvu for w, r in rungs.items()})
        if progress and step % 20 == 0:  # reading the sums waits for the device: not every step
            bar.set_postfix({f"fvu{w}": f"{r.sync_stats()['fvu'] / max(r.stats['n'], 1):.3f}"
                             for w, r in rungs.items()}, refresh=False)
    bar.close()
    if first:
        raise FeatureTreeError("the activation stream is empty: collect more tokens before training")
    if resume is not None and resume.keep and not finished and writer:
        tensors, info = _pack(rungs)
        state.save({**info, "step": step, "seen": seen}, tensors, finished=True)

    saes = _finish(rungs, cfg, acts, eval_acts)
    if out is not None and writer:
        out = Path(out)
        for w, sae in saes.items():
            sae.save(out / f"w{w}")
        write_json(out / "metrics.json", {f"w{w}": s.metrics for w, s in saes.items()})
    if resume is not None and not resume.keep and writer:
        state.remove()
    return saes


def _new_rungs(cfg: TrainConfig, d_model: int, dead_tokens: int, init: dict, device) -> dict[int, _Rung]:
    """Every rung's dictionary (from `init` where given, else seeded seed + its index) on `device`, and its
    optimiser; a nested ladder is one dictionary of the widest width whose prefixes are the rungs."""
    widths, k, seed = cfg.widths, cfg.k, cfg.seed
    if cfg.nested:
        return {widths[-1]: _Rung(TopKSAE(d_model, widths[-1], k, seed=seed).to(device),
                                  cfg.lr or default_lr(widths[-1]), dead_tokens, cfg.auxk_alpha, prefixes=widths)}
    return {w: _Rung((init[w] if w in init else TopKSAE(d_model, w, cfg.k_of(w), seed=seed + i)).to(device),
                     cfg.lr or default_lr(w), dead_tokens, cfg.auxk_alpha) for i, w in enumerate(widths)}


def _on_device(batches, device):
    """`batches` on `device`. On CUDA each batch is pinned and copied on a side stream one batch ahead, so the
    copy of the next batch overlaps the step on this one; elsewhere batches pass through (or are moved)."""
    if device.type != "cuda":
        for x in batches:
            yield x if x.device == device else x.to(device)
        return
    side, queue = torch.cuda.Stream(device=device), []
    for x in batches:
        with torch.cuda.stream(side):
            moved = x.pin_memory().to(device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(side)
        queue.append((moved, ready))
        if len(queue) == 2:
            yield _arrived(*queue.pop(0), device)
    for item in queue:
        yield _arrived(*item, device)


def _arrived(x: Tensor, ready, device) -> Tensor:
    """A batch copied on the side stream, made safe to use (and free) on the current stream."""
    current = torch.cuda.current_stream(device)
    current.wait_event(ready)
    x.record_stream(current)
    return x


def _finish(rungs: dict, cfg: TrainConfig, acts, eval_acts) -> dict[int, TopKSAE]:
    """The trained dictionaries, frozen, with held-out metrics (every rung evaluated in one read of the
    held-out stream) and SAELens metadata."""
    for r in rungs.values():
        r.sync_stats()
        r.sae.eval()
        r.sae.requires_grad_(False)
    if cfg.nested:  # one rung per prefix, sharing the nested dictionary's optimiser statistics
        (whole,) = rungs.values()
        rungs = {w: _Prefix(whole.sae.prefix(w), whole) for w in cfg.widths}
    if eval_acts is None and is_store(acts) and n_rows(acts, "heldout") > 0:
        ev = iter_batches(acts, 8192, split="heldout", shuffle=False)
    else:
        ev = iter_batches(eval_acts if eval_acts is not None else acts, 8192, shuffle=False)
    held_out = evaluate_many([r.sae for r in rungs.values()], ev)
    saes: dict[int, TopKSAE] = {}
    for (w, r), m in zip(rungs.items(), held_out):
        sae = r.sae
        sae.metrics = {**m, "train_fvu": r.stats["fvu"] / max(r.stats["n"], 1),
                       "train_tokens": r.stats["n"], "lr": r.opt.param_groups[0]["lr"]}
        sae.metadata.update({"featuretree_rung": f"w{w}", "k": sae.k, **_source_of(acts)})
        log.info("rung w%d: FVU %.4f  L0 %.1f  dead %.1f%%", w, sae.metrics["fvu"], sae.metrics["l0"],
                 100 * sae.metrics["dead_fraction"])
        saes[w] = sae
    return saes


LOCAL_MAX_LR = 1e-3
"""Learning-rate cap of local dictionaries. The ladder's width rule gives a 64-wide dictionary 9.6e-3, which
diverged on a refinement region (w512/148 of the default run, 7.5k tokens, k=2: training-set FVU 2.45 vs
0.49 at 1e-3; on 500-token regions 1e-3 and the rule reach about the same FVU)."""


def _schedule(n: int, batch_size: int, epochs: int, min_steps: int = 300) -> tuple[int, int]:
    """(batch size, epochs) for a small local dictionary: at least `min_steps` steps, at most 200 epochs."""
    bs = int(min(batch_size, max(32, n // 8)))
    return bs, int(min(200, max(epochs, math.ceil(min_steps * bs / max(n, 1)))))


def local_k(width: int, k: int = 16) -> int:
    """Default active features per token of a local dictionary: max(1, min(k, width // 64)).

    A local dictionary only has to tell the region's tokens apart (they already share the parent's
    direction), and fewer active features make children that divide the region instead of overlapping
    in it: on the default WordNet run, refining w512/148 and w128/66 (width 32 / 64) gave children purer
    in WordNet lexicographer file than their parent for 66-100% of them at k=1, 55-77% at k=2, 56-76% at
    k=4 and 45-61% at k=8 (`featuretree eval refine`, docs/EVAL.md).

    Example:
        >>> local_k(64), local_k(256), local_k(4096, 16)
        (1, 4, 16)
    """
    return max(1, min(int(k), int(width) // 64))


def fit_local(x, held, width: int, k: int, seed: int, batch_size: int, epochs: int, device: str = "cpu") -> TopKSAE:
    """Train one local dictionary (a refinement's) on rows `x`; rows where `held` is True are evaluated, not
    trained on. Small regions get smaller batches and more epochs (at least 300 steps, at most 200 epochs);
    the learning rate is capped at LOCAL_MAX_LR.

    Parameters
    ----------
    x : Tensor (n, d_model)
    held : bool ndarray (n,) or None
    width, k : int
        Features and active features per token.
    seed : int
    batch_size, epochs : int
        Upper bound on the batch size, lower bound on the epochs.
    device : str
        Where it trains ("cpu", "cuda").

    Example:
        >>> fit_local(torch.randn(600, 8), None, 16, 1, 0, 1024, 3).width
        16
    """
    x_train = x if held is None else x[torch.from_numpy(~held)]
    x_eval = x if held is None else x[torch.from_numpy(held)]
    bs, epochs = _schedule(x_train.shape[0], batch_size, epochs)
    return train_ladder(x_train, (width,), k, epochs=epochs, batch_size=bs, seed=seed, progress=False,
                        lr=min(default_lr(width), LOCAL_MAX_LR), eval_acts=x_eval, device=device)[width]
