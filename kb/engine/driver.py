"""The one resumable batched pass over a stage's questions (probing, state queries, evaluation).

Every stage plans its batches over the whole question list (kb.engine.plan), then runs the model on
the batches that still hold a question without a record, appending each record as soon as it is known.
What a batch computes is the stage's callback; the pass owns the rest, the same for every stage: the
locked record file and its resume (kb.io.RecordLog), this rank's share of the batches and the merge on
rank 0 under torchrun (ShardedLog; kb.distributed says which rank a process is), and the progress bar.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from kb import layout
from kb.distributed import Dist
from kb.engine.plan import BATCH_OVERHEAD_TOKENS, Batch
from kb.io import RecordLog, iter_jsonl, write_jsonl

Record = dict[str, Any]


def run_batches(path: Path, ids: Sequence[str], seqs: Sequence[Sequence[int]], batches: Iterable[Batch],
                work: Callable[[Batch, Any], list[Record]], *, desc: str, dist: Dist | None = None,
                restart: bool = False, ahead: Callable[[Iterable[Batch]], Iterator[Any]] | None = None,
                ) -> dict[str, Record] | None:
    """Append the records of every question of `ids` not yet in `path`; return all records by id.

    `batches` may be lazy (kb.engine.plan.iter_batches over a TokenStream: the first batches run while
    later prompts are still being encoded); every question of `ids` is in exactly one batch.
    `work(batch, queued)` returns the batch's records (keyed "id"); a record already in the file is not
    written again. `ahead`, given the batches to run, yields one item per batch computed ahead of the one
    being written (PrefixScorer.score_many: the device never waits for Python); it arrives as `queued`
    (None without `ahead`). Under torchrun / accelerate launch (`dist`) each rank runs its share of the
    batches into its own shard; rank 0 merges the shards into the single-process file and gets the
    records, the other ranks get None. `restart` drops this rank's old shard (the stage has already
    decided what to keep of the final file).
    """
    dist = dist or Dist()
    if dist.active:
        batches = list(batches)  # sharding and the merge need the whole plan
    with ShardedLog(path, dist, restart=restart) as log:
        todo: Iterable[Batch] = (b for b in batches if any(ids[i] not in log for i in b.indices))
        if dist.active:
            todo = shard(list(todo), dist, seqs)
            initial = len(ids) - sum(ids[i] not in log for b in todo for i in b.indices)
        else:
            initial = sum(i in log for i in ids)
        bar = tqdm(total=len(ids), initial=initial, desc=desc, unit="q")
        queued = None
        if ahead is not None:  # the look-ahead runs one pass of the same batches ahead of this loop
            todo, lead = itertools.tee(todo)
            queued = ahead(lead)
        for b in todo:
            new = sum(ids[i] not in log for i in b.indices)
            for rec in work(b, next(queued) if queued is not None else None):
                if rec["id"] not in log:
                    log.append(rec)
            bar.update(new)
        bar.close()
    return log.finish(batches, ids)  # type: ignore[arg-type]  # a list whenever the merge reads it


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
    """The file this rank appends to: the final file in one process, else its shard (kb.locks.rank_path)."""
    return path if not d.active else layout.shard_path(path, d.rank, d.world)


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
