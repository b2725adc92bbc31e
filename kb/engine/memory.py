"""How much GPU memory this process may plan its batches and buffers with.

Free memory is what the planners size from (kb.engine.plan.auto_token_budget, the CUDA-graph decoder's
slots). Several processes on one GPU (demo.sh's JOBS, a study beside another) each see the whole free
memory when they start and together take more than there is: one of them runs out. `KB_GPU_SHARE`
(a fraction of the GPU's total memory, e.g. 0.2 for five processes; read by kb.config.gpu_share, which
load_model calls first so a bad value fails before a stage writes anything) caps what each process
counts as free, including what it already holds.
"""

from __future__ import annotations

import torch

from kb.config import SHARE_ENV, gpu_share

__all__ = ["SHARE_ENV", "gpu_share", "usable_cuda_bytes"]


def usable_cuda_bytes(device: torch.device | int | None = None) -> int:
    """Bytes this process can still allocate: free memory plus its own cached blocks, capped by KB_GPU_SHARE."""
    free, total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    usable = free + cached
    share = gpu_share()
    if share is not None:
        usable = min(usable, int(share * total) - torch.cuda.memory_allocated(device))
    return max(0, usable)
