"""Evaluation of an initial or tuned model on ID/OOD test sets (Task 2.2.1, docs/method.md sections 3.5, 8).

Per question, in one batch pass over the test set:
  1. the reply: greedy, 0-shot, `max_new_tokens` (kb/registry.yaml's eval budget: MCQ 8, open 16), classified by kb.answers as
     correct / incorrect / refused / fail_parse (strict: contains "i don't know"; broad: the phrase
     list). R-Tuning's own abstention, "<answer>. Are you sure ...? I am unsure." (or just "<answer>.
     I am unsure."), counts as refused; a reply cut off inside that expression is continued (greedy,
     same prompt + reply) until the verdict is out, so `unsure` models are judged on their full
     expression at MCQ's short budget;
  2. R-Tuning's confidence: answer_conf (MCQ: the max renormalised letter probability of one forward
     pass, the answer being that argmax letter; open: the geometric mean of the greedy token
     probabilities) and sure_prob = p(" sure") / (p(" sure") + p(" unsure")) after
     "<prompt><answer>. Are you sure ...? I am". AP = average_precision(answer correct,
     0.5 * answer_conf + 0.5 * sure_prob).
All three readings come from one prefill of each prompt (GreedyDecoder). Every record is flushed
to a JSONL as soon as it is known (resumable), and the summary is computed from the records only
(kb/eval_summary.py), so any figure can be recomputed from them (`--reclassify` re-judges stored replies).
"""

from __future__ import annotations

import argparse
import re
import time
from typing import Any

import numpy as np

from kb import metrics
from kb.answers import classify_reply, cut_at_period, rtuning_answer_part, rtuning_verdict
from kb.checkpoint import read_base_info
from kb.config import default_batch_size
from kb.data import LETTERS, Sample, dataset_spec, load_split, should_abstain, subset
from kb.engine import (
    Batch,
    GreedyDecoder,
    PrefixScorer,
    auto_token_budget,
    continuation_logprobs,
    decode_step_tokens,
    encode,
    generation_stop_ids,
    letter_candidates,
    letter_probs,
    newline_token_ids,
    plan_batches,
    run_batches,
)
from kb.errors import KbError
from kb.eval_summary import INITIAL, parse_tests, reclassify, row_name, template_for, write_summary
from kb.io import read_json, write_jsonl
from kb.layout import eval_paths, judged_path, results_dir, test_name
from kb.models import LoadedModel, load_model, resolve_model
from kb.paths import repo_path, slug
from kb.prompts import (
    PromptFormat,
    base_shots,
    budget_for,
    join_answer,
    letter_rule,
    render,
    resolve_chat,
    rtuning_strings,
    sure_probe_suffix,
)
from kb.provenance import make_meta, recorded_args, start_records
from kb.records import EvalReplyMCQ, EvalReplyOpen, judgement, read_eval_records

# Test sets of the two tracks (docs/method.md section 8, R-Tuning's splits).
DEFAULT_TESTS = ("mmlu:ID_test", "mmlu:OOD_test")


# ---------------------------------------------------------------- which run


def eval_identity(model: str, adapter: str | None, method: str | None) -> tuple[str, str, bool]:
    """(results label, method, tuned?) for --model/--adapter. A tuned dir (ours: kb_base_model.json)
    files its results under the base model's label, so initial and tuned rows sit side by side."""
    info = read_base_info(adapter) if adapter else read_base_info(model)
    if info is not None:
        tuned_dir = repo_path(adapter or model)
        return info["base_label"], method or slug(tuned_dir.name), True
    if adapter:
        return resolve_model(model)[1], method or slug(repo_path(adapter).name), True
    return resolve_model(model)[1], method or INITIAL, False


# ---------------------------------------------------------------- R-Tuning's expression


def _needs_more(reply: str) -> bool:
    """True when a reply stops inside R-Tuning's question, before its "I am (un)sure" verdict."""
    if rtuning_verdict(reply) is not None:
        return False
    low = " ".join(reply.lower().split())
    if "are you sure" in low:
        return True
    question = " ".join(rtuning_strings()["question"].lower().split()) + " i am"
    return any(low.endswith(" " + question[:k]) or low == question[:k] for k in range(3, len(question) + 1))


# ---------------------------------------------------------------- one test set


def evaluate_set(lm: LoadedModel, label: str, method: str, tuned: bool, dataset: str, split: str, template_arg: str,
                 args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate one (test set, prompt) pair; returns the summary (also written next to the records)."""
    spec = dataset_spec(dataset)
    kind = spec.kind
    template = template_for(template_arg, dataset)
    samples = subset(load_split(dataset, split, args.data_root), args.limit, args.seed)
    tok = lm.tokenizer
    chat = resolve_chat(args.chat_template, tok)
    fmt = PromptFormat(template, 0, chat)
    fmt.check()
    max_new = args.max_new_tokens or budget_for(dataset, "eval")
    extra = budget_for(dataset, "eval_extra")
    args.batch_size = default_batch_size(args.batch_size, lm.device)  # before the meta records it
    row = row_name(method, template, dataset)
    rec_path, sum_path, meta_path = eval_paths(results_dir(args.results_dir, label), method, test_name(dataset, split), template)

    prompts = [render(s, fmt, [], tok) for s in samples]
    seqs = encode(tok, prompts, chat)
    run_key = {"dataset": spec.name, "split": split, "prompt": fmt.describe(), "limit": args.limit, "seed": args.seed,
               "max_new_tokens": max_new, "rtuning_extra_tokens": extra, "ap": args.ap,
               "method": method}
    rule = letter_rule(fmt) if kind == "mcq" else None
    meta = make_meta("evaluate", run_key, lm, samples, {"label": label, "row": row, "tuned": tuned, "letter_rule": rule,
                                                        "args": recorded_args(args)})
    start_records(rec_path, meta_path, meta, args.restart)

    budget = args.max_batch_tokens or auto_token_budget(lm.model, generation=True)
    # One group: 0-shot prompts share only the instruction (and chat preamble) before the subject's name,
    # and batches per subject would be tiny on a subset (200 MMLU questions span 57 subjects), each paying
    # every decoding step again; length-sorted batches across subjects pad little.
    batches = plan_batches(seqs, [""] * len(samples), args.batch_size, budget, share_prefix=True, extra_tokens=max_new,
                           overhead_tokens=decode_step_tokens(lm.model))
    scorer = PrefixScorer(lm.model, tok.pad_token_id)
    # Solved examples before the question (base models): the reply is the rest of its line, as in the examples.
    stops = set(generation_stop_ids(lm.model, tok)) | (newline_token_ids(tok) if base_shots(fmt) else set())
    decoder = GreedyDecoder(lm.model, tok.pad_token_id, stops)
    cands = letter_candidates(tok, max(len(s.choices) for s in samples), rule) if rule else []
    sure_ids = [tok.encode(w, add_special_tokens=False) for w in (" sure", " unsure")]
    name = f"{row} {test_name(dataset, split)}"

    def work(b: Batch, _: Any) -> list[dict[str, Any]]:
        idx = list(b.indices)
        recs = _batch_records(lm, decoder, scorer, [samples[i] for i in idx], [prompts[i] for i in idx],
                              [seqs[i] for i in idx], b.prefix_len, cands, sure_ids, max_new, extra, chat, args.ap)
        return [{**r, "method": row, "test_set": test_name(dataset, split), "template": template,
                 "should_abstain": should_abstain(dataset, r["group"])} for r in recs]

    t0 = time.perf_counter()
    by_id = run_batches(rec_path, [s.id for s in samples], seqs, batches, work, desc=f"eval {name}")
    assert by_id is not None  # one process: evaluation is not sharded
    records = [by_id[s.id] for s in samples]

    return write_summary(args, meta, records, rec_path, sum_path, wall_s=time.perf_counter() - t0)


def reclassify_set(args: argparse.Namespace, label: str, method: str, dataset: str, split: str,
                   template: str) -> dict[str, Any]:
    """--reclassify: re-judge one finished run's stored replies into the judgement file beside them (the
    replies file is never rewritten) and rewrite the summary."""
    rec_path, sum_path, meta_path = eval_paths(results_dir(args.results_dir, label), method, test_name(dataset, split), template)
    if not rec_path.is_file() or not meta_path.is_file():
        raise KbError(f"{rec_path}: no records to reclassify (run the evaluation first)")
    meta = read_json(meta_path)
    records = read_eval_records(rec_path)
    if len(records) != (meta.get("questions") or {}).get("n"):
        raise KbError(f"{rec_path}: {len(records)} records for {meta['questions']['n']} questions; finish the run first")
    records = reclassify(records)
    write_jsonl(judged_path(rec_path), [judgement(r) for r in records])
    wall_s = read_json(sum_path).get("wall_s_this_run") if sum_path.is_file() else None  # the run's, not the re-judging's
    return write_summary(args, meta, records, rec_path, sum_path, wall_s=wall_s)


def _batch_records(lm: LoadedModel, decoder: GreedyDecoder, scorer: PrefixScorer, batch: list[Sample],
                   prompts: list[str], seqs: list[list[int]], prefix_len: int, cands: list[list[int]],
                   sure_ids: list[list[int]], max_new: int, extra: int, chat: bool, want_ap: bool) -> list[EvalReplyMCQ | EvalReplyOpen]:
    tok = lm.tokenizer
    mcq = bool(cands)
    new_ids, first, lps, state = decoder.decode(seqs, prefix_len, max_new, keep_prompt=want_ap)
    replies = [tok.decode(t, skip_special_tokens=True) for t in new_ids]
    more = [k for k, r in enumerate(replies) if _needs_more(r)]
    if more:  # finish R-Tuning's expression so its verdict can be read (greedy from prompt + reply so far)
        cont, _, _, _ = decoder.decode([seqs[k] + new_ids[k] for k in more], prefix_len, extra)
        for k, t in zip(more, cont):
            replies[k] = tok.decode(new_ids[k] + t, skip_special_tokens=True)
    probs: list[list[float]] = []
    if mcq:  # the letter distribution is the first decoding step's (same forward pass)
        flat = [t for c in cands for t in c]
        probs = letter_probs(first[:, flat], cands, [len(s.choices) for s in batch])

    out = []
    for k, s in enumerate(batch):
        reply = replies[k]
        golds = s.gold_answers
        asked = {"id": s.id, "group": s.group, "question": s.question, "gold": s.answer}
        judged = {"reply": reply, "continued": k in more, "rtuning_verdict": rtuning_verdict(reply),
                  "outcome": classify_reply(reply, len(s.choices), golds),
                  "outcome_broad": classify_reply(reply, len(s.choices), golds, broad=True)}
        rec: EvalReplyMCQ | EvalReplyOpen
        if mcq:  # fields in the order they are written (kb.records)
            p = probs[k]
            pred = LETTERS[int(np.argmax(p))]
            rec = EvalReplyMCQ(**asked, choices=list(s.choices), **judged, letter_probs=[round(x, 8) for x in p], pred=pred,
                               answer_conf=round(max(p), 8), ap_correct=pred == s.answer)
        else:
            rec = EvalReplyOpen(**asked, aliases=list(s.aliases), **judged, answer=cut_at_period(rtuning_answer_part(reply)),
                                answer_conf=round(float(np.exp(np.mean(lps[k]))), 8) if lps[k] else None,
                                ap_correct=judged["outcome"] == "correct")
        out.append(rec)
    if want_ap:
        _add_sure_probs(lm, decoder, state, scorer, out, prompts, seqs, prefix_len, sure_ids, chat)
    return out


def _add_sure_probs(lm: LoadedModel, decoder: GreedyDecoder, state: Any, scorer: PrefixScorer,
                    recs: list[dict[str, Any]], prompts: list[str], seqs: list[list[int]], prefix_len: int,
                    sure_ids: list[list[int]], chat: bool) -> None:
    """sure_prob after "<prompt><answer>. Are you sure ...? I am" (R-Tuning's probe).

    The probe text is tokenised whole (as the training data was); when that keeps each prompt's
    tokens as its start and ' sure' / ' unsure' are single tokens, only the probe's own tokens run on
    the prompt's cache. Otherwise every row takes a full pass through PrefixScorer."""
    answers = [r["pred"] if "pred" in r else r["answer"] for r in recs]
    texts = [p + join_answer(p, a) + a + "." + sure_probe_suffix() for p, a in zip(prompts, answers)]
    probe = encode(lm.tokenizer, texts, chat)
    if state is not None and all(len(c) == 1 for c in sure_ids) and \
            all(len(q) > len(s) and q[:len(s)] == s for q, s in zip(probe, seqs)):
        lp = decoder.probe(state, [q[len(s):] for q, s in zip(probe, seqs)], [c[0] for c in sure_ids]).numpy()
    else:
        p = prefix_len if prefix_len and all(q[:prefix_len] == s[:prefix_len] for q, s in zip(probe, seqs)) else 0
        lp = continuation_logprobs(scorer, probe, p, sure_ids)
    for r, (a, b) in zip(recs, lp):
        r["sure_prob"] = round(metrics.sure_probability(float(a), float(b)), 8)


# ---------------------------------------------------------------- entry point


def run_eval(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Evaluate one model on every --test x --template pair; the model is loaded once."""
    tests = parse_tests(args.test or list(DEFAULT_TESTS))
    label, method, tuned = eval_identity(args.model, args.adapter, args.method)
    # Default prompts: the initial model gets BASIC (THS's reference) and REFUSE; tuned models REFUSE,
    # the prompt their refusal-aware data was built with.
    names = [t.strip() for item in (args.template or (["refuse"] if tuned else ["basic", "refuse"]))
             for t in item.split(",") if t.strip()]
    pairs = [(ds, split, template_for(t, ds)) for ds, split in tests for t in names]
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise KbError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if getattr(args, "baseline", None) and len(tests) > 1:
        raise KbError("--baseline names one summary, so give exactly one --test with it")
    for ds, split, _ in pairs:  # fail on missing data before the model loads
        subset(load_split(ds, split, args.data_root), args.limit, args.seed)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", method):
        raise KbError(f"--method {method!r}: use letters, digits, '.', '_' or '-' (it names a results folder)")
    if getattr(args, "reclassify", False):
        return [reclassify_set(args, label, method, ds, split, t) for ds, split, t in pairs]
    lm = load_model(args.model, args.device, args.dtype, args.adapter, args.trust_remote_code,
                    revision=args.revision)
    return [evaluate_set(lm, label, method, tuned, ds, split, t, args) for ds, split, t in pairs]
