"""Rehearsal fine-tuning and knowledge flow (CRaFT stage 1, docs/method.md section 6).

A brief SFT of M0 on questions it already knows with high certainty barely changes what it knows; how
each question's correctness moves anyway (delta mu) predicts how RAIT will move it. Questions the
rehearsal makes *worse* are the ones CRaFT may safely train to refuse.

Selection: MCQ p(gold) > 0.99; open Cor >= 0.995 and Cer >= 0.995 with the model's own most frequent
correct answer as the target; up to 1,000 at random with a fixed seed. The perturbed model M~ is then
queried by kb.state with the settings read back from M0's state meta, on the same questions.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kb.answers import normalise
from kb.errors import KbError
from kb.finetune import finetune
from kb.io import write_json, write_jsonl
from kb.layout import (
    data_dir,
    default_tuned_dir,
    flow_records,
    flow_summary,
    meta_path,
    name_of,
    rehearsal_set,
    rehearsed,
    results_dir,
    source_name,
    state_records,
    wrote,
)
from kb.lmflow import make_dataset, write_dataset
from kb.locks import lock_output
from kb.models import load_model, load_tokenizer, resolve_model
from kb.paths import repo_path
from kb.prompts import prompt_for, resolve_chat, training_instance, training_prompt
from kb.provenance import git_commit, package_versions
from kb.recipe import load_recipe, parse_overrides
from kb.state_settings import QuerySettings
from kb.statefile import StateFile, StateRecord, flow_record, ids_digest, load_state, state_identity

MCQ_MIN_COR = 0.99  # strict: p(gold) > 0.99
OPEN_MIN_COR = 0.995  # Cor >= 0.995 and Cer >= 0.995
OPEN_MIN_CER = 0.995
MAX_REHEARSAL = 1000
# CRaFT trains the rehearsal like the track's final RAIT SFT, so the default recipes are those.
RECIPES = {"mcq": "configs/finetune_craft_mcq_lora.yaml", "open": "configs/finetune_craft_open_full.yaml"}


@dataclass(frozen=True)
class RehearsalRule:
    kind: str
    min_cor: float
    min_cer: float | None  # open only
    relaxed: bool  # thresholds below the paper's (a demo on a small model)

    def admits(self, rec: StateRecord) -> bool:
        if self.kind == "mcq":
            return rec["cor"] > self.min_cor
        return rec["cor"] >= self.min_cor and rec["cer"] >= (self.min_cer if self.min_cer is not None else OPEN_MIN_CER)

    def describe(self) -> str:
        if self.kind == "mcq":
            return f"p(gold) > {self.min_cor:g}"
        return f"Cor >= {self.min_cor:g} and Cer >= {self.min_cer:g}"


def rehearsal_rule(kind: str, min_cor: float | None = None, min_cer: float | None = None) -> RehearsalRule:
    """The paper's thresholds, or relaxed ones (recorded as such) when --min-cor / --min-cer are given."""
    if kind == "mcq":
        if min_cer is not None:
            raise KbError("--min-cer applies to open answers only (MCQ rehearsal selects on p(gold))")
        cor = MCQ_MIN_COR if min_cor is None else min_cor
        return RehearsalRule(kind, cor, None, cor < MCQ_MIN_COR)
    cor = OPEN_MIN_COR if min_cor is None else min_cor
    cer = OPEN_MIN_CER if min_cer is None else min_cer
    return RehearsalRule(kind, cor, cer, cor < OPEN_MIN_COR or cer < OPEN_MIN_CER)


def most_frequent_correct(rec: StateRecord) -> str:
    """The model's own most frequent correct answer (by normalised text; ties: the first sampled)."""
    good = [a for a, ok in zip(rec["samples"], rec["samples_correct"]) if ok and a.strip()]
    if not good:
        raise KbError(f"question {rec['id']!r}: no correct sampled answer to rehearse")
    counts = Counter(normalise(a) for a in good)
    best = max(counts.values())
    return next(a for a in good if counts[normalise(a)] == best)


def select_rehearsal(records: list[StateRecord], rule: RehearsalRule, max_n: int, seed: int,
                     source: str = "state file") -> list[tuple[StateRecord, str]]:
    """Up to max_n qualifying questions drawn at random with `seed`, each with its training answer."""
    if max_n < 1:
        raise KbError(f"--n-rehearsal must be at least 1, got {max_n}")
    pool = [r for r in records if rule.admits(r) and (rule.kind == "mcq" or any(r["samples_correct"]))]
    if not pool:
        best = max(r["cor"] for r in records)
        hint = f"best Cor is {best:.3f}" + ("" if rule.kind == "mcq" else
                                            f", best Cer among those {max(r['cer'] for r in records if r['cor'] == best):.3f}")
        raise KbError(f"{source}: no question qualifies for rehearsal ({rule.describe()}; {hint}, {len(records)} questions); "
                      "query more questions, or relax with --min-cor (and --min-cer) for a demo")
    # A seeded random order even when all qualify, so a trainer cap (max_train_samples) takes a random subset.
    picked = random.Random(seed).sample(pool, min(len(pool), max_n))
    return [(r, r["gold"] if r["kind"] == "mcq" else most_frequent_correct(r)) for r in picked]


def locate_state(args: argparse.Namespace, label: str) -> Path:
    if args.state:
        return repo_path(args.state)
    return state_records(data_dir(args.output_dir, label), source_name(args.dataset, args.split, args.shots))


def run_rehearsal(args: argparse.Namespace) -> dict[str, Any]:
    """Select -> write the rehearsal set -> fine-tune M0 -> query M~ -> write the flow. Resumable throughout."""
    from kb.state import run_state_query  # the query engine (torch) loads only when a run starts

    _, label, _ = resolve_model(args.model)
    state_path = locate_state(args, label)
    state = load_state(state_path)
    m0 = state.meta["model"]
    if m0.get("adapter"):
        raise KbError(f"{state_path}: M0 was loaded with an adapter ({m0['adapter']}); rehearsal needs a plain checkpoint")
    kind = state.kind
    rule = rehearsal_rule(kind, args.min_cor, args.min_cer)
    chosen = select_rehearsal(state.records, rule, args.n_rehearsal, args.seed, str(state_path))
    tok = load_tokenizer(m0["name"], args.trust_remote_code, args.revision or m0.get("revision"))
    chat = resolve_chat(args.chat_template, tok)
    recipe_path = args.recipe or RECIPES[kind]
    recipe, recipe_name = load_recipe(recipe_path, parse_overrides(args.recipe_set, "--recipe-set"))  # fails before writing
    name = name_of(state_path, "state")
    out_dir = state_path.parent
    lock_output(flow_records(out_dir, name))  # one rehearsal run per flow file, before anything is written
    selection = {"rule": rule.describe(), "relaxed": rule.relaxed, "paper_rule": rehearsal_rule(kind).describe(),
                 "n_eligible": sum(rule.admits(r) for r in state.records), "n": len(chosen), "max_n": args.n_rehearsal,
                 "seed": args.seed, "ids": [r["id"] for r, _ in chosen], "answers": [a for _, a in chosen],
                 "n_trained": min(len(chosen), recipe.max_train_samples or len(chosen))}
    if rule.relaxed:
        print(f"note: rehearsal rule relaxed to {rule.describe()} (paper: {selection['paper_rule']}); recorded in the outputs")
    inst = [training_instance(training_prompt(r, tok, chat, state.dataset), a) for r, a in chosen]
    train_file = rehearsal_set(out_dir, name)
    write_dataset(train_file, make_dataset("text2text", inst, {
        "stage": "rehearsal", "state": state_identity(state), "selection": selection,
        "training_prompt": {"template": prompt_for(state.dataset, "refuse"), "shots": 0, "chat_template": chat}}))
    print(f"rehearsal set: {len(chosen)} questions ({rule.describe()}) -> {train_file}"
          + (f"; the recipe trains on the first {selection['n_trained']}" if selection["n_trained"] < len(chosen) else ""))

    tuned_dir = repo_path(args.tuned_dir) if args.tuned_dir else default_tuned_dir(label, recipe_name, train_file)
    t0 = time.perf_counter()
    tuned = finetune(train_file, recipe, m0["name"], tuned_dir, recipe_name=recipe_name, resume=not args.restart,
                     trust_remote_code=args.trust_remote_code, revision=args.revision or m0.get("revision"))
    train_s = time.perf_counter() - t0
    wrote(tuned)

    lm1 = load_model(str(tuned), args.device, args.dtype, None, args.trust_remote_code)  # base revision: kb_base_model.json
    if lm1.fingerprint == m0["fingerprint"]:
        raise KbError(f"{tuned}: the rehearsed model has M0's weights; the fine-tune changed nothing")
    settings = QuerySettings.from_meta(state.meta)
    res_dir = results_dir(args.results_dir, label)
    run1 = run_state_query(settings, lm1, out_dir, res_dir, rehearsed(name), restart=args.restart,
                           max_batch_tokens=args.max_batch_tokens, extra_meta={"rehearsal_of": state_identity(state)},
                           data_root=args.data_root)
    assert run1 is not None  # one process: the rehearsed query is not sharded
    after = run1.state
    if after.meta["questions"] != state.meta["questions"]:
        raise KbError(f"{after.path}: queried other questions than {state_path}; rerun with --restart")
    flows = [flow_record(r["id"], r, after.by_id[r["id"]]) for r in state.records]
    flow_path = flow_records(out_dir, name)
    meta = {"stage": "flow", "state": state_identity(state), "model": m0,
            "rehearsed_model": {"dir": str(tuned), "fingerprint": lm1.fingerprint, "recipe": recipe_path,
                                "train_file": train_file.name, "train_wall_s": round(train_s, 1)},
            "rehearsed_state": after.path.name, "rehearsal": {k: v for k, v in selection.items() if k != "answers"},
            "rehearsal_ids_digest": ids_digest(selection["ids"]), "definitions": {"d_mu": "Cor(M~) - Cor(M0)",
                                                                                "d_sigma": "Cer(M~) - Cer(M0)"},
            "packages": package_versions(), "git_commit": git_commit(), "args": vars(args)}
    write_jsonl(flow_path, flows)
    write_json(meta_path(flow_path), meta)
    summary = summarise_flow(state, flows, selection, train_s, run1.wall_s)
    sum_path = write_json(flow_summary(res_dir, name), {**summary, "rehearsal_rule": rule.describe(), "relaxed": rule.relaxed,
                                                        "rehearsed_model": meta["rehearsed_model"], "state": meta["state"]})
    print(summary["line"])
    if summary.get("note"):
        print("  note:", summary["note"])
    wrote(flow_path, meta_path(flow_path))
    wrote(sum_path)
    return summary


def summarise_flow(state: StateFile, flows: list[dict[str, Any]], selection: dict[str, Any], train_s: float,
                   query_s: float, tau_mu: float = 0.5) -> dict[str, Any]:
    d_mu = np.array([f["d_mu"] for f in flows])
    d_sigma = np.array([f["d_sigma"] for f in flows])
    unknown = np.array([f["cor0"] < tau_mu for f in flows])
    out = {"name": name_of(state.path, "state"), "n": len(flows),
           "n_rehearsal": selection["n"], "mean_d_mu": round(float(d_mu.mean()), 6),
           "mean_d_sigma": round(float(d_sigma.mean()), 6),
           "d_mu_sign": {"neg": int((d_mu < 0).sum()), "zero": int((d_mu == 0).sum()), "pos": int((d_mu > 0).sum())},
           "unknown_d_mu_sign": {"neg": int(((d_mu < 0) & unknown).sum()), "zero": int(((d_mu == 0) & unknown).sum()),
                                 "pos": int(((d_mu > 0) & unknown).sum())},
           "train_wall_s": round(train_s, 1), "requery_wall_s": round(query_s, 1)}
    if not d_mu.any() and not d_sigma.any():
        out["note"] = ("the rehearsed model answers exactly as M0 on every question: the fine-tune changed nothing "
                       "(check the training config: learning rate, warm-up, steps)")
    s = out["unknown_d_mu_sign"]
    out["line"] = (f"flow {out['name']}: rehearsal on {selection['n']} questions; mean delta mu {out['mean_d_mu']:+.4f}, "
                   f"mean delta sigma {out['mean_d_sigma']:+.4f}; of {int(unknown.sum())} unknown (Cor < {tau_mu}) "
                   f"questions {s['neg']} fell, {s['zero']} stayed, {s['pos']} rose")
    return out
