"""MMLU 5-shot knowledge state (letter probabilities -> Cor, Cer): kb's engine against the reference loops.

Same model, same questions, one process. The reference loops:
  rtuning     R-Tuning's loop: batch 1, the full prompt re-encoded for every question, generate() for one
              step, the letter probabilities read from its logits.
  per-choice  one sequence per option (prompt + " A", ..., " D"), batched and length-sorted, the option
              token's log-likelihood (OpenCompass PPL / lm-evaluation-harness style, without the harness's
              one-token-continuation cache); contexts tokenised once per question (generous to it).
A reference may run on a random subset of the questions (--ref-limit, --pc-limit); its full-set time is
then extrapolated per question (said so in the output). The FLOP limit is 2 x body parameters x the
tokens that must be processed (each subject's prefix once, every question's suffix) at the measured
matmul peak.

    python bench/bench_mcq.py --device cpu --model smollm2-135m --limit 150 --subjects 5
    python bench/bench_mcq.py --device cuda --random-init llama2-7b --limit 0 --ref-limit 256 --pc-limit 128 --fp32-check 64
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Iterator
from typing import Any

import common  # bench/common.py: puts the repo on sys.path, so it comes before kb
import numpy as np
import torch

from kb.data import LETTERS, load_split, shots_for, subset
from kb.defaults import default_shots
from kb.engine import (
    Batch,
    PrefixScorer,
    TokenStream,
    auto_token_budget,
    encode,
    iter_batches,
    letter_candidates,
    letter_probs,
    pass_overhead_tokens,
    plan_batches,
)
from kb.models import attention_dims
from kb.prompts import PromptFormat, prompt_for, render


def pick(limit: int, subjects: int, seed: int) -> list[Any]:
    """MMLU test questions: `subjects` random subjects (0 = all), then a seeded subset of `limit` (0 = all)."""
    samples = load_split("mmlu", "test")
    if subjects:
        names = sorted(random.Random(seed).sample(sorted({s.group for s in samples}), subjects))
        samples = [s for s in samples if s.group in names]
    return subset(samples, limit or None, seed)


ABLATIONS = ("unfused", "padded")  # mode suffixes: transformers' layers; the cascade's padded attention


def split_mode(mode: str) -> tuple[str, list[str]]:
    """"auto-unfused-padded" -> ("auto", ["unfused", "padded"])."""
    base, *flags = mode.split("-")
    return base, flags


def run_ours(sub: common.Subject, prompts: list[str], groups: list[str], n_choices: list[int],
             args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """The kb path, as the state query runs it: prompts encoded subject by subject in a background thread,
    each subject's batches planned once it is encoded, shared-prefix scoring, pipelined."""
    tok = sub.tokenizer
    cands = letter_candidates(tok)
    flat = [t for c in cands for t in c]
    t0 = time.perf_counter()
    stream = TokenStream(tok, prompts, chat=False, groups=groups)
    budget = args.max_batch_tokens or auto_token_budget(sub.model, generation=False)
    base, flags = split_mode(mode)  # e.g. "auto-unfused": transformers' layers, no fused kernels
    scorer = PrefixScorer(sub.model, tok.pad_token_id, mode=base, fused_kernels=False if "unfused" in flags else None,
                          varlen=False if "padded" in flags else None)
    overhead = pass_overhead_tokens(sub.model, cascade=scorer.mode == "cascade", varlen=scorer.varlen)
    batches: list[Batch] = []

    def jobs() -> Iterator[tuple[list[list[int]], int]]:
        for b in iter_batches(stream, groups, args.batch_size, budget, overhead_tokens=max(1, overhead)):
            batches.append(b)
            yield [stream[i] for i in b.indices], b.prefix_len

    logp = torch.empty(len(prompts), len(flat))
    for k, (lp, _) in enumerate(scorer.score_many(jobs(), flat)):
        logp[list(batches[k].indices)] = lp
    t1 = time.perf_counter()
    probs = letter_probs(logp, cands, n_choices)
    t2 = time.perf_counter()
    seqs = list(stream.wait())
    prefix = {b.group: b.prefix_len for b in batches}
    suffix = sum(len(seqs[i]) - b.prefix_len for b in batches for i in b.indices)
    padded = sum(len(b.indices) * (len(seqs[b.indices[0]]) - b.prefix_len) for b in batches)
    label = ", ".join([scorer.mode, *flags, *(["varlen"] if scorer.varlen else [])])
    return {"probs": probs, "logp": logp, "seqs": seqs, "mode": label, "batches": len(batches),
            "budget": budget, "overhead_tokens": overhead, "prefix_tokens": sum(prefix.values()), "suffix_tokens": suffix,
            "padded_suffix_tokens": padded, "t_tokenize": stream.seconds, "t_score": t1 - t0, "t_letters": t2 - t1}


@torch.inference_mode()
def run_rtuning(sub: common.Subject, prompts: list[str], n_choices: list[int]) -> list[list[float]]:
    """R-Tuning's loop, kept faithful: encode, generate one token, read the letters, next question."""
    tok, model = sub.tokenizer, sub.model
    cands = letter_candidates(tok)
    flat = torch.tensor([t for c in cands for t in c])
    out = []
    for prompt, n in zip(prompts, n_choices):
        enc = tok(prompt, return_tensors="pt").to(sub.device)
        gen = model.generate(**enc, max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
        logp = torch.log_softmax(gen.logits[0][0].float(), dim=-1).cpu()[flat]
        out.append(letter_probs(logp[None], cands, [n])[0])
    return out


@torch.inference_mode()
def run_per_choice(sub: common.Subject, prompts: list[str], n_choices: list[int], batch_size: int) -> list[list[float]]:
    """One padded sequence per option, batched; p(option) = softmax over the options' log-likelihoods."""
    tok, model = sub.tokenizer, sub.model
    ctx = encode(tok, prompts, chat=False)
    opts = [tok.encode(" " + x, add_special_tokens=False) for x in LETTERS[:max(n_choices)]]
    reqs = [(q, k, ctx[q] + opts[k]) for q in range(len(prompts)) for k in range(n_choices[q])]
    reqs.sort(key=lambda r: -len(r[2]))  # the harness's length sort, longest first
    ll = np.zeros((len(prompts), max(n_choices)))
    for a in range(0, len(reqs), batch_size):
        chunk = reqs[a:a + batch_size]
        width = len(chunk[0][2])
        ids = torch.full((len(chunk), width), tok.pad_token_id)
        mask = torch.zeros_like(ids)
        for r, (_, _, s) in enumerate(chunk):
            ids[r, width - len(s):] = torch.tensor(s)
            mask[r, width - len(s):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids.to(sub.device), attention_mask=mask.to(sub.device), position_ids=pos.to(sub.device),
                       logits_to_keep=len(opts[0]) + 1).logits
        for r, (q, k, _) in enumerate(chunk):  # log p(option tokens | prompt), summed over the option's tokens
            lp = torch.log_softmax(logits[r, :-1].float(), dim=-1)
            ll[q, k] = float(lp[torch.arange(len(opts[k])), torch.tensor(opts[k])].sum())
    out = []
    for q, n in enumerate(n_choices):
        p = np.exp(ll[q, :n] - ll[q, :n].max())
        out.append(list(p / p.sum()))
    return out


def merge_ours(acc: dict[str, Any] | None, part: dict[str, Any], idx: list[int], n: int) -> dict[str, Any]:
    """Accumulate kb's per-subject runs (CPU, interleaved) into one result over all n questions."""
    if acc is None:
        acc = {"probs": [None] * n, "logp": torch.empty(n, part["logp"].shape[1]), "seqs": [None] * n, "mode": part["mode"],
               **{k: 0 for k in part if k not in {"probs", "logp", "seqs", "mode", "budget", "overhead_tokens"}},
               "budget": part["budget"], "overhead_tokens": part["overhead_tokens"]}
    for j, i in enumerate(idx):
        acc["probs"][i], acc["seqs"][i] = part["probs"][j], part["seqs"][j]
    acc["logp"][idx] = part["logp"]
    for k, v in part.items():
        if k not in {"probs", "logp", "seqs", "mode", "budget", "overhead_tokens"}:
            acc[k] += v
    return acc


def single_variant(logp: torch.Tensor, tok: Any, n_choices: list[int]) -> list[list[float]]:
    """kb's log-probs restricted to the ' A'..' D' tokens (the per-choice reference's definition)."""
    cands = letter_candidates(tok)
    flat = [t for c in cands for t in c]
    space = [tok.encode(" " + x, add_special_tokens=False)[0] for x in LETTERS[:max(n_choices)]]
    return letter_probs(logp[:, [flat.index(t) for t in space]], [[i] for i in range(len(space))], n_choices)


def agreement(a: list[list[float]], b: list[list[float]], gold: list[int]) -> dict[str, Any]:
    same = sum(int(np.argmax(x)) == int(np.argmax(y)) for x, y in zip(a, b))
    d_cor = [abs(x[g] - y[g]) for x, y, g in zip(a, b, gold)]
    return {"n": len(a), "argmax_identical": f"{same}/{len(a)}", "max_abs_dcor": max(d_cor),
            "mean_abs_dcor": float(np.mean(d_cor))}


def profile(sub: common.Subject, prompts: list[str], groups: list[str], args: argparse.Namespace) -> str:
    """Top operators by device time over kb's first --profile passes (what to optimise next)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    seqs = encode(sub.tokenizer, prompts, chat=False)
    budget = args.max_batch_tokens or auto_token_budget(sub.model, generation=False)
    batches = plan_batches(seqs, groups, args.batch_size, budget, overhead_tokens=pass_overhead_tokens(sub.model))
    batches = batches[:args.profile]
    scorer = PrefixScorer(sub.model, sub.tokenizer.pad_token_id, mode=args.mode)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with torch_profile(activities=acts) as prof:
        for _ in scorer.score_many(([seqs[i] for i in b.indices], b.prefix_len) for b in batches):
            pass
        common.sync(args.device)
    key = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    try:
        return prof.key_averages().table(sort_by=key, row_limit=18)
    except (AttributeError, KeyError):
        return prof.key_averages().table(sort_by="self_device_time_total", row_limit=18)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(p)
    p.add_argument("--limit", type=int, default=150, help="questions for kb (0 = all 14,042)")
    p.add_argument("--subjects", type=int, default=0, help="restrict to this many random subjects (0 = all)")
    p.add_argument("--shots", type=int, default=default_shots("mmlu", "probe"))
    p.add_argument("--ref-limit", type=int, default=None, help="questions for R-Tuning's loop (default: all)")
    p.add_argument("--pc-limit", type=int, default=None, help="questions for per-choice scoring (default: all)")
    p.add_argument("--pc-batch-size", type=int, default=None, help="sequences per pass (default 32 cuda, 8 cpu)")
    p.add_argument("--batch-size", type=int, default=None, help="kb: questions per pass (default 512 cuda, 64 cpu)")
    p.add_argument("--max-batch-tokens", type=int, default=None, help="kb: token budget (default: from free memory)")
    p.add_argument("--mode", default="auto", choices=["auto", "cascade", "view", "copy"], help="kb prefix path")
    p.add_argument("--ablate", default="", help="comma-separated extra kb modes to time on the same questions; "
                   "suffix -unfused runs without kb.engine.fused's kernels, -padded runs the cascade's attention "
                   "through padded copies instead of varlen flash attention (e.g. auto-unfused,auto-padded)")
    p.add_argument("--fp32-check", type=int, default=0, help="GPU: recheck agreement on this many questions in fp32")
    p.add_argument("--profile", type=int, default=0, help="profile kb's first N passes (top kernels by device time)")
    args = p.parse_args()
    modes = {"auto", "cascade", "view", "copy"}
    bad = [m for m in args.ablate.split(",")
           if m and (split_mode(m)[0] not in modes or not set(split_mode(m)[1]) <= set(ABLATIONS))]
    if bad:
        p.error(f"--ablate: unknown mode(s) {', '.join(bad)} (each one of {', '.join(sorted(modes))}, "
                f"optionally with -{' / -'.join(ABLATIONS)})")
    cuda = args.device.startswith("cuda")
    args.batch_size = args.batch_size or (512 if cuda else 64)
    pc_bs = args.pc_batch_size or (32 if cuda else 8)

    sub = common.load_subject(args)
    samples = pick(args.limit, args.subjects, args.seed)
    fmt = PromptFormat(prompt_for("mmlu", "probe"), args.shots, chat=False)
    prompts = [render(s, fmt, shots_for("mmlu", args.shots, s.group)) for s in samples]
    groups = [s.group for s in samples]
    n_choices = [len(s.choices) for s in samples]
    gold = [LETTERS.index(s.answer) for s in samples]
    rng = random.Random(args.seed)
    ref_idx = sorted(rng.sample(range(len(samples)), min(args.ref_limit or len(samples), len(samples))))
    pc_idx = sorted(rng.sample(range(len(samples)), min(args.pc_limit or len(samples), len(samples))))
    print(f"{sub.name} ({sub.dtype}) on {common.machine(args.device)}; {len(samples)} questions, "
          f"{len(set(groups))} subjects, {args.shots}-shot; {common.versions()}", flush=True)

    peak = common.peak_flops(args.device, sub.dtype)
    # Warm-up (untimed): kernels, allocator, cuBLAS handles for every method.
    run_ours(sub, prompts[:4], groups[:4], n_choices[:4], args, args.mode)
    run_rtuning(sub, prompts[:1], n_choices[:1])
    run_per_choice(sub, prompts[:1], n_choices[:1], pc_bs)

    if cuda:  # kb over the whole set (its real use), then each reference on its subset
        ours, t_ours, mem_ours, c_ours = common.timed(
            args.device, lambda: run_ours(sub, prompts, groups, n_choices, args, args.mode))
        print(f"kb ({ours['mode']}): {t_ours:.2f} s, {ours['batches']} passes; tokenise {ours['t_tokenize']:.2f} s "
              f"(background thread, overlapping the passes), encode-plan-score {ours['t_score']:.2f} s", flush=True)
        chunks = [list(range(len(samples)))]
    else:  # a shared CPU's load drifts over minutes: alternate the methods subject by subject
        chunks = [[i for i, g in enumerate(groups) if g == name] for name in dict.fromkeys(groups)]
        ours, t_ours, mem_ours, c_ours = None, 0.0, 0.0, 0.0
    rt_by, pc_by = {}, {}
    t_rt = c_rt = mem_rt = t_pc = c_pc = mem_pc = 0.0
    for chunk in chunks:
        if not cuda:
            o, dt, mem, c = common.timed(args.device, lambda chunk=chunk: run_ours(
                sub, [prompts[i] for i in chunk], [groups[i] for i in chunk], [n_choices[i] for i in chunk], args, args.mode))
            ours = merge_ours(ours, o, chunk, len(samples))
            t_ours, c_ours, mem_ours = t_ours + dt, c_ours + c, max(mem_ours, mem)
        r_idx = [i for i in ref_idx if i in set(chunk)]
        if r_idx:
            out, dt, mem, c = common.timed(args.device, lambda r_idx=r_idx: run_rtuning(
                sub, [prompts[i] for i in r_idx], [n_choices[i] for i in r_idx]))
            rt_by.update(zip(r_idx, out))
            t_rt, c_rt, mem_rt = t_rt + dt, c_rt + c, max(mem_rt, mem)
        p_idx = [i for i in pc_idx if i in set(chunk)]
        if p_idx:
            out, dt, mem, c = common.timed(args.device, lambda p_idx=p_idx: run_per_choice(
                sub, [prompts[i] for i in p_idx], [n_choices[i] for i in p_idx], pc_bs))
            pc_by.update(zip(p_idx, out))
            t_pc, c_pc, mem_pc = t_pc + dt, c_pc + c, max(mem_pc, mem)
    assert ours is not None
    if not cuda:
        print(f"kb ({ours['mode']}), subject by subject: {t_ours:.2f} s, {ours['batches']} passes", flush=True)
    rt, pc = [rt_by[i] for i in ref_idx], [pc_by[i] for i in pc_idx]
    print(f"R-Tuning loop: {t_rt:.2f} s on {len(ref_idx)} questions; per-choice: {t_pc:.2f} s on {len(pc_idx)}", flush=True)
    ablations = []
    for mode in [m for m in args.ablate.split(",") if m]:
        ab, t_ab, mem_ab, _ = common.timed(args.device, lambda mode=mode: run_ours(sub, prompts, groups, n_choices, args, mode))
        agree = agreement(ab["probs"], ours["probs"], gold)
        ablations.append({"method": f"kb ({ab['mode']})", "questions": len(samples), "wall_s": t_ab,
                          "q_per_s": len(samples) / t_ab, "full_set_s": t_ab, "speedup": t_ab / t_ours, "peak_gib": mem_ab,
                          "agreement": f"{agree['argmax_identical']} argmax vs kb, max|dCor| {agree['max_abs_dcor']:.2e}"})
        print(f"kb ({ab['mode']}): {t_ab:.2f} s", flush=True)

    n = len(samples)
    full_tokens = sum(len(s) for s in ours["seqs"])
    est_rt, est_pc = t_rt / len(ref_idx) * n, t_pc / len(pc_idx) * n
    single = single_variant(ours["logp"], sub.tokenizer, n_choices)
    rows = [
        {"method": f"kb engine ({ours['mode']})", "questions": n, "wall_s": t_ours, "q_per_s": n / t_ours,
         "prompt_tok_per_s": full_tokens / t_ours, "full_set_s": t_ours, "speedup": 1.0, "peak_gib": mem_ours,
         "cpu_s": c_ours, "cpu_speedup": 1.0},
        {"method": "R-Tuning loop", "questions": len(ref_idx), "wall_s": t_rt, "q_per_s": len(ref_idx) / t_rt,
         "prompt_tok_per_s": sum(len(ours["seqs"][i]) for i in ref_idx) / t_rt, "full_set_s": est_rt,
         "speedup": est_rt / t_ours, "peak_gib": mem_rt, "cpu_s": c_rt, "cpu_speedup": c_rt / len(ref_idx) * n / c_ours,
         "agree": agreement([ours["probs"][i] for i in ref_idx], rt, [gold[i] for i in ref_idx])},
        {"method": "per-choice (4 seqs/q)", "questions": len(pc_idx), "wall_s": t_pc, "q_per_s": len(pc_idx) / t_pc,
         "prompt_tok_per_s": sum(len(ours["seqs"][i]) for i in pc_idx) / t_pc, "full_set_s": est_pc,
         "speedup": est_pc / t_ours, "peak_gib": mem_pc, "cpu_s": c_pc, "cpu_speedup": c_pc / len(pc_idx) * n / c_ours,
         "agree": agreement([single[i] for i in pc_idx], pc, [gold[i] for i in pc_idx])},
    ]
    body = common.body_params(sub.model)
    hidden = sub.model.config.hidden_size
    must = ours["prefix_tokens"] + ours["suffix_tokens"]
    flops = 2 * body * must + 2 * hidden * sub.model.config.vocab_size * n
    limit_s = flops / peak
    # Memory-traffic limit: the weights once per pass kb makes, every token's keys/values written and read once.
    cfg = sub.model.config
    _, kv_heads, head_dim = attention_dims(cfg)
    itemsize = next(sub.model.parameters()).element_size()
    weights = sum(p.numel() * p.element_size() for p in sub.model.parameters())
    traffic = ours["batches"] * weights + 2 * must * cfg.num_hidden_layers * 2 * kv_heads * head_dim * itemsize
    bw = common.peak_bandwidth(args.device)
    mem_limit_s = traffic / bw if bw == bw else None
    fp32 = None
    prof = profile(sub, prompts, groups, args) if args.profile else None
    if prof:
        print(prof, flush=True)
    if args.fp32_check and cuda:
        sub.model.float()
        sub.dtype = "float32"
        # a few whole subjects' first questions, so the shared-prefix path is what gets checked
        names = sorted(random.Random(args.seed + 1).sample(sorted(set(groups)), min(4, len(set(groups)))))
        per = max(1, args.fp32_check // len(names))
        idx = [i for g in names for i in [j for j, x in enumerate(groups) if x == g][:per]]
        sel = [prompts[i] for i in idx]
        o32 = run_ours(sub, sel, [groups[i] for i in idx], [n_choices[i] for i in idx], args, args.mode)
        r32 = run_rtuning(sub, sel, [n_choices[i] for i in idx])
        fp32 = agreement(o32["probs"], r32, [gold[i] for i in idx])
        print(f"fp32 recheck, kb vs R-Tuning loop on {len(idx)} questions: {fp32}", flush=True)

    print()
    print(f"{len(samples)} MMLU test questions ({args.shots}-shot), {sub.name} {sub.dtype if not fp32 else 'bfloat16'}, "
          f"{common.machine(args.device)}")
    for r in rows:
        r["agreement"] = "" if "agree" not in r else f"{r['agree']['argmax_identical']} argmax, max|dCor| {r['agree']['max_abs_dcor']:.2e}"
    cols = ["method", "questions", "wall_s", "q_per_s", "prompt_tok_per_s", "full_set_s", "speedup", "peak_gib"]
    common.print_table(rows + ablations, cols + (["cpu_s", "cpu_speedup"] if not cuda else []) + ["agreement"])
    if len(ref_idx) < n or len(pc_idx) < n:
        print("full_set_s of a reference run on a subset = its seconds per question x all questions (extrapolated)")
    if ours["mode"].startswith("cascade"):  # packed: padding never goes through the weights
        through = f"{ours['suffix_tokens']:,} suffix tokens packed without padding"
    else:
        through = f"{ours['padded_suffix_tokens']:,} padded suffix tokens ({ours['suffix_tokens']:,} real)"
    print(f"tokens: {full_tokens:,} in full prompts; kb runs {ours['prefix_tokens']:,} prefix + {through} "
          f"through the weights, in {ours['batches']} passes")
    print(f"FLOP limit: 2 x {body / 1e9:.3f}B body params x {must:,} tokens (+ LM head at {n:,} positions) = "
          f"{flops / 1e15:.2f} PFLOP at measured peak {peak / 1e12:.1f} TFLOP/s = {limit_s:.2f} s; "
          f"kb takes {t_ours / limit_s:.2f}x that ({100 * limit_s / t_ours:.0f}% of the limit)")
    if mem_limit_s:
        print(f"memory-traffic limit: weights {weights / 1e9:.1f} GB x {ours['batches']} passes + keys/values "
              f"written and read once = {traffic / 1e12:.2f} TB at measured {bw / 1e12:.2f} TB/s = {mem_limit_s:.2f} s; "
              f"kb takes {t_ours / mem_limit_s:.2f}x that")
    if fp32:
        print(f"fp32 recheck (kb vs R-Tuning loop, {fp32['n']} questions): {fp32['argmax_identical']} argmax identical, "
              f"max |dCor| {fp32['max_abs_dcor']:.2e}")
    for r in rows:
        r.pop("agreement", None)
    common.write_json(args.json, {"args": vars(args), "machine": common.machine(args.device), "versions": common.versions(),
                                  "model": sub.name, "rows": rows, "ablations": ablations, "peak_flops": peak,
                                  "flop_limit_s": limit_s, "memory_limit_s": mem_limit_s, "bandwidth": bw,
                                  "kb": {k: v for k, v in ours.items() if k not in {"probs", "logp", "seqs"}},
                                  "fp32_check": fp32, "full_prompt_tokens": full_tokens, "profile": prof})


if __name__ == "__main__":
    main()
