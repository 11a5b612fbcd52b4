"""Scale out on existing engines, on top of the serial pipeline: Ray tasks and torch.distributed processes.

Ray (the optional extra `featuretree[ray]`): `train_ladder(..., executor="ray")` trains each rung of a ladder
as one task that streams the same activation store by path (a shared filesystem), starting from the
initialisation that rung has in the serial ladder; `refine(..., executor="ray")` trains sibling local
dictionaries as parallel tasks while the tree is assembled in depth-first order; `build(..., executor="ray")`
is the whole run with the Ray trainer. A task runs with the driver's torch thread count, so the results
equal the serial executor's bit for bit (tests/test_scale.py).

torch.distributed (`Comm`, launched by torchrun: `torchrun --nproc-per-node N -m featuretree train STORE ...`):
every rank streams the same batches, trains on its slice of each one and all-reduces (sums) the gradients,
so each step applies the full batch's gradient everywhere and the ranks stay identical:
    loss_rank = ||x_rank - x_hat_rank||^2 / ||x - mean(x)||^2   (the batch's own variance, known to every rank)
    grad      = sum over ranks of d loss_rank / d theta          (= d FVU(x) / d theta)
AuxK's residual variance, the dead-feature clock and the logged FVU are summed too. Backend gloo on CPU,
NCCL on GPUs. The serial code never imports this module: it takes a trainer, a submitter or a `comm`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from featuretree.config import FeatureTreeError

__all__ = ["EXECUTORS", "Comm", "build", "check_executor", "ray_init", "refine", "submit_ray", "train_ladder"]

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


def _train_rung(ref, width: int, index: int, threads: int, cfg, kw: dict):
    """Ray task: rung `index` of a ladder, trained alone on the shared stream from its serial initialisation."""
    import torch

    from featuretree.activations import d_model_of
    from featuretree.sae import TopKSAE
    from featuretree.train import train_ladder as serial

    torch.set_num_threads(threads)
    acts = _open(ref)
    if kw.get("eval_acts") is not None:
        kw["eval_acts"] = _open(kw["eval_acts"])
    init = {width: TopKSAE(d_model_of(acts), width, cfg.k_of(width), seed=cfg.seed + index)}
    return serial(acts, config=cfg, widths=(width,), init=init, progress=False, **kw)[width]


def train_ladder(acts, widths=None, k: int | None = None, *, executor: str = "serial", address: str | None = None,
                 config=None, checkpoint=None, eval_acts=None, progress: bool = True, **overrides) -> dict:
    """featuretree.train.train_ladder, with each rung a Ray task when `executor="ray"` (the same dictionaries).

    Parameters
    ----------
    acts, widths, k, config, eval_acts, progress, overrides
        As for featuretree.train.train_ladder.
    executor : str
        "serial" (this process) or "ray".
    address : str, optional
        The Ray cluster (None: the running one, else a new local one).
    checkpoint : path or Resume, optional
        One checkpoint per rung ("<stem>-w<width><suffix>"), so a killed rung resumes on its own.

    Example:
        >>> saes = train_ladder(acts, (512, 2048), 16, executor="ray")  # doctest: +SKIP
    """
    from featuretree.checkpoint import Resume
    from featuretree.config import TrainConfig, settings
    from featuretree.train import train_ladder as serial

    cfg = settings(TrainConfig, config, widths=widths, k=k, **overrides)
    if check_executor(executor) == "serial" or cfg.nested:
        if executor == "ray":
            log.info("training serially: a nested ladder is one dictionary")
        return serial(acts, config=cfg, checkpoint=checkpoint, eval_acts=eval_acts, progress=progress)
    import torch

    ray = ray_init(address)
    ref = _store_ref(ray, acts)
    task = ray.remote(_train_rung).options(num_cpus=1)
    resume = None if checkpoint is None else (checkpoint if isinstance(checkpoint, Resume) else Resume(checkpoint))
    futures = {}
    for i, w in enumerate(cfg.widths):
        kw: dict = {"eval_acts": None if eval_acts is None else _store_ref(ray, eval_acts)}
        if resume is not None:
            p = Path(resume.path)
            kw["checkpoint"] = Resume(p.with_name(f"{p.stem}-w{w}{p.suffix}"), resume.every, resume.keep)
        futures[w] = task.remote(ref, w, i, torch.get_num_threads(), cfg, kw)
    log.info("ray: training %d rungs as tasks", len(futures))
    return {w: ray.get(f) for w, f in futures.items()}


def _fit_local(job: tuple, threads: int):
    """Ray task: one local dictionary of a refinement."""
    import torch

    from featuretree.train import fit_local

    torch.set_num_threads(threads)
    return fit_local(*job)


def submit_ray(address: str | None = None):
    """A refine `submit` function that trains each local dictionary as a Ray task (siblings in parallel).

    Parameters
    ----------
    address : str, optional
        The Ray cluster to connect to (None: the running one, else a new local one; see `ray_init`).

    Example:
        >>> deep = featuretree.refine.refine(tree, "w512/7", submit=submit_ray())  # doctest: +SKIP
    """

    def submit(jobs):
        import torch

        ray = ray_init(address)
        task = ray.remote(_fit_local).options(num_cpus=1)
        futures = [task.remote(job, torch.get_num_threads()) for job in jobs]
        return [lambda f=f: ray.get(f) for f in futures]

    return submit


def refine(tree, node: str, config=None, *, executor: str = "serial", address: str | None = None, **kw):
    """featuretree.refine.refine, with sibling local dictionaries as parallel Ray tasks when `executor="ray"`;
    the tree is assembled in the same depth-first order and equals the serial one.

    Parameters
    ----------
    tree, node, config, kw
        As for featuretree.refine.refine.
    executor : str
        "serial" or "ray".
    address : str, optional
        The Ray cluster.

    Example:
        >>> deep = refine(tree, "w512/7", executor="ray", depth=2)  # doctest: +SKIP
    """
    from featuretree.refine import refine as serial

    submit = submit_ray(address) if check_executor(executor) == "ray" else None
    return serial(tree, node, config, submit=submit, **kw)


def build(config=None, *, executor: str = "serial", address: str | None = None, **kw):
    """featuretree.run.build, with the ladder's rungs as Ray tasks when `executor="ray"` (the same run).

    Parameters
    ----------
    config, kw
        As for featuretree.run.build.
    executor : str
        "serial" or "ray".
    address : str, optional
        The Ray cluster.

    Example:
        >>> tree = build(executor="ray", out="runs/default")  # doctest: +SKIP
    """
    from featuretree.run import build as serial

    train = None
    if check_executor(executor) == "ray":
        def train(acts, config=None, checkpoint=None, progress=True):
            return train_ladder(acts, config=config, executor="ray", address=address, checkpoint=checkpoint,
                                progress=progress)
    return serial(config, train=train, **kw)


class Comm:
    """The process group of a torchrun launch: rank, world size and in-place sums / maxima across ranks.

    Example:
        >>> comm = Comm.from_env()  # doctest: +SKIP
        >>> comm.world  # doctest: +SKIP
        2
    """

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    @classmethod
    def from_env(cls, device: str = "cpu") -> Comm | None:
        """The process group torchrun describes in the environment (WORLD_SIZE > 1), initialised; else None.
        NCCL when the tensors live on CUDA (`device`), gloo otherwise; on CUDA each rank takes the GPU of its
        LOCAL_RANK.

        Example:
            >>> "WORLD_SIZE" in os.environ or Comm.from_env() is None
            True
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        import torch
        import torch.distributed as dist

        cuda = str(device).startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if cuda else "gloo")
        log.info("torch.distributed: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), dist.get_backend())
        return cls(dist.get_rank(), dist.get_world_size())

    def sum_(self, t):
        """Sum tensor `t` over all ranks, in place.

        Example:
            >>> Comm(0, 1).world
            1
        """
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def max_(self, t):
        """Elementwise maximum of tensor `t` over all ranks, in place.

        Example:
            >>> Comm(0, 1).rank
            0
        """
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def part(self, x):
        """This rank's slice of a batch (contiguous; the first ranks take one row more when it does not divide).

        Example:
            >>> import torch
            >>> Comm(1, 2).part(torch.arange(5)).tolist()
            [3, 4]
        """
        import torch

        return torch.tensor_split(x, self.world)[self.rank]

    def barrier(self) -> None:
        """Wait for every rank.

        Example:
            >>> Comm(0, 1).world == 1
            True
        """
        import torch.distributed as dist

        dist.barrier()
