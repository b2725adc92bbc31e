"""Launch parameters of the decoder's own-half Triton kernel (kb.engine.own_attention), timed on a GPU.

The kernel reads each row's generated keys and values once per decoding step; on a Llama-2-7B-shaped step of
2,560 rows it ran at about half the copy bandwidth (bench/README.md, v5). This sweeps keys per loop
iteration, warps per program and pipelining stages on that shape, checks every configuration's output
against the default's, and prints the bandwidth of each next to the default in the same run.

    python bench/tune_own_half.py --rows 2560 --used 49
"""

from __future__ import annotations

import argparse
import itertools

import common  # bench/common.py: puts the repo on sys.path, so it comes before kb
import torch

from kb.engine import own_attention
from kb.engine.own_attention import OWN_HALF_LAUNCH, own_half_merged


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2560)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--length", type=int, default=49, help="the rows' buffer length (generated tokens)")
    p.add_argument("--used", type=int, default=49, help="keys in use this step (the step's position + 1)")
    p.add_argument("--reps", type=int, default=64, help="timed launches per configuration (a step has one per layer)")
    args = p.parse_args()
    assert torch.cuda.is_available(), "the kernel runs on CUDA"
    dev, bf = "cuda", torch.bfloat16
    b, h, hkv, d, t = args.rows, args.heads, args.kv_heads, args.head_dim, args.length
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(b, h, d, generator=g, device=dev, dtype=bf)
    kv_new = torch.randn(b, 2, hkv, d, generator=g, device=dev, dtype=bf)
    k = torch.randn(b, t, hkv, d, generator=g, device=dev, dtype=bf)
    v = torch.randn(b, t, hkv, d, generator=g, device=dev, dtype=bf)
    used = torch.full((b,), args.used, dtype=torch.int32, device=dev)
    prompt_out = torch.randn(b, h, d, generator=g, device=dev, dtype=bf)
    prompt_lse = torch.randn(h, b, generator=g, device=dev) * 3
    scale = d ** -0.5
    moved = b * hkv * args.used * d * 2 * 2 + b * h * d * 2 * 3  # keys + values read; q, prompt half, output

    def run(cfg: dict) -> torch.Tensor:
        return own_half_merged(q, kv_new[:, 0], kv_new[:, 1], k, v, used, prompt_out, prompt_lse, scale, launch=cfg)

    def timed(cfg: dict) -> float:
        run(cfg)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.reps):
            run(cfg)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / args.reps

    print(f"{common.machine('cuda')}; rows {b}, heads {h} ({hkv} key heads) x {d}, {args.used} keys in use of {t}; "
          f"{moved / 1e9:.2f} GB a launch; {common.versions()}", flush=True)
    peak_bw = common.peak_bandwidth("cuda")
    base = dict(OWN_HALF_LAUNCH)
    ref = run(base).float()
    ms_base = timed(base)
    rows = []
    for block_t, warps, stages in itertools.product((16, 32, 64), (1, 2, 4, 8), (None, 1, 2, 3)):
        cfg = {"block_t": block_t, "num_warps": warps, "num_stages": stages}
        try:
            out = run(cfg).float()
            ms = timed(cfg)
        except Exception as err:  # noqa: BLE001 - a configuration this GPU's compiler refuses
            print(f"{cfg}: failed ({str(err).splitlines()[0][:120]})")
            continue
        rows.append((ms, cfg, (out - ref).abs().max().item()))
    rows.sort(key=lambda r: r[0])
    print(f"default {base}: {ms_base * 1e3:.1f} us, {moved / ms_base / 1e6:.0f} GB/s "
          f"({moved / ms_base / 1e6 / (peak_bw / 1e9):.0%} of the measured copy bandwidth {peak_bw / 1e12:.2f} TB/s)")
    for ms, cfg, diff in rows[:12]:
        print(f"{cfg}: {ms * 1e3:.1f} us, {moved / ms / 1e6:.0f} GB/s, {ms_base / ms:.2f}x the default, "
              f"max |output - default's| {diff:.3g}")
    best = rows[0][1]
    print(f"best: {best['block_t']},{best['num_warps']},{best['num_stages'] or 0} "
          f"(a 32-layer step saves {(ms_base - rows[0][0]) * 32:.2f} ms)")
    own_attention.OWN_HALF_LAUNCH.update(best)


if __name__ == "__main__":
    main()
