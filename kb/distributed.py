"""Data-parallel probing and state queries over several processes (one per GPU): where a process sits.

Launch any stage that uses it with torchrun or accelerate; every rank plans the same batches
(kb.engine.plan_batches is deterministic), takes a cost-balanced share of them, appends its records to
its own shard file, and rank 0 merges the shards into exactly the file a single-process run writes
(same records, same order, same bytes), then writes the stage's other outputs alone. The sharded pass
itself is kb.engine.driver; this module says which rank a process is and joins the ranks:

    torchrun --standalone --nproc_per_node 2 run_MMLU.py --model M --domain ID --split train --device cuda
    accelerate launch --num_processes 2 run_MMLU.py --model M --domain ID --split train --device cuda

Ranks coordinate through files plus one gloo barrier (no NCCL needed: nothing is all-reduced).
A single process (no RANK/WORLD_SIZE in the environment) takes the usual path unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

BARRIER_TIMEOUT = timedelta(hours=6)  # ranks wait at the merge for the slowest shard


@dataclass(frozen=True)
class Dist:
    """Where this process sits in a launch: rank, world size, local rank (its GPU)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str | None) -> str | None:
        """This rank's device: `cuda` becomes `cuda:<local rank>`; cpu (or an explicit index) is kept."""
        if not self.active:
            return requested
        import torch

        if requested in (None, "cuda") and torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            return f"cuda:{self.local_rank}"
        return requested or "cpu"

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as td

            td.barrier()


def from_env() -> Dist:
    """This process's place in a torchrun/accelerate launch (a single process when none), joining nothing.

    Fine-tuning uses this (the Trainer sets up its own NCCL group): `load_model(..., device=from_env().device("cuda"))`
    puts each rank's copy on its own GPU instead of every rank's on cuda:0.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))


def setup() -> Dist:
    """from_env(), and a gloo group for the merge barrier when there is more than one process."""
    d = from_env()
    if not d.active:
        return d
    import torch.distributed as td

    if not td.is_initialized():
        td.init_process_group("gloo", rank=d.rank, world_size=d.world, timeout=BARRIER_TIMEOUT)
    return d
