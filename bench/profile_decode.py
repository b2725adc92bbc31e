"""Milliseconds per decoding step of kb.engine.decode.Decoder, by attention path and sampler, and a kernel profile.

    python bench/profile_decode.py --random-init llama2-7b --questions 218 --samples 10 --max-new-tokens 50
"""

from __future__ import annotations

import argparse
import time

import common  # bench/common.py: puts the repo on sys.path, so it comes before kb
import torch

from kb.engine import Decoder, generation_stop_ids


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(p)
    p.add_argument("--questions", type=int, default=218)
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--prompt-tokens", type=int, default=61)
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--kernels", type=int, default=20, help="rows of the kernel table (0: no profile)")
    p.add_argument("--flash-own-half", action="store_true",
                   help="the own half through flash attention instead of kb's Triton kernel (the v4 path)")
    p.add_argument("--fast-only", action="store_true", help="only the fast path (fused attention, the sampler kernel)")
    args = p.parse_args()
    sub = common.load_subject(args)
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(100, 40000, (args.questions, args.prompt_tokens), generator=g).tolist()
    stops = generation_stop_ids(sub.model, sub.tokenizer)
    print(f"{sub.name}; {args.questions} questions x {args.samples} samples, {args.prompt_tokens}-token prompts", flush=True)
    for fused, kernel in ((True, True),) if args.fast_only else ((True, True), (False, False)):
        if True:
            dec = Decoder(sub.model, sub.tokenizer.pad_token_id, stops, slots=args.questions, fused=fused,
                          sampler_kernel=kernel, own_kernel=not args.flash_own_half)
            t0 = time.perf_counter()
            dec.run(seqs, args.max_new_tokens, n=args.samples, temperature=1.0)
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            dec.run(seqs, args.max_new_tokens, n=args.samples, temperature=1.0)
            torch.cuda.synchronize()
            again = time.perf_counter() - t0
            st = dec._state
            st["done"].fill_(False)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                st["graph"].replay()
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) / args.steps * 1e3
            print(f"fused={fused} sampler_kernel={kernel}: run {first:.2f} s (first), {again:.2f} s (again), "
                  f"{dec.stats}; graph step {ms:.1f} ms for {args.questions * args.samples} rows", flush=True)
            if args.kernels and fused and kernel:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(3):
                        dec._step(st)
                    torch.cuda.synchronize()
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.kernels), flush=True)
            del dec, st
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
