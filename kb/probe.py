"""Knowledge-boundary probing (R-Tuning Task 2.1), shared by run_MMLU.py and run_ParaRel.py.

A question is *known* when the model's greedy answer is correct: for multiple choice the argmax of
the next-token distribution over the letters after the prompt; for open answers a greedy
generation, cut at the first period, that contains the gold answer.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from kb.answers import cut_at_period, open_correct
from kb.config import default_batch_size
from kb.data import LETTERS, Sample, dataset_spec, load_split, shots_for, subset
from kb.distributed import setup as setup_dist
from kb.engine import (
    Batch,
    PrefixScorer,
    TokenStream,
    batch_seed,
    greedy_texts,
    iter_batches,
    letter_candidates,
    letter_probs,
    pass_overhead_tokens,
    question_key,
    run_batches,
    sample_answers,
    token_budget,
)
from kb.errors import KbError
from kb.io import write_json
from kb.layout import data_dir, probe_meta, probe_name, probe_records, probe_summary, results_dir, rtuning_set, wrote
from kb.lmflow import make_dataset, to_text_only, write_dataset
from kb.locks import lock_output, rank_path
from kb.metrics import near_chance
from kb.models import LoadedModel, load_model, model_label
from kb.prompts import PromptFormat, budget_for, letter_rule, render, resolve_chat
from kb.provenance import make_meta, recorded_args, start_records
from kb.records import ProbeMCQRecord, ProbeOpenRecord
from kb.rtuning import METHODS, answer_entropy, build_instances

UNCERTAIN_SAMPLES = 5  # R-Tuning-U: answers sampled per question
UNCERTAIN_TEMPERATURE = 0.7


def methods_from_arg(arg: str) -> list[str]:
    """--method: all, one method, or a comma list (uncertain costs extra sampling on open answers)."""
    if arg == "all":
        return list(METHODS)
    names = [m.strip() for m in arg.split(",") if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise KbError(f"--method: unknown {', '.join(bad) or repr(arg)}; use all or a comma list of {', '.join(METHODS)}")
    return list(dict.fromkeys(names))


def _rng_for(seed: int, sid: str) -> np.random.Generator:
    return np.random.default_rng(int(hashlib.sha256(f"{seed}|{sid}".encode()).hexdigest()[:8], 16))


def run_probe(args: argparse.Namespace, dataset: str, split: str, template: str, max_new_tokens: int | None = None,
              tag: str = "") -> dict[str, Any]:
    """Probe one split; `tag` (e.g. a non-default template name) keeps differently-made files apart.
    `max_new_tokens` (open answers): None for the dataset's registered probe budget."""
    spec = dataset_spec(dataset)
    if max_new_tokens is None:
        max_new_tokens = budget_for(dataset, "probe")
    methods = methods_from_arg(args.method)
    samples = subset(load_split(dataset, split, args.data_root), args.limit, args.seed)
    PromptFormat(template, args.shots).check()  # validate everything cheap before loading a model
    shots = {g: shots_for(dataset, args.shots, g, args.data_root) for g in dict.fromkeys(s.group for s in samples)}
    name = probe_name(dataset, split, args.shots, tag)
    # One writer per record file: a second run stops here, before it spends minutes loading the model.
    lock_output(rank_path(probe_records(data_dir(args.output_dir, model_label(args.model, args.adapter)), name)))
    dist = setup_dist()  # torchrun / accelerate launch: one rank per GPU, see kb/distributed.py
    t_load = time.perf_counter()
    lm = load_model(args.model, dist.device(args.device), args.dtype, args.adapter, args.trust_remote_code,
                    revision=args.revision)
    t_loaded = time.perf_counter()
    tok = lm.tokenizer
    args.batch_size = default_batch_size(args.batch_size, lm.device)
    chat = resolve_chat(args.chat_template, tok)
    fmt = PromptFormat(template, args.shots, chat)
    prompts = {s.id: render(s, fmt, shots[s.group], tok) for s in samples}
    groups = [s.group for s in samples] if spec.kind == "mcq" else [""] * len(samples)
    seqs = TokenStream(tok, [prompts[s.id] for s in samples], chat, groups)  # subject by subject, in the background

    out_dir = data_dir(args.output_dir, lm.label)
    res_dir = results_dir(args.results_dir, lm.label)
    rec_path = probe_records(out_dir, name)
    meta_path = probe_meta(out_dir, name)
    sample_uncertain = "uncertain" in methods
    rule = letter_rule(fmt) if spec.kind == "mcq" else None
    run_key = {"dataset": spec.name, "split": split, "prompt": fmt.describe(), "limit": args.limit, "seed": args.seed,
               "batch_size": args.batch_size, "max_new_tokens": max_new_tokens if spec.kind == "open" else None,
               "uncertain_samples": UNCERTAIN_SAMPLES if sample_uncertain else 0,
               **({"letter_rule": rule} if rule else {})}  # MCQ only: open-answer run keys are unchanged
    meta = make_meta("probe", run_key, lm, samples, {"args": recorded_args(args)})
    start_records(rec_path, meta_path, meta, args.restart)

    budget = token_budget(lm, args.max_batch_tokens, generation=spec.kind == "open")
    copies = UNCERTAIN_SAMPLES if spec.kind == "open" and sample_uncertain else 1
    batches = iter_batches(seqs, groups, args.batch_size, budget, share_prefix=spec.kind == "mcq", copies=copies,
                           extra_tokens=max_new_tokens if spec.kind == "open" else 0,
                           overhead_tokens=pass_overhead_tokens(lm.model) if spec.kind == "mcq" else None)
    scorer = PrefixScorer(lm.model, tok.pad_token_id)
    cands = letter_candidates(tok, max(len(s.choices) for s in samples), rule) if rule else []
    flat = [t for c in cands for t in c]

    def work(b: Batch, scored: Any) -> list[dict[str, Any]]:
        batch = [samples[i] for i in b.indices]
        bseqs = [seqs[i] for i in b.indices]
        if spec.kind == "mcq":
            return _mcq_records(scorer, batch, bseqs, b.prefix_len, cands, args.seed, sample_uncertain, logp=scored[0])
        return _open_records(lm, batch, bseqs, max_new_tokens, batch_seed(args.seed, b), sample_uncertain,
                             run_seed=args.seed)

    def ahead(todo: Iterable[Batch]) -> Iterator[Any]:  # MCQ: batches queued one ahead of the one being written (no GPU idle)
        return scorer.score_many((([seqs[i] for i in b.indices], b.prefix_len) for b in todo), flat)

    by_id = run_batches(rec_path, [s.id for s in samples], seqs, batches, work, desc=f"probe {name}", dist=dist,
                        restart=args.restart, ahead=ahead if spec.kind == "mcq" else None)
    if by_id is None:
        return {}  # not rank 0: rank 0 writes the outputs
    records = [by_id[s.id] for s in samples]
    t_done = time.perf_counter()

    written = []
    for method in methods:
        inst = build_instances(method, records, prompts)
        for kind, rows in (("text2text", inst), ("text_only", to_text_only(inst))):
            path = rtuning_set(out_dir, method, name, kind == "text2text")
            write_dataset(path, make_dataset(kind, rows, {"method": method, "source": rec_path.name, **meta}))
            written.append(str(path))
    summary = summarise(records, spec.kind, name, lm, fmt, written)
    sum_path = write_json(probe_summary(res_dir, name), {**summary, "meta": meta})
    print(summary["line"])
    if summary.get("note"):
        print("  note:", summary["note"])
    # Printed, not recorded: the outputs of a seeded run are byte-identical across runs.
    print(f"  time: loading {t_loaded - t_load:.1f} s, probing {t_done - t_loaded:.1f} s")
    wrote(rec_path, meta_path)
    for path in written:
        wrote(Path(path))
    wrote(sum_path)
    return summary


def _mcq_records(scorer: PrefixScorer, batch: list[Sample], seqs: list[list[int]], prefix_len: int,
                 cands: list[list[int]], seed: int, sample_uncertain: bool, logp: Any = None) -> list[ProbeMCQRecord]:
    flat = [t for c in cands for t in c]
    if logp is None:
        logp, _ = scorer.score(seqs, prefix_len, flat)
    probs = letter_probs(logp, cands, [len(s.choices) for s in batch])
    out = []
    for s, p in zip(batch, probs):
        pred = LETTERS[int(np.argmax(p))]
        rec = ProbeMCQRecord(id=s.id, group=s.group, question=s.question, choices=list(s.choices), gold=s.answer,
                             letter_probs=[round(x, 8) for x in p], pred=pred, correct=pred == s.answer,
                             answer_conf=round(max(p), 8))
        if sample_uncertain:
            q = np.asarray(p) ** (1 / UNCERTAIN_TEMPERATURE)
            draws = _rng_for(seed, s.id).choice(len(p), size=UNCERTAIN_SAMPLES, p=q / q.sum())
            rec["samples"] = [LETTERS[d] for d in draws]
            rec["entropy"] = round(answer_entropy(rec["samples"]), 8)
        out.append(rec)
    return out


def _open_records(lm: LoadedModel, batch: list[Sample], seqs: list[list[int]], max_new_tokens: int, seed: int,
                  sample_uncertain: bool, run_seed: int = 0) -> list[ProbeOpenRecord]:
    texts, logps = greedy_texts(lm.model, lm.tokenizer, seqs, max_new_tokens, want_scores=True)
    samples = None
    if sample_uncertain:  # CPU: seeded by the batch; GPU: keyed by question (kb.engine.sample_answers)
        samples = sample_answers(lm.model, lm.tokenizer, seqs, UNCERTAIN_SAMPLES, max_new_tokens, UNCERTAIN_TEMPERATURE,
                                 seed, stop_at_answer_end=False, keys=[question_key(run_seed, s.id) for s in batch])
    out = []
    for k, s in enumerate(batch):
        raw = texts[k][0]
        ans = cut_at_period(raw)
        lp = logps[k][0] if logps else None
        rec = ProbeOpenRecord(id=s.id, group=s.group, question=s.question, gold=s.answer, aliases=list(s.aliases),
                              generation=raw, answer=ans, correct=open_correct(ans, s.gold_answers),
                              answer_conf=None if lp is None else round(float(np.exp(lp)), 8))
        if samples is not None:
            rec["samples"] = [cut_at_period(t) for t in samples[k]]
            rec["entropy"] = round(answer_entropy(rec["samples"]), 8)
        out.append(rec)
    return out


def summarise(records: list[dict[str, Any]], kind: str, name: str, lm: LoadedModel, fmt: PromptFormat,
              written: list[str]) -> dict[str, Any]:
    n = len(records)
    acc = sum(r["correct"] for r in records) / n
    out: dict[str, Any] = {"name": name, "model": lm.label, "n": n, "accuracy": round(acc, 6),
                           "prompt": fmt.describe(), "training_files": [Path(p).name for p in written]}
    label = f"{lm.label} {name} ({'chat' if fmt.chat else 'raw'} prompt"
    if kind == "mcq":
        label += f", {fmt.shots}-shot)"
        counts = Counter(r["pred"] for r in records)
        share = {k: round(counts.get(k, 0) / n, 4) for k in "ABCD"}
        out["pred_share"] = share
        chance, note = near_chance(acc, records)
        out["chance"] = round(chance, 4)
        top = max(share, key=lambda k: share[k])
        if note:
            out["note"] = f"{note} ({share[top]:.0%} of answers are '{top}')"
        out["line"] = f"{label}: accuracy {acc:.1%} on {n} questions (chance {chance:.0%}; predicted A/B/C/D " + \
            "/".join(f"{share[k]:.0%}" for k in "ABCD") + ")"
    else:
        label += ")"
        empty = sum(1 for r in records if not r["answer"]) / n
        out["empty_answers"] = round(empty, 4)
        out["line"] = f"{label}: accuracy {acc:.1%} on {n} questions ({empty:.0%} empty answers)"
    return out
