"""Before timing anything on a new machine: the engine's paths agree there, and scoring never syncs.

Tiny random Llama/Gemma on --device in float32 and bfloat16: every PrefixScorer mode against the
one-at-a-time forward, shared-prefill sampling against plain num_return_sequences, and (CUDA) the
number of host-device syncs while score_many runs (torch's sync debug mode).

    python bench/selfcheck.py --device cuda
"""

from __future__ import annotations

import argparse
import warnings

import common  # bench/common.py: puts the repo on sys.path, so it comes before kb
import torch

from kb.engine import PrefixScorer, cascade_supported, common_prefix_len, generate, plan_batches
from kb.testing import tiny_model, tiny_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    print(common.versions(), common.machine(args.device))
    tok = tiny_tokenizer()
    g = torch.Generator().manual_seed(0)
    head = torch.randint(3, len(tok), (300,), generator=g).tolist()
    seqs = [head + torch.randint(3, len(tok), (int(k),), generator=g).tolist() for k in torch.randint(1, 60, (24,), generator=g)]
    pl = common_prefix_len(seqs)
    batches = plan_batches(seqs, ["g"] * len(seqs), 8, 100_000)
    for arch in ("llama", "gemma"):
        for dtype in (torch.float32, torch.bfloat16):
            model = tiny_model(arch, vocab_size=len(tok), layers=4).to(args.device, dtype)
            with torch.inference_mode():
                ref = torch.stack([torch.log_softmax(model(input_ids=torch.tensor([s], device=args.device)).logits[0, -1].float(), -1)
                                   for s in seqs]).cpu()
            modes = ["cascade", "view", "copy"] if cascade_supported(model) else ["view", "copy"]
            for mode in modes:
                sc = PrefixScorer(model, tok.pad_token_id, mode=mode)
                got = torch.empty_like(ref)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    if args.device.startswith("cuda"):
                        torch.cuda.set_sync_debug_mode("warn")
                    jobs = [([seqs[i] for i in b.indices], pl) for b in batches]
                    results = list(sc.score_many(jobs))
                    if args.device.startswith("cuda"):
                        torch.cuda.set_sync_debug_mode("default")
                for b, (lp, _) in zip(batches, results):
                    got[list(b.indices)] = lp
                syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
                print(f"{arch:6s} {str(dtype):15s} {mode:8s} max|dlogp| vs one-at-a-time {float((got - ref).abs().max()):.2e}; "
                      f"argmax same {int((got.argmax(1) == ref.argmax(1)).sum())}/{len(seqs)}; syncs in score_many: {len(syncs)}"
                      + (f" (first: {syncs[0][:120]})" if syncs else ""))
        model = tiny_model(arch, vocab_size=len(tok), layers=4).to(args.device)
        model.generation_config.pad_token_id = tok.pad_token_id
        short = [s[290:] for s in seqs[:6]]
        shared, _ = generate(model, tok, short, 8, do_sample=True, num_return_sequences=4, seed=1)
        cls, mod = type(model), type(model).__module__
        cls.__module__ = "plain"
        try:
            plain, _ = generate(model, tok, short, 8, do_sample=True, num_return_sequences=4, seed=1)
        finally:
            cls.__module__ = mod
        same = sum(a == b for ra, rb in zip(shared, plain) for a, b in zip(ra, rb))
        print(f"{arch:6s} shared-prefill sampling identical to plain num_return_sequences: {same}/24")


if __name__ == "__main__":
    main()
