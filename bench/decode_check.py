"""On a GPU: kb.engine.decode's fast path (CUDA graph, fused attention, compiled sampler) against its plain path
(eager step, reference attention, eager sampler) and one-at-a-time greedy generate(), fp32, tiny model; then in
bf16 the flash path against the same with its own half by kb's Triton kernel (opt-in), the memory-efficient path
and the plain one (rounding differs: agreement is reported).

    python bench/decode_check.py
"""

from __future__ import annotations

import argparse
import sys

import common  # noqa: F401  (puts the repo on sys.path)
import torch

from kb.engine import Decoder
from kb.testing import tiny_model


@torch.inference_mode()
def main() -> None:
    torch.manual_seed(0)
    model = tiny_model(vocab_size=4000, layers=4).cuda()
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(10, 4000, (int(n),), generator=g).tolist() for n in torch.randint(5, 90, (300,), generator=g)]
    stops = [2, 17, 33]
    fast = Decoder(model, 0, stops, slots=37)
    plain = Decoder(model, 0, stops, slots=37, graphs=False, fused=False, compile_pick=False)
    keys = list(range(1000, 1300))
    a = fast.run(seqs, 20, n=4, temperature=0.9, keys=keys)
    b = plain.run(seqs, 20, n=4, temperature=0.9, keys=keys)
    same = sum(x.tokens == y.tokens for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    print(f"samples: fast path = plain path on {same}/{300 * 4} (slot refills: {fast.stats})")
    ga = fast.run(seqs, 20)
    ref = []
    for s in seqs[:60]:
        out = model.generate(input_ids=torch.tensor([s], device="cuda"), max_new_tokens=20, do_sample=False,
                             eos_token_id=stops, pad_token_id=0, temperature=None, top_k=None, top_p=None)[0, len(s):]
        toks = out.tolist()
        cut = next((i for i, t in enumerate(toks) if t in stops), len(toks))
        ref.append(toks[:cut])
    same_g = sum(x[0].tokens == r for x, r in zip(ga, ref))
    print(f"greedy: fast path = one-at-a-time generate on {same_g}/60; lengths {sorted({len(r) for r in ref})}")
    bf16_paths(model.to(torch.bfloat16), seqs, stops, keys)


def bf16_paths(model, seqs, stops, keys) -> None:
    """bf16: the flash path (used keys only) against the memory-efficient path and the plain path."""
    flash = Decoder(model, 0, stops, slots=37)
    paths = {"own-kernel": Decoder(model, 0, stops, slots=37, own_kernel=True),
             "memory-efficient": Decoder(model, 0, stops, slots=37, flash=False),
             "plain": Decoder(model, 0, stops, slots=37, graphs=False, fused=False, compile_pick=False)}
    a = flash.run(seqs, 20, n=4, temperature=0.9, keys=keys)
    ga = flash.run(seqs, 20, want_logps=True)
    print(f"bf16 flash path: {flash.stats}")
    for name, dec in paths.items():
        b = dec.run(seqs, 20, n=4, temperature=0.9, keys=keys)
        gb = dec.run(seqs, 20, want_logps=True)
        same = sum(x.tokens == y.tokens for ra, rb in zip(a, b) for x, y in zip(ra, rb))
        same_g = sum(x[0].tokens == y[0].tokens for x, y in zip(ga, gb))
        dlp = max((abs(u - v) for x, y in zip(ga, gb) if x[0].tokens == y[0].tokens
                   for u, v in zip(x[0].logps, y[0].logps)), default=float("nan"))
        print(f"bf16: flash = {name} path on {same}/{len(seqs) * 4} samples, {same_g}/{len(seqs)} greedy replies; "
              f"max |d logp| on identical replies {dlp:.3g}")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: bench/decode_check.py checks the CUDA fast path and needs a GPU (none found)")
    main()
