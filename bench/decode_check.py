"""On a GPU: kb.engine.decode's fast path (CUDA graph, fused attention, the sampler kernel, kb.engine.fused's
element-wise kernels) against its plain path (eager step, reference attention, eager sampler, transformers'
layers) and one-at-a-time greedy generate(), fp32, tiny model; then in bf16 the fused kernels against the eager
ops they replace (exact equality expected up to one fp32 sum's order), and the default path (flash prompt half,
kb's own-half kernel, fused kernels) against the flash own half, no fused kernels, the memory-efficient path and
the plain one (rounding differs: agreement is reported).

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
    plain = Decoder(model, 0, stops, slots=37, graphs=False, fused=False, sampler_kernel=False, fused_kernels=False)
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


def bf16_kernels(model) -> None:
    """bf16: each fused kernel against the eager op it replaces, and the model's logits with and without them."""
    import transformers.models.llama.modeling_llama as llama

    from kb.engine.fused import fused_layers, rms_norm, rope, silu_mul
    from kb.engine.own_attention import lse_merge

    g = torch.Generator(device="cuda").manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2560, 4096, generator=g, **bf) * 2
    norm = llama.LlamaRMSNorm(4096, eps=1e-5).to(**bf)
    norm.weight.data = torch.randn(4096, generator=g, **bf)
    gate, up = torch.randn(2560, 11008, generator=g, **bf) * 3, torch.randn(2560, 11008, generator=g, **bf)
    q = torch.randn(2560, 1, 32, 128, generator=g, **bf).transpose(1, 2)
    cos, sin = torch.randn(2560, 1, 128, generator=g, **bf), torch.randn(2560, 1, 128, generator=g, **bf)
    a, b = torch.randn(14000, 32, 128, generator=g, **bf), torch.randn(14000, 32, 128, generator=g, **bf)
    la, lb = (torch.randn(32, 14000, generator=g, device="cuda") * 3 for _ in range(2))
    pairs = {"rms_norm": (rms_norm(x, norm.weight, 1e-5), norm(x)),
             "silu_mul": (silu_mul(gate, up), torch.nn.functional.silu(gate) * up),
             "rope": (rope(q, cos, sin), llama.apply_rotary_pos_emb(q, q, cos, sin)[0]),
             # the cascade scorer's merge; its eager op rounds the share to bf16, the kernel keeps it in fp32
             "lse_merge": (lse_merge(a, b, la, lb), torch.lerp(a, b, torch.sigmoid(lb - la).T[..., None].to(a.dtype)))}
    for name, (a, b) in pairs.items():
        print(f"bf16 kernel {name}: {(a == b).float().mean().item():.6f} of elements identical to the eager op, "
              f"max |diff| {(a.float() - b.float()).abs().max().item():.3g}")
    sampler_check(g)
    ids = torch.randint(10, 4000, (16, 64), generator=g, device="cuda")
    ref = model(ids).logits
    with fused_layers(model):
        out = model(ids).logits
    print(f"bf16 logits with fused kernels: {(out == ref).float().mean().item():.4f} identical, max |diff| "
          f"{(out.float() - ref.float()).abs().max().item():.3g}, same argmax "
          f"{(out.argmax(-1) == ref.argmax(-1)).float().mean().item():.4f}")


def sampler_check(g: torch.Generator) -> None:
    """kb.engine.noise's Triton sampler against the eager `pick` on a 7B step's logits (2,560 rows x 32 k, bf16):
    identical tokens, log-prob deviation, and milliseconds per call."""
    from kb.engine.noise import pick, pick_kernel

    logits = torch.randn(2560, 32000, generator=g, device="cuda", dtype=torch.bfloat16) * 4
    keys = torch.randint(-2**62, 2**62, (2560,), generator=g, device="cuda")
    t = torch.randint(1, 50, (2560,), generator=g, device="cuda")
    for temperature in (None, 1.0, 0.7):
        (a, la), (b, lb) = (f(logits, keys, t, temperature, True) for f in (pick, pick_kernel))
        ms = {}
        for name, f in (("eager", pick), ("kernel", pick_kernel)):
            f(logits, keys, t, temperature, True)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                f(logits, keys, t, temperature, True)
            end.record()
            torch.cuda.synchronize()
            ms[name] = start.elapsed_time(end) / 20
        print(f"sampler kernel, T={temperature}: {(a == b).sum().item()}/{len(a)} tokens as the eager pick, max |d logp| "
              f"{(la - lb).abs().max().item():.3g}; {ms['kernel']:.3f} ms per call (eager {ms['eager']:.3f} ms)")


def bf16_paths(model, seqs, stops, keys) -> None:
    """bf16: the default path (flash prompt half, own-half kernel, fused kernels) against the others."""
    bf16_kernels(model)
    base = Decoder(model, 0, stops, slots=37)
    paths = {"flash own half": Decoder(model, 0, stops, slots=37, own_kernel=False),
             "unfused layers": Decoder(model, 0, stops, slots=37, fused_kernels=False),
             "memory-efficient": Decoder(model, 0, stops, slots=37, flash=False, fused_kernels=False),
             "plain": Decoder(model, 0, stops, slots=37, graphs=False, fused=False, sampler_kernel=False,
                              fused_kernels=False)}
    a = base.run(seqs, 20, n=4, temperature=0.9, keys=keys)
    ga = base.run(seqs, 20, want_logps=True)
    print(f"bf16 default path: {base.stats}")
    for name, dec in paths.items():
        b = dec.run(seqs, 20, n=4, temperature=0.9, keys=keys)
        gb = dec.run(seqs, 20, want_logps=True)
        same = sum(x.tokens == y.tokens for ra, rb in zip(a, b) for x, y in zip(ra, rb))
        same_g = sum(x[0].tokens == y[0].tokens for x, y in zip(ga, gb))
        dlp = max((abs(u - v) for x, y in zip(ga, gb) if x[0].tokens == y[0].tokens
                   for u, v in zip(x[0].logps, y[0].logps)), default=float("nan"))
        print(f"bf16: default = {name} path on {same}/{len(seqs) * 4} samples, {same_g}/{len(seqs)} greedy replies; "
              f"max |d logp| on identical replies {dlp:.3g}")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: bench/decode_check.py checks the CUDA fast path and needs a GPU (none found)")
    main()
