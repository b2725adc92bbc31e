"""Datasets: one typed sample schema for every source, loaders declared in kb/registry.yaml."""

from __future__ import annotations

import ast
import csv
import functools
import io
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kb.errors import KbError, data_error
from kb.io import decode_text, parse_json, read_bytes, read_json, read_text
from kb.paths import repo_path

LETTERS = "ABCDEFGH"
REGISTRY_FILE = Path(__file__).with_name("registry.yaml")


@dataclass(frozen=True)
class Sample:
    """One question. `answer` is the gold letter (mcq) or the gold text (open)."""

    id: str  # stable across runs: dataset/split/group/index
    question: str
    answer: str
    choices: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()  # other accepted answers (open)
    group: str = ""  # MMLU subject, ParaRel relation

    @property
    def is_mcq(self) -> bool:
        return bool(self.choices)

    @property
    def gold_answers(self) -> tuple[str, ...]:
        return (self.answer, *self.aliases)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["choices"], d["aliases"] = list(self.choices), list(self.aliases)
        return d


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    kind: str  # mcq | open
    loader: str
    splits: dict[str, dict[str, Any]]
    shots_from: str | None
    options: dict[str, Any] = field(default_factory=dict)


@functools.cache
def registry() -> dict[str, Any]:
    with open(REGISTRY_FILE, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def dataset_spec(name: str) -> DatasetSpec:
    table = registry()["datasets"]
    key = name.lower()
    if key not in table:
        raise KbError(f"unknown dataset {name!r}; registered: {', '.join(sorted(table))}")
    entry = dict(table[key])
    return DatasetSpec(
        name=key, kind=entry.pop("kind"), loader=entry.pop("loader"), splits=entry.pop("splits"),
        shots_from=entry.pop("shots_from", None), options=entry,
    )


def load_split(dataset: str, split: str, data_root: str | Path | None = None) -> list[Sample]:
    """Load one registered split (from `data_root`, a folder laid out like data/; default the repo's);
    validates every row and rejects empty sets and duplicate ids."""
    spec = dataset_spec(dataset)
    if split not in spec.splits:
        raise KbError(f"dataset {spec.name!r} has no split {split!r}; splits: {', '.join(spec.splits)}")
    loader = _LOADERS[spec.loader]
    samples = loader(spec, split, dict(spec.splits[split]), data_root_path(data_root))
    if not samples:
        raise KbError(f"dataset {spec.name} split {split}: no questions found (empty dataset)")
    seen: set[str] = set()
    for s in samples:
        if s.id in seen:
            raise KbError(f"dataset {spec.name} split {split}: duplicate question id {s.id!r}")
        seen.add(s.id)
    return samples


def data_root_path(data_root: str | Path | None) -> Path | None:
    """--data-root as the loaders take it: a folder laid out like the repo's data/ (relative paths from
    the repo root), or None for the repo's own data/."""
    if not data_root or repo_path(data_root) == repo_path("data"):
        return None
    return repo_path(data_root)


def _resolve(rel: str, data_root: Path | None) -> Path:
    path = repo_path(rel) if data_root is None else data_root / Path(rel).relative_to("data")
    if not path.exists():
        raise KbError(f"{path}: data file not found (is the repo's data/ folder complete?)")
    return path


def mmlu_subjects(root: Path) -> list[str]:
    test = root / "test"
    if not test.is_dir():
        raise KbError(f"{test}: MMLU test folder not found")
    subjects = sorted(p.name[: -len("_test.csv")] for p in test.glob("*_test.csv"))
    if not subjects:
        raise KbError(f"{test}: no *_test.csv files (empty dataset)")
    return subjects


def read_mmlu_csv(path: Path, subject: str, id_prefix: str, first_index: int = 0) -> list[Sample]:
    """Rows: question, A, B, C, D, answer letter; no header. Read as text so 'None' stays 'None'.
    UTF-8 only (a BOM is dropped); line ends as csv reads them (a CR inside a quoted field is kept, as MMLU's
    files have them); a field over csv's 128 KiB limit is malformed."""
    out = []
    try:
        rows = list(csv.reader(io.StringIO(decode_text(path, read_bytes(path)), newline="")))
    except csv.Error as err:
        raise data_error(path, f"malformed CSV ({err})") from None
    for i, row in enumerate(rows):
        if len(row) != 6:
            raise data_error(path, f"expected 6 columns (question, A, B, C, D, answer), got {len(row)}", row=i + 1)
        q, *choices, ans = row
        ans = ans.strip()
        if ans not in LETTERS[:4]:
            raise data_error(path, f"answer {ans!r} is not one of A, B, C, D", row=i + 1, field="answer")
        if not q.strip():
            raise data_error(path, "empty question", row=i + 1, field="question")
        out.append(Sample(f"{id_prefix}/{subject}/{first_index + i}", q, ans, tuple(choices), (), subject))
    return out


def _mmlu_csv(spec: DatasetSpec, split: str, args: dict[str, Any], data_root: Path | None) -> list[Sample]:
    root = _resolve(spec.options.get("root", "data/mmlu"), data_root)
    subjects = mmlu_subjects(root)
    n_id = int(spec.options.get("n_id_subjects", 28))
    chosen = {"ID": subjects[:n_id], "OOD": subjects[n_id:], "all": subjects}[args["subjects"]]
    out: list[Sample] = []
    for subject in chosen:
        path = root / args["csv_split"] / f"{subject}_{args['csv_split']}.csv"
        if not path.exists():
            raise KbError(f"{path}: data file not found")
        rows = read_mmlu_csv(path, subject, f"mmlu/{args['csv_split']}")
        half = len(rows) // 2
        rows = {"first": rows[:half], "second": rows[half:], "all": rows}[args["half"]]
        out.extend(rows)
    return out


def _lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the non-blank lines of a UTF-8 text file."""
    return [(i, line) for i, line in enumerate(read_text(path).split("\n"), start=1) if line.strip()]


def _arc_jsonl(spec: DatasetSpec, split: str, args: dict[str, Any], data_root: Path | None) -> list[Sample]:
    path = _resolve(args["file"], data_root)
    out = []
    for i, line in _lines(path):
        rec = parse_json(path, line, row=i)
        try:
            stem, choices, key = rec["question"]["stem"], rec["question"]["choices"], rec["answerKey"]
            labels = [c["label"] for c in choices]
            texts = tuple(c["text"] for c in choices)
        except (KeyError, TypeError) as err:
            raise data_error(path, f"malformed ARC record (missing or wrong-typed {err})", row=i) from None
        if not all(isinstance(x, str) for x in (stem, key, *labels, *texts)) or not stem.strip():
            raise data_error(path, "question stem, labels, texts and answerKey must be strings, the stem non-empty", row=i)
        if key not in labels:
            raise data_error(path, f"answerKey {key!r} not among labels {labels}", row=i, field="answerKey")
        if len(texts) > len(LETTERS):
            raise data_error(path, f"{len(texts)} choices; at most {len(LETTERS)} supported", row=i)
        # ARC labels are A-E or 1-5; map both to letters by position.
        out.append(Sample(f"arc/{split}/{rec.get('id', i)}", stem, LETTERS[labels.index(key)], texts, (),
                          spec.options.get("subject", "science")))
    return out


def _pararel_json(spec: DatasetSpec, split: str, args: dict[str, Any], data_root: Path | None) -> list[Sample]:
    path = _resolve(args["file"], data_root)
    rows = read_json(path)
    if not isinstance(rows, list):
        raise data_error(path, "expected a JSON list of [question, answer, relation] rows")
    out = []
    for i, row in enumerate(rows):
        if not (isinstance(row, list) and len(row) == 3 and all(isinstance(x, str) for x in row)):
            raise data_error(path, "expected [question, answer, relation] strings", row=i)
        q, a, rel = row
        if not q.strip() or not a.strip():
            raise data_error(path, "empty question or answer", row=i)
        out.append(Sample(f"pararel/{split}/{i}", q, a, (), (), rel))
    return out


def _dpr_tsv(spec: DatasetSpec, split: str, args: dict[str, Any], data_root: Path | None) -> list[Sample]:
    path = _resolve(args["file"], data_root)
    out = []
    # DPR's files are tab-separated with CSV quoting of the answer list.
    try:
        rows = list(csv.reader(io.StringIO(decode_text(path, read_bytes(path)), newline=""), delimiter="\t"))
    except csv.Error as err:
        raise data_error(path, f"malformed TSV ({err})") from None
    for i, parts in enumerate(rows, start=1):
        if not parts:
            continue
        try:
            answers = ast.literal_eval(parts[1])
            assert isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers)
            assert parts[0].strip()
        except (IndexError, ValueError, TypeError, SyntaxError, AssertionError, RecursionError, MemoryError):
            raise data_error(path, "expected 'question<TAB>[answers]'", row=i) from None
        out.append(Sample(f"{spec.name}/{split}/{i - 1}", parts[0], answers[0], (), tuple(answers[1:]), ""))
    return out


def _nq_jsonl(spec: DatasetSpec, split: str, args: dict[str, Any], data_root: Path | None) -> list[Sample]:
    path = _resolve(args["file"], data_root)
    out = []
    for i, line in _lines(path):
        rec = parse_json(path, line, row=i)
        try:
            q, answers = rec["question"], rec["answer"]
            assert isinstance(q, str) and q.strip() and isinstance(answers, list) and answers
            assert all(isinstance(a, str) for a in answers)
        except (KeyError, TypeError, AssertionError):
            raise data_error(path, "expected {question: non-empty string, answer: [strings]}", row=i) from None
        out.append(Sample(f"nq_open/{split}/{i - 1}", q, answers[0], (), tuple(answers[1:]), ""))
    return out


def _selfaware_json(spec: DatasetSpec, split: str, args: dict[str, Any], data_root: Path | None) -> list[Sample]:
    """SelfAware: {"example": [{question_id, question, answer: [..] | null, answerable, source}]}.

    Answerable questions keep their gold answers (the first, the rest as aliases; matched like
    ParaRel's); unanswerable ones have none (answer ""). group: answerable | unanswerable. The split's
    `answerable` (true / false) keeps one kind; absent keeps both."""
    path = _resolve(args["file"], data_root)
    data = read_json(path)
    rows = data.get("example") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise data_error(path, "expected a JSON object with an 'example' list of questions")
    keep = args.get("answerable")
    out = []
    for i, rec in enumerate(rows):
        if not isinstance(rec, dict):
            raise data_error(path, "expected an object {question_id, question, answer, answerable}", row=i)
        for key, kinds in (("question_id", (int, str)), ("question", (str,)), ("answerable", (bool,))):
            if not isinstance(rec.get(key), kinds) or (key != "answerable" and not str(rec[key]).strip()):
                raise data_error(path, f"missing or malformed {key!r}", row=i, field=key)
        answerable, answer = rec["answerable"], rec.get("answer")
        if answerable and not (isinstance(answer, list) and answer
                               and all(isinstance(a, str) and a.strip() for a in answer)):
            raise data_error(path, "an answerable question needs a non-empty list of gold answers", row=i, field="answer")
        if not answerable and answer not in (None, []):
            raise data_error(path, f"an unanswerable question has a gold answer {answer!r}", row=i, field="answer")
        if keep is not None and answerable != keep:
            continue
        golds = tuple(answer) if answerable else ("",)
        q = rec["question"]
        if len(q) > 2 and q[0] == q[-1] == '"' and '""' in q:  # 57 questions still carry CSV quoting
            q = q[1:-1].replace('""', '"')
        out.append(Sample(f"selfaware/{rec['question_id']}", q, golds[0], (), golds[1:],
                          "answerable" if answerable else "unanswerable"))
    return out


def _falseqa_csv(spec: DatasetSpec, split: str, args: dict[str, Any], data_root: Path | None) -> list[Sample]:
    """FalseQA: CSV with header question,answer,label; label 1 = false premise, 0 = valid premise.

    Its answers are explanations (a rebuttal of the premise, or a sentence), not short gold answers,
    so no answer is graded (answer ""): the set measures refusals. group: false_premise | valid_premise."""
    path = _resolve(args["file"], data_root)
    with open(path, encoding="utf-8", newline="") as fh:
        try:
            rows = list(csv.reader(fh))
        except csv.Error as err:
            raise data_error(path, f"malformed CSV ({err})") from None
    if not rows or [c.strip() for c in rows[0]] != ["question", "answer", "label"]:
        raise data_error(path, "expected the header question,answer,label", row=0)
    out = []
    for i, row in enumerate(rows[1:], start=1):
        if len(row) != 3:
            raise data_error(path, f"expected 3 columns (question, answer, label), got {len(row)}", row=i)
        q, _, label = row
        if label.strip() not in ("0", "1"):
            raise data_error(path, f"label {label!r} is not 0 or 1", row=i, field="label")
        if not q.strip():
            raise data_error(path, "empty question", row=i, field="question")
        out.append(Sample(f"falseqa/{split}/{i - 1}", q, "", (), (),
                          "false_premise" if label.strip() == "1" else "valid_premise"))
    return out


def should_abstain(dataset: str, group: str) -> bool:
    """Whether a question of this dataset and group should be refused (registry `abstain_groups`:
    SelfAware's unanswerable and FalseQA's false-premise questions; none for the other sets)."""
    return group in (dataset_spec(dataset).options.get("abstain_groups") or ())


def abstention_datasets() -> list[str]:
    """Display names of the datasets with questions that should be refused (registry `abstain_groups`)."""
    return [display_name(name) for name, entry in registry()["datasets"].items() if entry.get("abstain_groups")]


_LOADERS = {
    "mmlu_csv": _mmlu_csv,
    "arc_jsonl": _arc_jsonl,
    "pararel_json": _pararel_json,
    "dpr_tsv": _dpr_tsv,
    "nq_jsonl": _nq_jsonl,
    "selfaware_json": _selfaware_json,
    "falseqa_csv": _falseqa_csv,
}


def load_mmlu_from_hub(split: str = "test") -> list[Sample]:
    """Same schema from the hub's `cais/mmlu` (for users with hub access and `datasets`)."""
    from datasets import load_dataset

    ds = load_dataset("cais/mmlu", "all", split=split)
    counters: dict[str, int] = {}
    out = []
    for row in ds:
        subj = row["subject"]
        idx = counters.get(subj, 0)
        counters[subj] = idx + 1
        out.append(Sample(f"mmlu/{split}/{subj}/{idx}", row["question"], LETTERS[row["answer"]],
                          tuple(row["choices"]), (), subj))
    return out


def shots_for(dataset: str, k: int, group: str | None = None, data_root: str | Path | None = None) -> list[Sample]:
    """k solved examples from the dataset's shot split, same group (subject) where the split has it."""
    if k == 0:
        return []
    spec = dataset_spec(dataset)
    if spec.shots_from is None:
        raise KbError(f"dataset {spec.name!r} has no split to draw few-shot examples from; use --shots 0")
    pool = _shot_pool(spec.name, spec.shots_from, data_root_path(data_root))
    same = [s for s in pool if group and s.group == group]
    chosen = (same or pool)[:k]
    if len(chosen) < k:
        raise KbError(f"dataset {spec.name}: only {len(chosen)} shots available in {spec.shots_from}, asked {k}")
    return chosen


@functools.cache
def _shot_pool(dataset: str, split: str, data_root: Path | None) -> list[Sample]:
    return load_split(dataset, split, data_root)


def json_rows_to_samples(path: Path, rows: Any, dataset: str, split: str) -> list[Sample]:
    """R-Tuning's MMLU JSON layout (subject -> [[q, A, B, C, D, letter], ...]) as samples."""
    if not isinstance(rows, dict):
        raise data_error(path, "expected an object mapping subject -> rows")
    out = []
    for subject, items in rows.items():
        if not isinstance(items, list):
            raise data_error(path, "expected a list of rows", row=subject)
        for i, r in enumerate(items):
            if not (isinstance(r, list) and len(r) == 6 and isinstance(r[5], str) and r[5] in LETTERS[:4]):
                raise data_error(path, "expected [question, A, B, C, D, letter]", row=f"{subject}[{i}]")
            out.append(Sample(f"{dataset}/{split}/{subject}/{i}", str(r[0]), r[5], tuple(map(str, r[1:5])), (), subject))
    return out


def subset(samples: list[Sample], limit: int | None, seed: int) -> list[Sample]:
    """A seeded random subset of `limit` questions, kept in dataset order (all when limit is None).

    The first `limit` of one seeded shuffle, so a smaller limit picks a subset of a larger one's questions
    (a 100-question evaluation can take its THS baseline from a 200-question run)."""
    if limit is None or limit >= len(samples):
        return samples
    if limit <= 0:
        raise KbError(f"--limit must be positive, got {limit}")
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    keep = set(order[:limit])
    return [s for i, s in enumerate(samples) if i in keep]


def display_name(dataset: str) -> str:
    """The name used in file names: MMLU, ParaRel, ARC, ... (registry `display`, else upper-case)."""
    spec = dataset_spec(dataset)
    return spec.options.get("display", spec.name.upper())
