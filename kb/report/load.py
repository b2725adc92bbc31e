"""The report's inputs: every stage's per-question files of one model, read through the stages' own
validators (kb.records for probe and evaluation records, kb.statefile for state and flow files).

A bad probe or evaluation record stops the report with one line naming file, row and field; a state,
flow or RAIT file that does not load (an interrupted query, a stale meta) is collected in `problems`
and shown as a missing stage, since the rest of the report is still worth reading.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kb import layout, metrics, statefile
from kb.crss import TAU_SIM, crss_report
from kb.data import abstention_datasets
from kb.errors import KbError
from kb.io import read_json
from kb.records import EvalRecord, ProbeRecord, read_eval_records, read_probe_records, record_kind

IDK = "I don't know"
RESERVED = {layout.REPORT_FILES, "example"}  # folders under results/ that are not models


def find_models(training_dir: Path, results_dir: Path) -> list[str]:
    """Model folders present under either tree (a folder with at least one file in it)."""
    names: set[str] = set()
    for root in (training_dir, results_dir):
        if root.is_dir():
            names |= {d.name for d in root.iterdir() if d.is_dir() and d.name not in RESERVED and any(d.rglob("*.*"))}
    return sorted(names)


def pretty(name: str) -> str:
    """MMLU_ID_train_5shot -> 'MMLU ID train (5-shot)'."""
    m = re.match(r"(.*)_(\d+)shot$", name)
    base, shots = (m.group(1), f" ({m.group(2)}-shot)") if m else (name, "")
    return base.replace("_", " ") + shots


# ------------------------------------------------------------------------------------------ probes
@dataclass
class ProbeSet:
    """One probe file of one model: its records and what kind of questions they are."""

    name: str  # e.g. MMLU_ID_train_5shot
    records: list[ProbeRecord]
    mcq: bool

    @property
    def accuracy(self) -> float:
        return sum(bool(r["correct"]) for r in self.records) / len(self.records)

    def by_group(self) -> list[tuple[str, int, float]]:
        """(group, n, accuracy) sorted by accuracy then name: the knowledge boundary, best known first."""
        groups: dict[str, list[bool]] = defaultdict(list)
        for r in self.records:
            groups[str(r.get("group") or "all")].append(bool(r["correct"]))
        rows = [(g, len(v), sum(v) / len(v)) for g, v in groups.items()]
        return sorted(rows, key=lambda t: (-t[2], t[0]))

    def chance(self) -> float | None:
        return metrics.near_chance(self.accuracy, self.records)[0] if self.mcq else None

    def near_chance_note(self) -> str | None:
        return metrics.near_chance(self.accuracy, self.records)[1] if self.mcq else None


def load_probes(model_dir: Path) -> list[ProbeSet]:
    out = []
    for path in layout.probe_files(model_dir):
        recs = read_probe_records(path)
        if recs:
            out.append(ProbeSet(layout.name_of(path, "probe"), recs, record_kind(recs[0]) == "mcq"))
    return out


# --------------------------------------------------------------------------- state, flow, RAIT sets
def load_state(model_dir: Path, problems: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """{state set name: {id: {'cor', 'cer'}}} from query_state.py's files, validated by kb.statefile."""
    out = {}
    for path in layout.state_files(model_dir):
        name = layout.name_of(path, "state")
        if layout.is_rehearsed(name):
            continue  # M~'s state (rehearsal_finetune.py): shown through the flow file, not as a source set
        try:
            sf = statefile.load_state(path)
        except KbError as err:
            problems.append(f"{err}")
            continue
        out[name] = {r["id"]: {"cor": r["cor"], "cer": r["cer"]} for r in sf.records}
    return out


def load_flow(model_dir: Path, problems: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """{flow set name: {id: {'cor0','cer0','cor1','cer1'}}} from rehearsal_finetune.py's flow files."""
    out = {}
    for path in layout.flow_files(model_dir):
        try:
            ff = statefile.load_flow(path)
        except KbError as err:
            problems.append(f"{err}")
            continue
        out[layout.name_of(path, "flow")] = {r["id"]: {k: r[k] for k in ("cor0", "cer0", "cor1", "cer1")} for r in ff.records}
    return out


def load_rait(model_dir: Path, problems: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """{source name: {method: {'van': ids, 'idk': ids, 'tau_sim', 'tau_mu'}}} from the ids build_rait.py
    stores in each RAIT set."""
    out: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for path in layout.rait_files(model_dir):
        data = read_json(path)
        meta = data.get("kb_meta") if isinstance(data, dict) else None
        ids, labels = (meta or {}).get("instance_ids"), (meta or {}).get("instance_labels")
        method = (meta or {}).get("method")
        if not isinstance(ids, list) or not isinstance(labels, list) or len(ids) != len(labels) or not method:
            problems.append(f"{path}: no kb_meta instance_ids / instance_labels / method (rerun build_rait.py)")
            continue
        assert meta is not None
        name = layout.rait_name_of(path, method)
        out[name][method] = {"van": [i for i, x in zip(ids, labels) if x == "van"],
                             "idk": [i for i, x in zip(ids, labels) if x == "idk"],
                             "tau_sim": meta.get("crss_tau_sim"), "tau_mu": (meta.get("params") or {}).get("tau_mu")}
    return dict(out)


def recompute_crss(model_dir: Path, rait: dict[str, dict[str, dict[str, Any]]], problems: list[str],
                   kinds: dict[str, str]) -> dict[str, dict[str, float | None]]:
    """CRSS of every RAIT set, recomputed from M0's question representations and the set's own ids."""
    out: dict[str, dict[str, float | None]] = {}
    for name, methods in rait.items():
        path = layout.state_records(model_dir, name)
        try:
            state = statefile.load_state(path)
            index, reps = statefile.load_reps(state)
            kinds[name] = state.kind
        except KbError as err:
            problems.append(f"CRSS of the {name} sets not recomputed: {err}")
            continue
        out[name] = {m: crss_report(index, reps, sel["van"], sel["idk"], sel.get("tau_sim") or TAU_SIM, ())["crss"]
                     for m, sel in methods.items()}
    return out


# ------------------------------------------------------------------------------------- evaluations
@dataclass
class EvalSet:
    """Evaluation records of one (method, test set) of one model, re-judged verdicts applied."""

    method: str  # the table row (eval_summary.row_name)
    test_set: str
    records: list[EvalRecord]
    path: Path

    def outcomes(self) -> list[str]:
        return [r["outcome"] for r in self.records]

    def outcome_by_id(self) -> dict[str, str]:
        return {r["id"]: r["outcome"] for r in self.records}

    def rates(self) -> dict[str, float]:
        """Pc, Pw, Pr, P_fail in percent (kb.metrics, as evaluate.py computes them)."""
        return metrics.rates(self.outcomes())

    def table(self, broad: bool = False) -> metrics.QuestionTable:
        """The per-question table of kb.metrics (strict or broad refusal rule)."""
        return metrics.QuestionTable.from_records(self.records, broad=broad)

    @property
    def abstention(self) -> bool:
        """A set made to test abstention (SelfAware, FalseQA: registry `abstain_groups`)."""
        return any(self.test_set.startswith(f"{d}_") for d in abstention_datasets()) or \
            any(r.get("should_abstain") for r in self.records)

    @property
    def kind(self) -> str:
        """mcq or open (kb.records.record_kind)."""
        return record_kind(self.records[0])


def answer_correct(rec: EvalRecord) -> bool:
    """Was the answer right, whatever the reply's verdict (`ap_correct`: MCQ's argmax letter, else the outcome)."""
    return bool(rec["ap_correct"])


def load_evals(res_dir: Path) -> list[EvalSet]:
    """Every evaluation records file under <results>/<model>/eval/ (judgement files are read with theirs)."""
    out = []
    for path in layout.eval_record_files(res_dir):
        recs = read_eval_records(path)
        if recs:
            out.append(EvalSet(recs[0]["method"], recs[0]["test_set"], recs, path))
    return out


# ------------------------------------------------------------------------------------- one model
@dataclass
class ModelData:
    """Everything the report reads for one model."""

    name: str
    probes: list[ProbeSet]
    state: dict[str, dict[str, dict[str, float]]]
    flow: dict[str, dict[str, dict[str, float]]]
    rait: dict[str, dict[str, dict[str, Any]]]  # source name -> method -> {'van', 'idk'} ids
    crss: dict[str, dict[str, float | None]]  # source name -> method -> CRSS at the set's tau_sim
    evals: list[EvalSet]
    problems: list[str] = field(default_factory=list)  # files present but unreadable, reported verbatim
    source_kind: dict[str, str] = field(default_factory=dict)  # state/RAIT source name -> mcq | open


def load_model_data(name: str, training_dir: Path, results_dir: Path) -> ModelData:
    td, rd = training_dir / name, results_dir / name
    problems: list[str] = []
    have_td, have_rd = td.is_dir(), rd.is_dir()
    rait = load_rait(td, problems) if have_td else {}
    kinds: dict[str, str] = {}
    crss = recompute_crss(td, rait, problems, kinds)
    return ModelData(name, load_probes(td) if have_td else [], load_state(td, problems) if have_td else {},
                     load_flow(td, problems) if have_td else {}, rait, crss,
                     load_evals(rd) if have_rd else [], problems, kinds)


def crss_for(md: ModelData, method: str, kind: str) -> float | None:
    """CRSS of the RAIT set a method was trained on: the source set of the test set's kind (MCQ / open)
    that has a set of that method name, when exactly one does (else n/a rather than a guess)."""
    hits = [c[method] for name, c in md.crss.items() if method in c and md.source_kind.get(name) == kind]
    return hits[0] if len(hits) == 1 else None
