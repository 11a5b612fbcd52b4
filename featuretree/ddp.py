"""Data parallel training on torch.distributed: one wide dictionary, each batch split across processes.

Launched by torchrun (`torchrun --nproc-per-node N -m featuretree train STORE ...`), every rank streams the
same batches from the store, trains on its slice of each one and all-reduces (sums) the gradients, so each
step applies the full batch's gradient everywhere and the ranks stay identical:
    loss_rank = ||x_rank - x_hat_rank||^2 / ||x - mean(x)||^2   (the batch's own variance, known to every rank)
    grad      = sum over ranks of d loss_rank / d theta          (= d FVU(x) / d theta)
AuxK's residual variance, the dead-feature clock and the logged FVU are summed across ranks too. Backend gloo
on CPU, NCCL on GPUs. The result matches a single process on the same batches up to float rounding (the
sums are grouped differently): tests/test_ddp.py runs 2 CPU processes on gloo.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import Tensor

log = logging.getLogger(__name__)


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
    def from_env(cls) -> Comm | None:
        """The process group torchrun describes in the environment (WORLD_SIZE > 1), initialised; else None.

        Example:
            >>> "WORLD_SIZE" in os.environ or Comm.from_env() is None
            True
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        log.info("torch.distributed: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), dist.get_backend())
        return cls(dist.get_rank(), dist.get_world_size())

    def sum_(self, t: Tensor) -> Tensor:
        """Sum `t` over all ranks, in place.

        Example:
            >>> Comm(0, 1).world
            1
        """
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def max_(self, t: Tensor) -> Tensor:
        """Elementwise maximum of `t` over all ranks, in place.

        Example:
            >>> Comm(0, 1).rank
            0
        """
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def part(self, x: Tensor) -> Tensor:
        """This rank's slice of a batch (contiguous; the first ranks take one row more when it does not divide).

        Example:
            >>> Comm(1, 2).part(torch.arange(5)).tolist()
            [3, 4]
        """
        return torch.tensor_split(x, self.world)[self.rank]

    def barrier(self) -> None:
        """Wait for every rank.

        Example:
            >>> Comm(0, 1).world == 1
            True
        """
        import torch.distributed as dist

        dist.barrier()
