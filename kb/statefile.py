"""Knowledge-state and knowledge-flow files (CRaFT stage 1): record fields, the formulas, loading and checks.

Fields are defined once here; query_state.py and rehearsal_finetune.py write them, build_rait.py reads
them. Loading validates every row (missing field, wrong type, NaN, duplicate id -> one-line KbError
naming file, row and field) and refuses to join a flow file to a state file it was not made from.

This module needs only numpy, so build_rait.py does not pay for importing torch.

Files, per model and source set (`<name>` = e.g. MMLU_ID_train_5shot):
  state_<name>.jsonl (+ .meta.json)  one StateRecord per question (records in computation order)
  state_<name>.reps.npy              question representations [n, hidden] (float16 by default)
  state_<name>.reps.json             {"ids": [...] row order, "layer", "token", "dtype", "shape"}
  flow_<name>.jsonl (+ .meta.json)   one FlowRecord per question: M0 vs rehearsed model M~
"""

from __future__ import annotations

import hashlib
import math
import tokenize
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import numpy as np

from kb.data import display_name
from kb.defaults import default_shots
from kb.errors import KbError, data_error
from kb.io import iter_jsonl, read_json

# ----------------------------------------------------------------------------------------------------
# The formulas (docs/method.md section 4)


def neg_entropy(p: Sequence[float]) -> float:
    """Cer for multiple choice: sum_o p(o) log p(o) over renormalised letter probabilities, in [-log n, 0]."""
    return float(sum(x * math.log(x) for x in p if x > 0.0))


def agreement(p: Sequence[float]) -> float:
    """The card's pairwise-agreement certainty in closed form: E[1(a_j = a_k)] for two draws from p = sum p^2."""
    return float(sum(x * x for x in p))


def pairwise_agreement(answers: Sequence[str]) -> float:
    """The card's sampling formula 1/(N(N-1)) sum_{j != k} 1[a_j = a_k], counted in O(N) from answer counts."""
    n = len(answers)
    if n < 2:
        raise ValueError("pairwise agreement needs at least 2 answers")
    counts = Counter(answers)
    return sum(c * (c - 1) for c in counts.values()) / (n * (n - 1))


def mean_pairwise_cosine(emb: np.ndarray) -> float:
    """Cer for open answers: 1/(N(N-1)) sum_{j != k} cos(E_j, E_k) over N answer embeddings [N, d]."""
    e = np.asarray(emb, dtype=np.float64)
    n = e.shape[0]
    if n < 2:
        raise ValueError("mean pairwise cosine needs at least 2 embeddings")
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    e = e / np.maximum(norms, 1e-12)  # an all-zero embedding has cosine 0 with everything
    g = e @ e.T
    return float((g.sum() - np.trace(g)) / (n * (n - 1)))


# ----------------------------------------------------------------------------------------------------
# Record fields


class StateRecord(TypedDict):
    """One question's knowledge state under one model. `cer` is the certainty every later stage uses."""

    id: str
    kind: str  # mcq | open
    group: str  # MMLU subject, ParaRel relation
    question: str
    gold: str  # gold letter (mcq) or gold text (open)
    cor: float  # mcq: p(gold) renormalised over the letters; open: fraction of correct samples
    cer: float  # mcq: cer_entropy or cer_agree (the meta's `cer_definition`); open: mean pairwise cosine
    choices: NotRequired[list[str]]  # mcq
    letter_probs: NotRequired[list[float]]  # mcq: renormalised over the question's letters
    pred: NotRequired[str]  # mcq: argmax letter
    cer_entropy: NotRequired[float]  # mcq: sum p log p
    cer_agree: NotRequired[float]  # mcq: sum p^2
    aliases: NotRequired[list[str]]  # open: other accepted answers
    samples: NotRequired[list[str]]  # open: N sampled answers, cut at the first period
    samples_correct: NotRequired[list[bool]]  # open: per sample, refusals never correct


class FlowRecord(TypedDict):
    """Knowledge flow of one question: M0 -> rehearsed model M~ (docs/method.md section 6)."""

    id: str
    cor0: float
    cer0: float
    cor1: float
    cer1: float
    d_mu: float  # cor1 - cor0
    d_sigma: float  # cer1 - cer0


_COMMON: dict[str, str] = {"id": "str", "kind": "str", "group": "str", "question": "str", "gold": "str",
                           "cor": "float", "cer": "float"}
_BY_KIND: dict[str, dict[str, str]] = {
    "mcq": {"choices": "list[str]", "letter_probs": "list[float]", "pred": "str", "cer_entropy": "float",
            "cer_agree": "float"},
    "open": {"aliases": "list[str]", "samples": "list[str]", "samples_correct": "list[bool]"},
}
_FLOW: dict[str, str] = {"id": "str", "cor0": "float", "cer0": "float", "cor1": "float", "cer1": "float",
                         "d_mu": "float", "d_sigma": "float"}
STATE_FIELDS = {"common": _COMMON, **_BY_KIND}
FLOW_FIELDS = _FLOW


def _check_value(value: Any, typ: str) -> str | None:
    """None when `value` has type `typ`, else why not. Floats must be finite; bools are not numbers."""
    def is_num(x: Any) -> bool:
        return isinstance(x, int | float) and not isinstance(x, bool)

    if typ == "str":
        return None if isinstance(value, str) else f"must be a string, got {type(value).__name__}"
    if typ == "float":
        if not is_num(value):
            return f"must be a number, got {type(value).__name__}"
        return None if math.isfinite(value) else f"must be finite, got {value}"
    if typ.startswith("list["):
        if not isinstance(value, list):
            return f"must be a list, got {type(value).__name__}"
        inner = typ[5:-1]
        for i, x in enumerate(value):
            bad = _check_value(x, inner) if inner != "bool" else (None if isinstance(x, bool) else "must be true/false")
            if bad:
                return f"item {i} {bad}"
        return None
    raise AssertionError(typ)


def _check_fields(path: Path, row: int, rec: dict[str, Any], fields: dict[str, str]) -> None:
    for name, typ in fields.items():
        if name not in rec:
            raise data_error(path, "missing field", row=row, field=name)
        bad = _check_value(rec[name], typ)
        if bad:
            raise data_error(path, bad, row=row, field=name)


def validate_state_record(path: Path, row: int, rec: dict[str, Any]) -> StateRecord:
    _check_fields(path, row, rec, _COMMON)
    kind = rec["kind"]
    if kind not in _BY_KIND:
        raise data_error(path, f"kind must be one of {sorted(_BY_KIND)}, got {kind!r}", row=row, field="kind")
    _check_fields(path, row, rec, _BY_KIND[kind])
    if not 0.0 <= rec["cor"] <= 1.0:
        raise data_error(path, f"must lie in [0, 1], got {rec['cor']}", row=row, field="cor")
    if kind == "mcq" and len(rec["letter_probs"]) != len(rec["choices"]):
        raise data_error(path, "one probability per choice expected", row=row, field="letter_probs")
    if kind == "open" and len(rec["samples"]) != len(rec["samples_correct"]):
        raise data_error(path, "one flag per sample expected", row=row, field="samples_correct")
    return rec  # type: ignore[return-value]


def validate_flow_record(path: Path, row: int, rec: dict[str, Any]) -> FlowRecord:
    _check_fields(path, row, rec, _FLOW)
    for d, a, b in (("d_mu", "cor1", "cor0"), ("d_sigma", "cer1", "cer0")):
        if abs(rec[d] - (rec[a] - rec[b])) > 1e-9:
            raise data_error(path, f"{d} != {a} - {b}", row=row, field=d)
    return rec  # type: ignore[return-value]


def flow_record(rid: str, before: StateRecord, after: StateRecord) -> FlowRecord:
    return {"id": rid, "cor0": before["cor"], "cer0": before["cer"], "cor1": after["cor"], "cer1": after["cer"],
            "d_mu": after["cor"] - before["cor"], "d_sigma": after["cer"] - before["cer"]}


# ----------------------------------------------------------------------------------------------------
# Files


def source_name(dataset: str, split: str, shots: int | None) -> str:
    """The `<name>` in state_/flow_/rait_/crss_ file names: <Dataset>_<split>_<k>shot."""
    k = default_shots(dataset, "query") if shots is None else shots
    return f"{display_name(dataset)}_{split}_{k}shot"


def meta_path(records_path: Path) -> Path:
    return records_path.with_name(records_path.name.removesuffix(".jsonl") + ".meta.json")


def reps_paths(records_path: Path) -> tuple[Path, Path]:
    stem = records_path.name.removesuffix(".jsonl")
    return records_path.with_name(stem + ".reps.npy"), records_path.with_name(stem + ".reps.json")


def ids_digest(ids: Sequence[str]) -> str:
    """Order-free hash of a set of question ids: what a join between two files must agree on."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]


@dataclass
class StateFile:
    path: Path
    meta: dict[str, Any]
    records: list[StateRecord]  # in the order of the run's question list (meta.questions)

    @property
    def by_id(self) -> dict[str, StateRecord]:
        return {r["id"]: r for r in self.records}

    @property
    def kind(self) -> str:
        return self.records[0]["kind"]

    @property
    def dataset(self) -> str:
        """The queried dataset (its registry entry decides the training prompt built from these records)."""
        try:
            return str(self.meta["run_key"]["settings"]["dataset"])
        except (KeyError, TypeError):
            raise KbError(f"{self.path}: state meta names no dataset; rerun query_state.py") from None

    def fingerprint(self) -> str:
        return str((self.meta.get("model") or {}).get("fingerprint"))


@dataclass
class FlowFile:
    path: Path
    meta: dict[str, Any]
    records: list[FlowRecord]

    @property
    def by_id(self) -> dict[str, FlowRecord]:
        return {r["id"]: r for r in self.records}


def _load_records(path: Path, validate: Any) -> list[Any]:
    out, seen = [], set()
    for row, rec in iter_jsonl(path):
        rec = validate(path, row, rec)  # first: it checks that the id is a string
        if rec["id"] in seen:
            raise data_error(path, f"duplicate id {rec['id']!r}", row=row, field="id")
        seen.add(rec["id"])
        out.append(rec)
    if not out:
        raise data_error(path, "no records (empty file)")
    return out


def _read_meta(path: Path, stage: str) -> dict[str, Any]:
    mp = meta_path(path)
    meta = read_json(mp)
    if not isinstance(meta, dict):
        raise data_error(mp, "a meta file must be a JSON object")
    if meta.get("stage") != stage:
        raise data_error(mp, f"not a {stage} meta file (stage {meta.get('stage')!r})", field="stage")
    for key in ("model", "questions", "state"):
        if key in meta and meta[key] is not None and not isinstance(meta[key], dict):
            raise data_error(mp, "must be an object", field=key)
    return meta


def load_state(path: str | Path) -> StateFile:
    """Read and validate a state file and its meta; records come back in the meta's question order."""
    path = Path(path)
    records = _load_records(path, validate_state_record)
    mp = meta_path(path)
    meta = _read_meta(path, "state")
    kinds = {r["kind"] for r in records}
    if len(kinds) != 1:
        raise data_error(path, f"mixed kinds {sorted(kinds)} in one state file", field="kind")
    order = meta.get("question_ids")
    if not isinstance(order, list) or not all(isinstance(i, str) for i in order):
        raise data_error(mp, "missing the question id list (strings)", field="question_ids")
    have = {r["id"]: r for r in records}
    if set(order) != set(have) or len(order) != len(have):
        missing = [i for i in order if i not in have][:3]
        raise data_error(path, f"records do not cover the run's questions (e.g. missing {missing}); "
                               "the query was interrupted: rerun query_state.py to finish it")
    return StateFile(path, meta, [have[i] for i in order])


def load_flow(path: str | Path) -> FlowFile:
    path = Path(path)
    records = _load_records(path, validate_flow_record)
    meta = _read_meta(path, "flow")
    return FlowFile(path, meta, records)


def state_identity(state: StateFile) -> dict[str, Any]:
    """What a file derived from a state file records about it, so a later join can be checked."""
    return {"file": state.path.name, "model_fingerprint": state.fingerprint(),
            "questions": state.meta.get("questions"), "ids_digest": ids_digest([r["id"] for r in state.records]),
            "run_key": state.meta.get("run_key")}


def check_flow_matches(state: StateFile, flow: FlowFile) -> None:
    """A flow file may only be joined to the state file it was computed from (same model, same questions)."""
    theirs = flow.meta.get("state") or {}
    mine = state_identity(state)
    for key in ("model_fingerprint", "questions", "ids_digest", "run_key"):
        if theirs.get(key) != mine[key]:
            raise KbError(f"{flow.path}: made from another state file than {state.path} ({key}: "
                          f"{str(theirs.get(key))[:80]} vs {str(mine[key])[:80]}); rerun rehearsal_finetune.py on it")
    ids = {r["id"] for r in state.records}
    fids = {r["id"] for r in flow.records}
    if ids != fids:
        extra = sorted(fids - ids)[:2] or sorted(ids - fids)[:2]
        raise KbError(f"{flow.path}: question ids differ from {state.path} (e.g. {extra})")
    by_id = state.by_id
    for row, fr in enumerate(flow.records, start=1):
        s = by_id[fr["id"]]
        if fr["cor0"] != s["cor"] or fr["cer0"] != s["cer"]:
            raise data_error(flow.path, f"cor0/cer0 differ from {state.path.name} for {fr['id']!r}", row=row, field="cor0")
def load_npy(npy: Path) -> np.ndarray:
    """A .npy array (memory-mapped, no pickles), or one line naming the file when it is not one."""
    try:
        return np.load(npy, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError, TypeError, SyntaxError, tokenize.TokenError) as err:  # a mangled header
        raise data_error(npy, f"not a readable .npy array ({type(err).__name__}: {str(err)[:120]})") from None


def load_reps(state: StateFile) -> tuple[dict[str, int], np.ndarray]:
    """The question representations of a state file as (id -> row, float32 array), checked against it."""
    npy, side = reps_paths(state.path)
    info = read_json(side)
    if not isinstance(info, dict):
        raise data_error(side, "must be a JSON object")
    if not npy.is_file():
        raise KbError(f"{npy}: representation file not found (rerun query_state.py)")
    arr = load_npy(npy)
    if not isinstance(arr, np.ndarray) or arr.ndim != 2 or arr.dtype.kind != "f":
        raise data_error(npy, f"expected a 2-d float array, got {getattr(arr, 'shape', '?')} {getattr(arr, 'dtype', '?')}")
    ids = info.get("ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids) or len(ids) != arr.shape[0]:
        raise data_error(side, f"ids list does not match {npy.name} rows ({arr.shape[0]})", field="ids")
    if info.get("model_fingerprint") != state.fingerprint():
        raise data_error(side, f"made by another model than {state.path.name}", field="model_fingerprint")
    index = {i: k for k, i in enumerate(ids)}
    missing = [r["id"] for r in state.records if r["id"] not in index]
    if missing:
        raise data_error(side, f"no representation for {missing[:3]}", field="ids")
    out = np.asarray(arr, dtype=np.float32)
    rows = [index[r["id"]] for r in state.records]
    if not np.isfinite(out[rows]).all():
        raise data_error(npy, "non-finite values in the representations of the state's questions")
    return index, out
