"""ParaRel open answers: N sampled answers per question (CRaFT's Cor/Cer query) and greedy probing.

Same model, same questions, one process. kb: kb.engine.decode.Decoder (what the stages use on a GPU): each
prompt prefilled once and read once per group of N samples, the decoding step a CUDA graph, sampling
and stops on the device, finished slots refilled from the queue. References: the loop a transformers
user writes (batched generate(), --hf-batch questions per call, left padding, num_return_sequences = N;
optionally the same with transformers' static cache, --static-ref-limit), per-sample generation (N
separate generate() calls per question, batch 1) and R-Tuning's greedy loop (one question at a time).
A reference may run on a random subset; its full-set time is extrapolated per question. Sampling cannot
be compared draw for draw, so agreement is checked on the greedy answers (identical text).

The limits printed with each workload: the FLOP limit (2 x body parameters x every prompt and new
token + the LM head at every new token, at the matmul rate measured in the run) and the memory-traffic
limit (the weights once per decoding step, max_new_tokens steps, plus the keys/values each step must
read: every prompt's once, every sample's own so far; at the copy bandwidth measured in the run).

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
from kb.defaults import default_shots
from kb.engine import (
    Decoder,
    auto_token_budget,
    batch_seed,
    decode_texts,
    decoder_for,
    encode,
    generate,
    generation_stop_ids,
    plan_batches,
    use_decoder,
)
from kb.engine.own_attention import OWN_HALF_LAUNCH
from kb.models import attention_dims
from kb.prompts import PromptFormat, budget_for, prompt_for, render, resolve_chat


def question_keys(args: argparse.Namespace, count: int) -> list[int]:
    """The sampling key of each question: the same in every kb row of a run, so they draw the same samples."""
    return [args.seed * 1_000_003 + i for i in range(count)]


def run_kb(sub: common.Subject, seqs: list[list[int]], n: int, max_new: int, temperature: float, do_sample: bool,
           args: argparse.Namespace) -> tuple[list[list[str]], dict[str, Any]]:
    """kb.engine.decode over all questions at once (the decoder sizes its slots from free memory)."""
    if not use_decoder(sub.model) and not args.decoder_on_cpu:
        texts, passes = run_ours(sub, seqs, n, max_new, temperature, do_sample, args)
        return texts, {"passes": passes}
    keys = question_keys(args, len(seqs))
    dec = decoder_for(sub.model, sub.tokenizer.pad_token_id, generation_stop_ids(sub.model, sub.tokenizer),
                      own_kernel=not args.flash_own_half)  # decode_texts below reuses this decoder
    texts, _ = decode_texts(sub.model, sub.tokenizer, seqs, max_new, n=n, temperature=temperature if do_sample else None,
                            keys=keys, want_scores=not do_sample)
    return texts, dict(dec.stats)


def run_kb_unfused(sub: common.Subject, seqs: list[list[int]], n: int, max_new: int, temperature: float,
                   args: argparse.Namespace) -> dict[str, Any]:
    """The same sampling through the v4 decoder: flash attention for the own half, transformers' layers
    (no kb.engine.fused kernels): what this version's kernels buy, in the same run."""
    dec = Decoder(sub.model, sub.tokenizer.pad_token_id, generation_stop_ids(sub.model, sub.tokenizer),
                  own_kernel=False, fused_kernels=False)
    try:
        dec.run(seqs, max_new, n=n, temperature=temperature, keys=question_keys(args, len(seqs)))
    finally:
        dec.release()
    return dict(dec.stats)


@torch.inference_mode()
def run_hf_batched(sub: common.Subject, prompts: list[str], n: int, max_new: int, temperature: float, do_sample: bool,
                   chat: bool, per_call: int, static: bool = False) -> list[list[str]]:
    """The loop a transformers user writes: generate() on per_call questions at a time, left padding."""
    tok, model = sub.tokenizer, sub.model
    side = tok.padding_side
    tok.padding_side = "left"
    kw: dict[str, Any] = dict(temperature=temperature, top_k=0, top_p=1.0) if do_sample else \
        dict(temperature=None, top_k=None, top_p=None)
    if static:
        kw["cache_implementation"] = "static"
    out: list[list[str]] = []
    try:
        for a in range(0, len(prompts), per_call):
            enc = tok(prompts[a:a + per_call], return_tensors="pt", padding=True, add_special_tokens=not chat).to(sub.device)
            gen = model.generate(**enc, max_new_tokens=max_new, do_sample=do_sample, num_return_sequences=n,
                                 pad_token_id=tok.pad_token_id, **kw)
            texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            out += [texts[i * n:(i + 1) * n] for i in range(len(texts) // n)]
    finally:
        tok.padding_side = side
    return out


def limits(sub: common.Subject, seqs: list[list[int]], n: int, max_new: int, peak: float, bw: float) -> dict[str, Any]:
    """FLOP and memory-traffic limits of generating max_new tokens for n samples of every prompt."""
    cfg = sub.model.config
    body = common.body_params(sub.model)
    q, prompt = len(seqs), sum(len(s) for s in seqs)
    new = q * n * max_new
    head = sub.model.get_output_embeddings().weight.numel()
    flops = 2 * body * (prompt + new) + 2 * head * new
    _, kv_heads, head_dim = attention_dims(cfg)
    itemsize = next(sub.model.parameters()).element_size()
    kv_tok = cfg.num_hidden_layers * 2 * kv_heads * head_dim * itemsize
    weights = sum(p.numel() * p.element_size() for p in sub.model.parameters())
    kv_read = max_new * prompt * kv_tok + q * n * kv_tok * max_new * (max_new - 1) // 2
    traffic = max_new * weights + kv_read
    out = {"prompt_tokens": prompt, "new_tokens": new, "pflop": flops / 1e15, "flop_limit_s": flops / peak,
           "weights_gb": weights / 1e9, "kv_read_gb": kv_read / 1e9, "traffic_gb": traffic / 1e9,
           "memory_limit_s": traffic / bw if bw == bw else None}
    out["limit_s"] = max(out["flop_limit_s"], out["memory_limit_s"] or 0.0)
    return out


def print_limits(name: str, lim: dict[str, Any], kb_s: float, peak: float, bw: float) -> None:
    print(f"{name}: FLOP limit {lim['pflop']:.3f} PFLOP ({lim['prompt_tokens']:,} prompt + {lim['new_tokens']:,} new "
          f"tokens) at {peak / 1e12:.0f} TFLOP/s = {lim['flop_limit_s']:.2f} s; memory limit {lim['traffic_gb']:.0f} GB "
          f"(weights {lim['weights_gb']:.1f} GB x steps + KV {lim['kv_read_gb']:.0f} GB) at {bw / 1e12:.2f} TB/s = "
          f"{lim['memory_limit_s'] or float('nan'):.2f} s; kb {kb_s:.2f} s = {kb_s / lim['limit_s']:.2f}x the larger "
          f"({kb_s / lim['flop_limit_s']:.2f}x FLOP, {kb_s / (lim['memory_limit_s'] or float('nan')):.2f}x memory)",
          flush=True)


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
    p.add_argument("--limit", type=int, default=64, help="questions for kb (0: all)")
    p.add_argument("--shots", type=int, default=default_shots("pararel", "query"), help="CRaFT queried open QA 3-shot")
    p.add_argument("--samples", type=int, default=10, help="N answers per question (CRaFT: 10)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=budget_for("pararel", "query"), help="per sampled answer (CRaFT: ~50)")
    p.add_argument("--greedy-new-tokens", type=int, default=budget_for("pararel", "probe"), help="R-Tuning's greedy probe")
    p.add_argument("--greedy-only", action="store_true", help="only the greedy probe (kb, R-Tuning's loop)")
    p.add_argument("--ref-limit", type=int, default=2, help="questions for per-sample generation")
    p.add_argument("--greedy-ref-limit", type=int, default=16, help="questions for R-Tuning's greedy loop")
    p.add_argument("--hf-ref-limit", type=int, default=64, help="questions for batched generate (0: skip)")
    p.add_argument("--hf-batch", type=int, default=64, help="questions per batched generate call")
    p.add_argument("--static-ref-limit", type=int, default=0,
                   help="questions for batched generate with the static cache (compiled forward); 0: skip")
    p.add_argument("--legacy", action="store_true", help="also time kb's previous path (engine.generate)")
    p.add_argument("--decoder-on-cpu", action="store_true", help="use kb.engine.decode on CPU too (the stages do not)")
    p.add_argument("--batch-size", type=int, default=None, help="legacy path: questions per pass (default 256 cuda, 16 cpu)")
    p.add_argument("--max-batch-tokens", type=int, default=None, help="legacy path: token budget (default: free memory)")
    p.add_argument("--chat-template", default="auto", choices=["auto", "on", "off"],
                   help="auto: the tokenizer's chat template for a real model, none for a random-init one")
    p.add_argument("--flash-own-half", action="store_true",
                   help="GPU: the decoder's own half through flash attention instead of kb's Triton kernel "
                        "(kb.engine.own_attention; the v4 path)")
    p.add_argument("--unfused-ref", action="store_true",
                   help="GPU: also time the v4 decoder (flash own half, transformers' layers) on the same questions")
    p.add_argument("--fp32-check", type=int, default=0, help="GPU: recheck greedy agreement on this many questions in fp32")
    p.add_argument("--own-half-launch", default="", help="BLOCK_T,WARPS,STAGES for the own-half kernel "
                   "(bench/tune_own_half.py prints the fastest; STAGES 0: Triton's default)")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    args.batch_size = args.batch_size or (256 if cuda else 16)
    if args.own_half_launch:
        try:
            block_t, warps, stages = (int(x) for x in args.own_half_launch.split(","))
        except ValueError:
            p.error(f"--own-half-launch: want BLOCK_T,WARPS,STAGES (three integers), got {args.own_half_launch!r}")
        OWN_HALF_LAUNCH.update(block_t=block_t, num_warps=warps, num_stages=stages or None)
        print(f"own-half kernel launch: {OWN_HALF_LAUNCH}", flush=True)

    sub = common.load_subject(args)
    chat = resolve_chat(args.chat_template if not (args.random_init and args.chat_template == "auto") else "off",
                        sub.tokenizer)
    template = prompt_for("pararel", "probe", chat)
    fmt = PromptFormat(template, args.shots if not chat else 0, chat)
    samples = subset(load_split("pararel", args.split), args.limit or None, args.seed)
    prompts = [render(s, fmt, shots_for("pararel", fmt.shots, s.group), sub.tokenizer) for s in samples]
    rng = random.Random(args.seed)
    ref_idx = sorted(rng.sample(range(len(samples)), min(args.ref_limit, len(samples))))
    gref_idx = sorted(rng.sample(range(len(samples)), min(args.greedy_ref_limit, len(samples))))
    hf_idx = sorted(rng.sample(range(len(samples)), min(args.hf_ref_limit, len(samples))))
    st_idx = sorted(rng.sample(range(len(samples)), min(args.static_ref_limit, len(samples))))
    print(f"{sub.name} ({sub.dtype}) on {common.machine(args.device)}; {len(samples)} ParaRel {args.split} questions, "
          f"{fmt.describe()}; {common.versions()}", flush=True)
    n, mx, temp, gmx = args.samples, args.max_new_tokens, args.temperature, args.greedy_new_tokens
    q = len(samples)
    peak = common.peak_flops(args.device, sub.dtype) if cuda else float("nan")
    bw = common.peak_bandwidth(args.device)
    if cuda:
        print(f"measured: bf16 matmul {peak / 1e12:.1f} TFLOP/s, copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    all_seqs = encode(sub.tokenizer, prompts, chat)
    rows: list[dict[str, Any]] = []
    out: dict[str, Any] = {"args": vars(args), "machine": common.machine(args.device), "versions": common.versions(),
                           "model": sub.name, "peak_flops": peak, "bandwidth": bw, "rows": rows}

    def row(method: str, questions: int, wall: float, new_per_q: int, kb_s: float | None, mem: float,
            **extra: Any) -> dict[str, Any]:
        full = wall / questions * q
        r = {"method": method, "questions": questions, "wall_s": wall, "q_per_s": questions / wall,
             "new_tok_per_s": questions * new_per_q / wall, "full_set_s": full,
             "kb_speedup": (full / kb_s) if kb_s else None, "peak_gib": mem, **extra}
        rows.append(r)
        common.write_json(args.json, out)
        return r

    # warm-up, untimed (kb's step capture for these shapes is timed below: it is part of a run)
    run_kb(sub, all_seqs[:2], min(n, 2), 4, temp, True, args)
    run_one_at_a_time(sub, prompts[:1], 1, 4, temp, True, chat)

    samp: list[list[str]] = [[""]]
    if not args.greedy_only:
        (samp, stats), t_ours, mem_ours, _ = common.timed(
            args.device, lambda: run_kb(sub, encode(sub.tokenizer, prompts, chat), n, mx, temp, True, args))
        real_new = sum(len(sub.tokenizer(t, add_special_tokens=False)["input_ids"]) for r in samp for t in r)
        print(f"kb sampling: {t_ours:.2f} s, {stats}", flush=True)
        row(f"kb sampling (N={n})", q, t_ours, n * mx, t_ours, mem_ours, stats=stats, retokenised_new_tokens=real_new)
        if cuda:
            lim = limits(sub, all_seqs, n, mx, peak, bw)
            out["sampling_limits"] = lim
            print_limits("sampling", lim, t_ours, peak, bw)
        if args.unfused_ref and cuda:
            run_kb_unfused(sub, all_seqs[:2], min(n, 2), 4, temp, args)  # its own capture, untimed like kb's warm-up
            ustats, t_un, mem_un, _ = common.timed(
                args.device, lambda: run_kb_unfused(sub, encode(sub.tokenizer, prompts, chat), n, mx, temp, args))
            print(f"kb v4 decoder (flash own half, unfused layers): {t_un:.2f} s, {ustats}", flush=True)
            row(f"kb v4 decoder: flash own half, unfused layers (N={n})", q, t_un, n * mx, t_ours, mem_un, stats=ustats)
        if args.legacy:
            (_, passes), t_leg, mem_leg, _ = common.timed(
                args.device, lambda: run_ours(sub, encode(sub.tokenizer, prompts, chat), n, mx, temp, True, args))
            print(f"kb previous path (engine.generate): {t_leg:.2f} s, {passes} passes", flush=True)
            row(f"kb previous engine.generate (N={n})", q, t_leg, n * mx, t_ours, mem_leg)
        if hf_idx:
            _, t_hf, mem_hf, _ = common.timed(args.device, lambda: run_hf_batched(
                sub, [prompts[i] for i in hf_idx], n, mx, temp, True, chat, args.hf_batch))
            print(f"batched generate: {t_hf:.2f} s on {len(hf_idx)} questions", flush=True)
            row(f"batched generate, {args.hf_batch} q/call, num_return_sequences={n}", len(hf_idx), t_hf, n * mx, t_ours,
                mem_hf)
        if st_idx:
            first = [prompts[i] for i in st_idx[:args.hf_batch]]
            _, t_c, _, _ = common.timed(args.device, lambda: run_hf_batched(sub, first, n, mx, temp, True, chat,
                                                                            args.hf_batch, static=True))
            print(f"static-cache generate, first call (compiles): {t_c:.2f} s", flush=True)
            _, t_st, mem_st, _ = common.timed(args.device, lambda: run_hf_batched(
                sub, [prompts[i] for i in st_idx], n, mx, temp, True, chat, args.hf_batch, static=True))
            print(f"static-cache generate: {t_st:.2f} s on {len(st_idx)} questions", flush=True)
            row(f"batched generate + static cache, {args.hf_batch} q/call", len(st_idx), t_st, n * mx, t_ours, mem_st,
                first_call_s=t_c)
        if ref_idx:
            _, t_ref, mem_ref, _ = common.timed(args.device, lambda: run_one_at_a_time(
                sub, [prompts[i] for i in ref_idx], n, mx, temp, True, chat))
            print(f"per-sample generation: {t_ref:.2f} s on {len(ref_idx)} questions", flush=True)
            row(f"per-sample generate (N={n})", len(ref_idx), t_ref, n * mx, t_ours, mem_ref)

    (greedy, gstats), t_og, mem_og, _ = common.timed(
        args.device, lambda: run_kb(sub, encode(sub.tokenizer, prompts, chat), 1, gmx, 1.0, False, args))
    print(f"kb greedy: {t_og:.2f} s, {gstats}", flush=True)
    row("kb greedy probe", q, t_og, gmx, t_og, mem_og, stats=gstats)
    if cuda:
        glim = limits(sub, all_seqs, 1, gmx, peak, bw)
        out["greedy_limits"] = glim
        print_limits("greedy", glim, t_og, peak, bw)
    if hf_idx:
        _, t_hg, mem_hg, _ = common.timed(args.device, lambda: run_hf_batched(
            sub, [prompts[i] for i in hf_idx], 1, gmx, 1.0, False, chat, args.hf_batch))
        print(f"batched greedy generate: {t_hg:.2f} s on {len(hf_idx)} questions", flush=True)
        row(f"batched greedy generate, {args.hf_batch} q/call", len(hf_idx), t_hg, gmx, t_og, mem_hg)
    same = None
    if gref_idx:
        gref, t_gref, mem_gref, _ = common.timed(args.device, lambda: run_one_at_a_time(
            sub, [prompts[i] for i in gref_idx], 1, gmx, 1.0, False, chat))
        print(f"R-Tuning greedy loop: {t_gref:.2f} s on {len(gref_idx)} questions", flush=True)
        same = sum(greedy[i][0] == g[0] for i, g in zip(gref_idx, gref))
        row("R-Tuning greedy loop", len(gref_idx), t_gref, gmx, t_og, mem_gref,
            agreement=f"{same}/{len(gref_idx)} identical greedy answers")

    fp32 = None
    if args.fp32_check and cuda:  # bf16 greedy paths can part at near-ties; fp32 shows whether that is all it is
        sub.model.float()
        idx = gref_idx[:args.fp32_check]
        o32, _ = run_kb(sub, encode(sub.tokenizer, [prompts[i] for i in idx], chat), 1, gmx, 1.0, False, args)
        r32 = run_one_at_a_time(sub, [prompts[i] for i in idx], 1, gmx, 1.0, False, chat)
        fp32 = f"{sum(a[0] == b[0] for a, b in zip(o32, r32))}/{len(idx)}"
        print(f"fp32 recheck: {fp32} identical greedy answers (kb vs one at a time)", flush=True)

    print()
    print(f"{q} ParaRel {args.split} questions, {sub.name} {sub.dtype}, {common.machine(args.device)}; "
          f"new tokens/s count max_new_tokens per answer (early stops make real counts lower)")
    common.print_table(rows, ["method", "questions", "wall_s", "q_per_s", "new_tok_per_s", "full_set_s", "kb_speedup",
                              "peak_gib", "agreement"])
    print("full_set_s of a reference run on a subset = its seconds per question x all questions (extrapolated); "
          "kb_speedup = full_set_s / kb's time on the same workload")
    if fp32:
        print(f"fp32 recheck (kb greedy vs one at a time): {fp32} identical answers")
    print("example kb samples:", samp[0][:3])
    out.update(greedy_identical=same, greedy_checked=len(gref_idx), fp32_greedy_identical=fp32)
    common.write_json(args.json, out)


if __name__ == "__main__":
    main()
