"""ParaRel open answers: N sampled answers per question (CRaFT's Cor/Cer query) and greedy probing.

Same model, same questions, one process. kb: questions batched under a memory budget, each prompt
prefilled once and its cache shared by its N samples, all samples of a batch decoded together.
References: per-sample generation (N separate generate() calls per question, batch 1) and R-Tuning's
greedy loop (one question at a time). The references run on a random subset (--ref-limit,
--greedy-ref-limit); their full-set time is extrapolated per question. Sampling cannot be compared
draw for draw, so agreement is checked on the greedy answers (identical text).

    python bench/bench_open.py --device cpu --model smollm2-135m --limit 64 --ref-limit 2 --greedy-ref-limit 16
    python bench/bench_open.py --device cuda --random-init llama2-7b --limit 512 --ref-limit 3 --greedy-ref-limit 32
"""

from __future__ import annotations

import argparse
import random
from typing import Any

import common  # bench/common.py: puts the repo on sys.path, so it comes before kb
import torch

from kb.data import load_split, shots_for, subset
from kb.engine import auto_token_budget, batch_seed, generate, plan_batches
from kb.probe import encode
from kb.prompts import PromptFormat, render, resolve_chat


def run_ours(sub: common.Subject, seqs: list[list[int]], n: int, max_new: int, temperature: float, do_sample: bool,
             args: argparse.Namespace) -> tuple[list[list[str]], int]:
    """kb's generate over planned batches; returns texts[q][k] and the number of passes."""
    budget = args.max_batch_tokens or auto_token_budget(sub.model, generation=True)
    batches = plan_batches(seqs, [""] * len(seqs), args.batch_size, budget, share_prefix=False, copies=n,
                           extra_tokens=max_new)
    texts: list[list[str]] = [[] for _ in seqs]
    for b in batches:
        out, _ = generate(sub.model, sub.tokenizer, [seqs[i] for i in b.indices], max_new, do_sample=do_sample,
                          temperature=temperature, num_return_sequences=n, seed=batch_seed(args.seed, b))
        for i, t in zip(b.indices, out):
            texts[i] = t
    return texts, len(batches)


@torch.inference_mode()
def run_one_at_a_time(sub: common.Subject, prompts: list[str], n: int, max_new: int, temperature: float,
                      do_sample: bool, chat: bool) -> list[list[str]]:
    """The reference: re-encode each prompt, one generate() per sample, batch 1."""
    tok, model = sub.tokenizer, sub.model
    kw: dict[str, Any] = dict(temperature=temperature, top_k=0, top_p=1.0) if do_sample else \
        dict(temperature=None, top_k=None, top_p=None)
    out = []
    for prompt in prompts:
        enc = tok(prompt, return_tensors="pt", add_special_tokens=not chat).to(sub.device)
        answers = []
        for _ in range(n):
            gen = model.generate(**enc, max_new_tokens=max_new, do_sample=do_sample, pad_token_id=tok.pad_token_id, **kw)
            answers.append(tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
        out.append(answers)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(p)
    p.add_argument("--split", default="ID_test")
    p.add_argument("--limit", type=int, default=64, help="questions for kb")
    p.add_argument("--shots", type=int, default=3, help="CRaFT queried open QA 3-shot")
    p.add_argument("--samples", type=int, default=10, help="N answers per question (CRaFT: 10)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=50, help="per sampled answer (CRaFT: ~50)")
    p.add_argument("--greedy-new-tokens", type=int, default=15, help="R-Tuning's greedy probe")
    p.add_argument("--ref-limit", type=int, default=2, help="questions for per-sample generation")
    p.add_argument("--greedy-ref-limit", type=int, default=16, help="questions for R-Tuning's greedy loop")
    p.add_argument("--batch-size", type=int, default=None, help="kb: questions per pass (default 256 cuda, 16 cpu)")
    p.add_argument("--max-batch-tokens", type=int, default=None, help="kb: token budget (default: from free memory)")
    p.add_argument("--chat-template", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--fp32-check", type=int, default=0, help="GPU: recheck greedy agreement on this many questions in fp32")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    args.batch_size = args.batch_size or (256 if cuda else 16)

    sub = common.load_subject(args)
    chat = resolve_chat(args.chat_template if not args.random_init else "off", sub.tokenizer)
    template = "open_short" if chat else "open_rtuning"
    fmt = PromptFormat(template, args.shots if not chat else 0, chat)
    samples = subset(load_split("pararel", args.split), args.limit, args.seed)
    prompts = [render(s, fmt, shots_for("pararel", fmt.shots, s.group), sub.tokenizer) for s in samples]
    rng = random.Random(args.seed)
    ref_idx = sorted(rng.sample(range(len(samples)), min(args.ref_limit, len(samples))))
    gref_idx = sorted(rng.sample(range(len(samples)), min(args.greedy_ref_limit, len(samples))))
    print(f"{sub.name} ({sub.dtype}) on {common.machine(args.device)}; {len(samples)} ParaRel {args.split} questions, "
          f"{fmt.describe()}; {common.versions()}", flush=True)
    n, mx, temp = args.samples, args.max_new_tokens, args.temperature

    seqs = encode(sub.tokenizer, prompts[:2], chat)  # warm-up, untimed
    run_ours(sub, seqs, n, 4, temp, True, args)
    run_one_at_a_time(sub, prompts[:1], 1, 4, temp, True, chat)

    def ours_sampling() -> tuple[list[list[str]], int]:
        return run_ours(sub, encode(sub.tokenizer, prompts, chat), n, mx, temp, True, args)

    (samp, passes), t_ours, mem_ours, _ = common.timed(args.device, ours_sampling)
    print(f"kb sampling: {t_ours:.2f} s, {passes} passes", flush=True)
    ref, t_ref, mem_ref, _ = common.timed(args.device, lambda: run_one_at_a_time(
        sub, [prompts[i] for i in ref_idx], n, mx, temp, True, chat))
    print(f"per-sample generation: {t_ref:.2f} s on {len(ref_idx)} questions", flush=True)

    def ours_greedy() -> tuple[list[list[str]], int]:
        return run_ours(sub, encode(sub.tokenizer, prompts, chat), 1, args.greedy_new_tokens, 1.0, False, args)

    (greedy, gpasses), t_og, mem_og, _ = common.timed(args.device, ours_greedy)
    print(f"kb greedy: {t_og:.2f} s, {gpasses} passes", flush=True)
    gref, t_gref, mem_gref, _ = common.timed(args.device, lambda: run_one_at_a_time(
        sub, [prompts[i] for i in gref_idx], 1, args.greedy_new_tokens, 1.0, False, chat))
    print(f"R-Tuning greedy loop: {t_gref:.2f} s on {len(gref_idx)} questions", flush=True)

    fp32 = None
    if args.fp32_check and cuda:  # bf16 greedy paths can part at near-ties; fp32 shows whether that is all it is
        sub.model.float()
        idx = gref_idx[:args.fp32_check]
        o32, _ = run_ours(sub, encode(sub.tokenizer, [prompts[i] for i in idx], chat), 1, args.greedy_new_tokens, 1.0,
                          False, args)
        r32 = run_one_at_a_time(sub, [prompts[i] for i in idx], 1, args.greedy_new_tokens, 1.0, False, chat)
        fp32 = f"{sum(a[0] == b[0] for a, b in zip(o32, r32))}/{len(idx)}"
        print(f"fp32 recheck: {fp32} identical greedy answers (kb batched vs one at a time)", flush=True)

    q = len(samples)
    same = sum(greedy[i][0] == g[0] for i, g in zip(gref_idx, gref))
    est_ref, est_gref = t_ref / len(ref_idx) * q, t_gref / len(gref_idx) * q
    rows = [
        {"method": f"kb sampling (N={n})", "questions": q, "wall_s": t_ours, "q_per_s": q / t_ours,
         "new_tok_per_s": q * n * mx / t_ours, "full_set_s": t_ours, "speedup": 1.0, "peak_gib": mem_ours},
        {"method": f"per-sample generate (N={n})", "questions": len(ref_idx), "wall_s": t_ref,
         "q_per_s": len(ref_idx) / t_ref, "new_tok_per_s": len(ref_idx) * n * mx / t_ref, "full_set_s": est_ref,
         "speedup": est_ref / t_ours, "peak_gib": mem_ref},
        {"method": "kb greedy probe", "questions": q, "wall_s": t_og, "q_per_s": q / t_og,
         "new_tok_per_s": q * args.greedy_new_tokens / t_og, "full_set_s": t_og, "speedup": 1.0, "peak_gib": mem_og},
        {"method": "R-Tuning greedy loop", "questions": len(gref_idx), "wall_s": t_gref, "q_per_s": len(gref_idx) / t_gref,
         "new_tok_per_s": len(gref_idx) * args.greedy_new_tokens / t_gref, "full_set_s": est_gref,
         "speedup": est_gref / t_og, "peak_gib": mem_gref, "agreement": f"{same}/{len(gref_idx)} identical greedy answers"},
    ]
    print()
    print(f"{q} ParaRel {args.split} questions, {sub.name} {sub.dtype}, {common.machine(args.device)}; "
          f"new tokens/s count max_new_tokens per answer (early stops make real counts lower)")
    common.print_table(rows, ["method", "questions", "wall_s", "q_per_s", "new_tok_per_s", "full_set_s", "speedup",
                              "peak_gib", "agreement"])
    print("full_set_s of a reference run on a subset = its seconds per question x all questions (extrapolated)")
    if fp32:
        print(f"fp32 recheck (kb batched greedy vs one at a time): {fp32} identical answers")
    print("example kb samples:", samp[0][:3])
    common.write_json(args.json, {"args": vars(args), "machine": common.machine(args.device), "versions": common.versions(),
                                  "model": sub.name, "rows": rows, "greedy_identical": same, "greedy_checked": len(gref_idx),
                                  "fp32_greedy_identical": fp32})


if __name__ == "__main__":
    main()
