"""Scale out on existing engines: Ray tasks for the rungs of a ladder and for sibling refinements.

Ray (the optional extra `featuretree[ray]`): each rung of a ladder is one task that streams the same
activation store by path (a shared filesystem) and trains that rung alone with the seed it has in the
serial ladder; each set of sibling local dictionaries in a refinement trains as parallel tasks while the
tree is assembled in depth-first order. A task runs with the driver's torch thread count, so the
dictionaries equal the serial executor's bit for bit (tests/test_distributed.py).
Multi-process data parallelism for one wide dictionary is in featuretree.ddp (torch.distributed).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from featuretree.config import FeatureTreeError

log = logging.getLogger(__name__)

EXECUTORS = ("serial", "ray")


def check_executor(executor: str) -> str:
    """`executor` if it is one featuretree knows ("serial", "ray"), else a clear error.

    Example:
        >>> check_executor("ray")
        'ray'
    """
    if executor not in EXECUTORS:
        raise FeatureTreeError(f"executor={executor!r} is not one of {EXECUTORS}")
    return executor


def ray_init(address: str | None = None):
    """The `ray` module, connected to the cluster at `address` (None: the running one, else a new local one).

    Example:
        >>> ray = ray_init()  # doctest: +SKIP
    """
    try:
        import ray
    except ImportError as e:
        raise FeatureTreeError("executor='ray' needs Ray: pip install 'featuretree[ray]' (after torch==2.13.0)") from e
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        log.info("ray: connected to %s (%s CPUs)", address or "a local cluster", ray.cluster_resources().get("CPU"))
    return ray


def _store_ref(ray, acts) -> Any:
    """What a task needs to read the activations: a store's path, or a Tensor put in Ray's object store."""
    if hasattr(acts, "batches") and hasattr(acts, "path"):
        return ("store", str(os.path.abspath(acts.path)))
    return ("tensor", ray.put(acts))


def _open(ref) -> Any:
    import ray

    kind, value = ref
    if kind == "store":
        from featuretree.activations import Activations

        return Activations(value)
    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def _train_rung(ref, width: int, seed_offset: int, threads: int, kw: dict):
    """Ray task: one rung of a ladder, trained alone on the shared stream."""
    import torch

    from featuretree.train import train_ladder

    torch.set_num_threads(threads)
    eval_acts = kw.pop("eval_acts", None)
    if eval_acts is not None:
        eval_acts = _open(eval_acts)
    return train_ladder(_open(ref), (width,), executor="serial", _seed_offset=seed_offset, eval_acts=eval_acts,
                        **kw)[width]


def ray_train_ladder(acts, widths: tuple[int, ...], k: int, *, ray_address: str | None = None,
                     checkpoint=None, **kw) -> dict:
    """`train_ladder` with each rung a Ray task (the same dictionaries as the serial executor).

    A `checkpoint` path becomes one checkpoint per rung ("<stem>-w<width><suffix>"), so a killed rung
    resumes on its own.

    Example:
        >>> saes = ray_train_ladder(acts, (512, 2048), 16)  # doctest: +SKIP
    """
    from pathlib import Path

    import torch

    ray = ray_init(ray_address)
    ref = _store_ref(ray, acts)
    if kw.get("eval_acts") is not None:
        kw["eval_acts"] = _store_ref(ray, kw["eval_acts"])
    kw.pop("progress", None)
    task = ray.remote(_train_rung).options(num_cpus=1)
    futures = {}
    for i, w in enumerate(widths):
        rung_kw = dict(kw, k=k, progress=False)
        if checkpoint is not None:
            p = Path(checkpoint)
            rung_kw["checkpoint"] = str(p.with_name(f"{p.stem}-w{w}{p.suffix}"))
        futures[w] = task.remote(ref, w, i, torch.get_num_threads(), rung_kw)
    log.info("ray: training %d rungs as tasks", len(futures))
    return {w: ray.get(f) for w, f in futures.items()}


def _fit_local(x, held, width: int, k: int, seed: int, batch_size: int, epochs: int, threads: int):
    """Ray task: one local dictionary of a refinement."""
    import torch

    from featuretree.refine import fit_local

    torch.set_num_threads(threads)
    return fit_local(x, held, width, k, seed, batch_size, epochs)


def ray_fit_local_many(jobs: list[tuple], ray_address: str | None = None) -> list:
    """Submit local dictionaries (x, held, width, k, seed, batch_size, epochs) as Ray tasks; futures in order.

    Example:
        >>> futures = ray_fit_local_many([(x, None, 64, 1, 0, 256, 3)])  # doctest: +SKIP
    """
    import torch

    ray = ray_init(ray_address)
    task = ray.remote(_fit_local).options(num_cpus=1)
    return [task.remote(*job, torch.get_num_threads()) for job in jobs]


def ray_get(future):
    """The value of a Ray future (a local value passes through).

    Example:
        >>> ray_get(3)
        3
    """
    try:
        import ray
    except ImportError:
        return future
    return ray.get(future) if isinstance(future, ray.ObjectRef) else future
