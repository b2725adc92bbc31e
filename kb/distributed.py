"""Data-parallel probing and state queries over several processes (one per GPU).

Launch any stage that uses it with torchrun or accelerate; every rank plans the same batches
(kb.engine.plan_batches is deterministic), takes a cost-balanced share of them, appends its records to
its own shard file, and rank 0 merges the shards into exactly the file a single-process run writes
(same records, same order, same bytes), then writes the stage's other outputs alone:

    torchrun --standalone --nproc_per_node 2 run_MMLU.py --model M --domain ID --split train --device cuda
    accelerate launch --num_processes 2 run_MMLU.py --model M --domain ID --split train --device cuda

Ranks coordinate through files plus one gloo barrier (no NCCL needed: nothing is all-reduced).
A single process (no RANK/WORLD_SIZE in the environment) takes the usual path unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from kb.engine import BATCH_OVERHEAD_TOKENS, Batch
from kb.io import RecordLog, iter_jsonl, write_jsonl

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


def shard(batches: Sequence[Batch], d: Dist, token_lists: Sequence[Sequence[int]]) -> list[Batch]:
    """This rank's batches: longest-processing-time assignment by padded tokens, kept in plan order.

    Deterministic in (batches, world size), so every rank computes the same partition without talking.
    """
    if not d.active:
        return list(batches)
    cost = [len(b.indices) * (len(token_lists[b.indices[0]]) - b.prefix_len) + BATCH_OVERHEAD_TOKENS for b in batches]
    load = [0] * d.world
    owner = [0] * len(batches)
    for k in sorted(range(len(batches)), key=lambda k: (-cost[k], k)):
        r = min(range(d.world), key=lambda r: (load[r], r))
        owner[k] = r
        load[r] += cost[k]
    return [b for k, b in enumerate(batches) if owner[k] == d.rank]


def shard_path(path: Path, d: Dist) -> Path:
    return path if not d.active else path.with_name(f"{path.name}.shard-{d.rank}-of-{d.world}")


class ShardedLog:
    """A RecordLog for this rank: the final file itself in one process, else this rank's shard.

    Ids already in the final file (an earlier, finished part of the run) count as done on every rank.
    `finish` merges on rank 0 and returns every record by id; other ranks get None and should stop.
    """

    def __init__(self, path: Path, d: Dist, key: str = "id", restart: bool = False) -> None:
        self.path, self.d, self.key = Path(path), d, key
        if restart and d.active:
            shard_path(self.path, d).unlink(missing_ok=True)
        self.done: dict[str, dict[str, Any]] = {}
        if d.active and self.path.exists():
            self.done = {rec[key]: rec for _, rec in iter_jsonl(self.path, tolerate_torn_tail=True)}
        self.log = RecordLog(shard_path(self.path, d), key)

    def __contains__(self, key: str) -> bool:
        return key in self.log or key in self.done

    def __len__(self) -> int:
        return len(self.log) + len(self.done)

    def append(self, rec: dict[str, Any]) -> None:
        self.log.append(rec)

    @property
    def records(self) -> dict[str, dict[str, Any]]:
        return {**self.done, **self.log.records}

    def close(self) -> None:
        self.log.close()

    def __enter__(self) -> ShardedLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def finish(self, batches: Sequence[Batch], ids: Sequence[str]) -> dict[str, dict[str, Any]] | None:
        """Wait for every rank; rank 0 writes the single-process file (earlier records, then plan order)."""
        self.close()
        if not self.d.active:
            return self.log.records
        self.d.barrier()
        if not self.d.is_main:
            return None
        parts = [shard_path(self.path, Dist(r, self.d.world)) for r in range(self.d.world)]
        new: dict[str, dict[str, Any]] = {}
        for p in parts:
            if p.exists():
                for _, rec in iter_jsonl(p, tolerate_torn_tail=True):
                    new[rec[self.key]] = rec
        rows = list(self.done.values())
        for b in batches:  # a single process appends batch by batch, each in its row order
            for i in b.indices:
                if ids[i] not in self.done and ids[i] in new:
                    rows.append(new[ids[i]])
        write_jsonl(self.path, rows)
        for p in parts:
            p.unlink(missing_ok=True)
        return {r[self.key]: r for r in rows}
