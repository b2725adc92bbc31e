"""Refusal-aware instruction-tuning (RAIT) sets from knowledge state and flow (CRaFT stage 2, docs/method.md section 7).

Methods, all from the same state (and flow) files:
  van           Van-Tuning: N_van + N_idk questions at random, every one with its gold answer
  cor_rait      Cor-RAIT: mu >= tau_mu -> vanilla, mu < tau_mu -> idk; random picks (R-Tuning's supervision)
  corcer_rait   CorCer-RAIT: the same split, ranked by certainty (CRaFT without the flow filter)
  craft_wo_cer  CRaFT w/o Cer: idk only where the rehearsal made the model worse (delta mu < 0); random picks
  craft         CRaFT (Algorithm 1): flow filter and certainty ranking

Algorithm 1: D_van1 = {mu >= tau_mu}; D_idk1 = {mu < tau_mu and delta mu < 0} (`tie_rule` "keep" also
keeps delta mu == 0, as the original MMLU code did); D_van1 sorted by certainty highest first, D_idk1
lowest first; the top N_van and N_idk are kept; idk answers become "I don't know.". Ties in certainty
are broken by a seeded shuffle, so no subject or id order leaks into the choice.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kb.crss import crss_report
from kb.defaults import declared
from kb.errors import KbError
from kb.io import write_json
from kb.layout import crss_summary, data_dir, flow_records, name_of, rait_set, results_dir, source_name, state_records, wrote
from kb.lmflow import make_dataset, to_text_only, write_dataset
from kb.models import load_tokenizer, resolve_model
from kb.paths import repo_path
from kb.prompts import prompt_for, resolve_chat, training_instance, training_prompt
from kb.provenance import git_commit, package_versions
from kb.statefile import (
    FlowRecord,
    StateRecord,
    check_flow_matches,
    load_flow,
    load_reps,
    load_state,
    state_identity,
)

METHODS = ("van", "cor_rait", "corcer_rait", "craft_wo_cer", "craft")
NEEDS_FLOW = frozenset({"craft_wo_cer", "craft"})
IDK_ANSWER = "I don't know."
TIE_RULES = ("drop", "keep")


@dataclass(frozen=True)
class RaitParams:
    n_van: int
    n_idk: int
    tau_mu: float = 0.5
    tie_rule: str = "drop"  # delta mu == 0: drop (strict <, the paper's formula) or keep (original MMLU code)
    seed: int = 0

    def check(self) -> None:
        if self.tie_rule not in TIE_RULES:
            raise KbError(f"--tie-rule must be one of {', '.join(TIE_RULES)}, not {self.tie_rule!r}")
        if self.n_van < 0 or self.n_idk < 0:
            raise KbError(f"--n-van and --n-idk must be >= 0 (got {self.n_van}, {self.n_idk})")
        if not 0.0 <= self.tau_mu <= 1.0:
            raise KbError(f"--tau-mu must lie in [0, 1], got {self.tau_mu}")


@dataclass
class Selection:
    method: str
    van: list[str]  # ids answered with the gold answer
    idk: list[str]  # ids answered "I don't know."
    pools: dict[str, int] = field(default_factory=dict)  # candidate set sizes before the N caps

    def ordered(self, seed: int) -> list[tuple[str, str]]:
        """(id, 'van'|'idk') in a seeded shuffled order, so a trainer that does not shuffle still mixes them."""
        items = [(i, "van") for i in self.van] + [(i, "idk") for i in self.idk]
        random.Random(f"{seed}|{self.method}|order").shuffle(items)
        return items


def _flow_ok(d_mu: float, tie_rule: str) -> bool:
    return d_mu < 0 or (tie_rule == "keep" and d_mu == 0)


def _random_pick(pool: Sequence[StateRecord], n: int, seed: str) -> list[str]:
    ids = [r["id"] for r in pool]
    if n >= len(ids):
        return ids
    return random.Random(seed).sample(ids, n)


def _top_by_certainty(pool: Sequence[StateRecord], n: int, highest_first: bool, seed: str) -> list[str]:
    recs = list(pool)
    random.Random(seed).shuffle(recs)  # ties in certainty fall in a seeded random order (sort is stable)
    recs.sort(key=lambda r: -r["cer"] if highest_first else r["cer"])
    return [r["id"] for r in recs[:n]]


def select(method: str, states: Sequence[StateRecord], flows: dict[str, FlowRecord] | None, p: RaitParams) -> Selection:
    """The vanilla and idk ids of one method's RAIT set."""
    if method not in METHODS:
        raise KbError(f"unknown RAIT method {method!r}; choose from {', '.join(METHODS)}")
    p.check()
    tag = f"{p.seed}|{method}"
    if method == "van":
        picked = _random_pick(states, p.n_van + p.n_idk, f"{tag}|van")
        return Selection(method, picked, [], {"all": len(states)})
    van1 = [r for r in states if r["cor"] >= p.tau_mu]
    unknown = [r for r in states if r["cor"] < p.tau_mu]
    if method in NEEDS_FLOW:
        if flows is None:
            raise KbError(f"method {method} needs a flow file (run rehearsal_finetune.py first)")
        idk1 = [r for r in unknown if _flow_ok(flows[r["id"]]["d_mu"], p.tie_rule)]
    else:
        idk1 = unknown
    pools = {"van1": len(van1), "idk1": len(idk1), "unknown": len(unknown), "dropped_by_flow": len(unknown) - len(idk1)}
    if method in {"cor_rait", "craft_wo_cer"}:
        return Selection(method, _random_pick(van1, p.n_van, f"{tag}|van"), _random_pick(idk1, p.n_idk, f"{tag}|idk"), pools)
    return Selection(method, _top_by_certainty(van1, p.n_van, True, f"{tag}|van"),
                     _top_by_certainty(idk1, p.n_idk, False, f"{tag}|idk"), pools)


def build_instances(sel: Selection, by_id: dict[str, StateRecord], tokenizer: Any, chat: bool,
                    seed: int, dataset: str) -> tuple[list[dict[str, str]], list[tuple[str, str]]]:
    """LMFlow text2text instances: vanilla keeps the gold answer (MCQ: its letter), idk says "I don't know."."""
    order = sel.ordered(seed)
    out = []
    for rid, label in order:
        rec = by_id[rid]
        answer = rec["gold"] if label == "van" else IDK_ANSWER
        out.append(training_instance(training_prompt(rec, tokenizer, chat, dataset), answer))
    return out, order


# ----------------------------------------------------------------------------------------------------
# The build_rait.py stage


def state_and_flow_paths(args: argparse.Namespace, label: str) -> tuple[Path, Path]:
    """--state / --flow, or the files query_state.py and rehearsal_finetune.py wrote for these flags."""
    name = source_name(args.dataset, args.split, args.shots)
    base = data_dir(args.output_dir, label)
    state = repo_path(args.state) if args.state else state_records(base, name)
    flow = repo_path(args.flow) if args.flow else flow_records(base, name)
    return state, flow


def parse_methods(arg: str) -> list[str]:
    names = list(METHODS) if arg == "all" else [m.strip() for m in arg.split(",") if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise KbError(f"--methods: unknown {bad or arg!r}; choose from all or a comma list of {', '.join(METHODS)}")
    return names


def parse_sweep(arg: str) -> list[float]:
    try:
        vals = [float(x) for x in arg.split(",") if x.strip()]
    except ValueError:
        raise KbError(f"--sweep must be a comma list of numbers, got {arg!r}") from None
    if not all(-1.0 <= v <= 1.0 for v in vals):
        raise KbError(f"--sweep thresholds must lie in [-1, 1], got {arg!r}")
    return vals


def run_build(args: argparse.Namespace) -> dict[str, Any]:
    """Validate every input, build all requested sets and their CRSS in memory, then write them."""
    methods = parse_methods(args.methods)
    sweep = parse_sweep(args.sweep)
    if not -1.0 <= args.tau_sim <= 1.0:
        raise KbError(f"--tau-sim is a cosine similarity in [-1, 1], got {args.tau_sim}")
    _, label, _ = resolve_model(args.model)
    state_path, flow_path = state_and_flow_paths(args, label)
    state = load_state(state_path)
    kind = state.kind
    d_van, d_idk = declared(state.dataset, "rait", "n_van"), declared(state.dataset, "rait", "n_idk")  # CRaFT's sizes
    params = RaitParams(n_van=d_van if args.n_van is None else args.n_van, n_idk=d_idk if args.n_idk is None else args.n_idk,
                        tau_mu=args.tau_mu, tie_rule=args.tie_rule, seed=args.seed)
    params.check()
    flow = None
    if NEEDS_FLOW & set(methods):
        if not flow_path.exists():
            raise KbError(f"{flow_path}: flow file not found; run rehearsal_finetune.py first, or build only "
                          "--methods van,cor_rait,corcer_rait")
        flow = load_flow(flow_path)
        check_flow_matches(state, flow)
    index, reps = load_reps(state)
    tok = load_tokenizer(state.meta["model"]["name"], args.trust_remote_code, state.meta["model"].get("revision"))
    chat = resolve_chat(args.chat_template, tok)
    refuse = prompt_for(state.dataset, "refuse")  # the evaluation REFUSE prompt: training_prompt renders the same
    by_id = state.by_id
    flows = flow.by_id if flow else None
    name = name_of(state_path, "state")
    out_dir = state_path.parent
    common_meta = {"stage": "rait", "state": state_identity(state), "flow": None if flow is None else
                   {"file": flow.path.name, "rehearsed_fingerprint": (flow.meta.get("rehearsed_model") or {}).get("fingerprint")},
                   "params": asdict(params), "training_prompt": {"template": refuse, "shots": 0, "chat_template": chat},
                   "certainty": state.meta.get("cer_definition"), "idk_answer": IDK_ANSWER,
                   "packages": package_versions(), "git_commit": git_commit(), "args": vars(args)}
    built: list[tuple[Path, dict[str, Any]]] = []
    report: dict[str, Any] = {"name": name, "model": state.meta["model"]["label"], "kind": kind, "n_source": len(by_id),
                              "tau_sim": args.tau_sim, "params": asdict(params), "methods": {}}
    for method in methods:
        sel = select(method, state.records, flows, params)
        inst, order = build_instances(sel, by_id, tok, chat, params.seed, state.dataset)
        c = crss_report(index, reps, sel.van, sel.idk, args.tau_sim, sweep)
        entry = {"n_van": len(sel.van), "n_idk": len(sel.idk), "n_total": len(order), "pools": sel.pools,
                 "short_of_n_van": max(0, (params.n_van + (params.n_idk if method == "van" else 0)) - len(sel.van)),
                 "short_of_n_idk": 0 if method == "van" else max(0, params.n_idk - len(sel.idk)),
                 "mean_cor_van": _mean([by_id[i]["cor"] for i in sel.van]), "mean_cor_idk": _mean([by_id[i]["cor"] for i in sel.idk]),
                 "mean_cer_van": _mean([by_id[i]["cer"] for i in sel.van]), "mean_cer_idk": _mean([by_id[i]["cer"] for i in sel.idk]),
                 **c}
        if method != "van" and not sel.idk:
            entry["note"] = ("no idk question: " + ("the rehearsal lowered no unknown question's correctness (see "
                             "pools.dropped_by_flow); --tie-rule keep also keeps unchanged ones"
                             if method in NEEDS_FLOW and sel.pools.get("unknown") else "no question below tau_mu"))
        if not inst:
            raise KbError(f"{method}: empty RAIT set from {state_path} (pools {sel.pools}); lower --tau-mu or query more questions")
        meta = {**common_meta, "method": method, "instance_ids": [i for i, _ in order], "instance_labels": [x for _, x in order],
                "crss": c["crss"], "crss_tau_sim": args.tau_sim}
        for fmt_kind, rows in (("text2text", inst), ("text_only", to_text_only(inst))):
            built.append((rait_set(out_dir, method, name, fmt_kind == "text2text"), make_dataset(fmt_kind, rows, meta)))
        report["methods"][method] = entry
    for path, data in built:
        write_dataset(path, data)
    report["training_files"] = [p.name for p, _ in built]
    report["inputs"] = {"state": str(state_path), "flow": None if flow is None else str(flow_path)}
    out = write_json(crss_summary(results_dir(args.results_dir, label), name), report)
    print(format_table(report))
    for method, entry in report["methods"].items():
        if entry.get("note") and method != "van":  # Van-Tuning has no idk set by design
            print(f"  note: {method}: {entry['note']}")
    for path, _ in built:
        wrote(path)
    wrote(out)
    return report


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 6) if xs else None


def format_table(report: dict[str, Any]) -> str:
    """A markdown table of set sizes and CRSS per method (what build_rait.py prints)."""
    tau = report["tau_sim"]
    lines = [f"{report['model']} {report['name']}: RAIT sets from {report['n_source']} questions "
             f"(tau_mu {report['params']['tau_mu']}, tie rule {report['params']['tie_rule']})",
             f"| method | n_van | n_idk | CRSS@{tau:g} | CRSS@0.90 | CRSS@0.99 |", "|---|---|---|---|---|---|"]

    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    for m, e in report["methods"].items():
        sw = e["sweep"]
        lines.append(f"| {m} | {e['n_van']} | {e['n_idk']} | {fmt(e['crss'])} | {fmt(sw.get('0.90'))} | {fmt(sw.get('0.99'))} |")
    return "\n".join(lines)
