"""Where batched decoding spends its time: milliseconds per generated token by batch size, and cudaMalloc calls.

transformers' DynamicCache grows every layer's keys/values by concatenation each step, so large batches
could make the CUDA caching allocator call cudaMalloc (which synchronises) every step. Measured on an
H100 (bench/README.md): it does not (0-1 calls per 22-token run either way), expandable segments change
nothing, and a step costs 35-50 ms from batch 1 to 370: decoding in eager transformers is bound by
kernel launches, so kb makes its generation batches as large as memory allows.

    python bench/step_time.py --random-init llama2-7b
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python bench/step_time.py --random-init llama2-7b
"""

from __future__ import annotations

import argparse
import os
import time

import common  # bench/common.py: puts the repo on sys.path, so it comes before kb
import torch

from kb.engine import generate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(p)
    p.add_argument("--batches", default="1,43,370")
    args = p.parse_args()
    sub = common.load_subject(args)
    print(f"{sub.name} {sub.dtype}; PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF')}", flush=True)
    g = torch.Generator().manual_seed(0)
    for b in [int(x) for x in args.batches.split(",")]:
        seqs = [torch.randint(100, 30000, (int(k),), generator=g).tolist() for k in torch.randint(40, 100, (b,), generator=g)]
        for sample, n in ((False, 1), (True, 10)):
            q = max(1, b // n) if sample else b
            rows = seqs[:q]
            times = {}
            for steps in (2, 22):
                generate(sub.model, sub.tokenizer, rows, steps, do_sample=sample, num_return_sequences=n, seed=1)  # warm
                common.sync(args.device)
                stats0 = torch.cuda.memory_stats() if args.device.startswith("cuda") else {}
                t = time.perf_counter()
                generate(sub.model, sub.tokenizer, rows, steps, do_sample=sample, num_return_sequences=n, seed=1)
                common.sync(args.device)
                times[steps] = time.perf_counter() - t
                stats1 = torch.cuda.memory_stats() if args.device.startswith("cuda") else {}
                mallocs = stats1.get("num_device_alloc", 0) - stats0.get("num_device_alloc", 0)
            per_step = (times[22] - times[2]) / 20
            print(f"{'sample' if sample else 'greedy'} {q:4d} prompts x {n:2d}: {1000 * per_step:6.1f} ms per step, "
                  f"{1000 * times[2]:7.1f} ms for 2 tokens, {mallocs} cudaMalloc in the 22-token run", flush=True)


if __name__ == "__main__":
    main()
