"""How much GPU memory this process may plan its batches and buffers with.

Free memory is what the planners size from (kb.engine.plan.auto_token_budget, the CUDA-graph decoder's
slots). Several processes on one GPU (demo.sh's JOBS, a study beside another) each see the whole free
memory when they start and together take more than there is: one of them runs out. `KB_GPU_SHARE`
(a fraction of the GPU's total memory, e.g. 0.2 for five processes) caps what each process counts as
free, including what it already holds.
"""

from __future__ import annotations

import os

import torch

from kb.errors import KbError

SHARE_ENV = "KB_GPU_SHARE"


def gpu_share() -> float | None:
    """The fraction of the GPU's memory this process may use (KB_GPU_SHARE), or None for all of it."""
    raw = os.environ.get(SHARE_ENV, "").strip()
    if not raw:
        return None
    try:
        share = float(raw)
    except ValueError:
        share = -1.0
    if not 0 < share <= 1:
        raise KbError(f"{SHARE_ENV}={raw!r}: give a fraction of the GPU's memory in (0, 1], e.g. 0.25")
    return share


def usable_cuda_bytes(device: torch.device | int | None = None) -> int:
    """Bytes this process can still allocate: free memory plus its own cached blocks, capped by KB_GPU_SHARE."""
    free, total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    usable = free + cached
    share = gpu_share()
    if share is not None:
        usable = min(usable, int(share * total) - torch.cuda.memory_allocated(device))
    return max(0, usable)
