"""Every file the stages write, named in one place: one small function per kind of artefact.

A model's files sit in folders named by its label (kb.paths.slug of --model: `smollm2-135m`, `Qwen-7B`,
a tuned dir's name):
  training_data/<label>/   per-question records and the data the next stage reads     (data_dir)
  results/<label>/         summaries, evaluation records, tables, loss curves            (results_dir)
  models/<label>/          fine-tuned models and adapters                               (runs_dir)
and the report goes to the results folder itself (report_paths). `<name>` names the question set a file
was made from: probe_name (MMLU_ID_train_5shot, ParaRel_ID_train_open_refuse), source_name (the state,
flow, RAIT and CRSS files: ParaRel_ID_train_3shot), test_name (evaluations: ParaRel_ID_test). Where a
reader needs a name back from a file, the inverse is here too (name_of).

`python -m kb.layout KIND ...` (kb/layout/cli.py) prints the same names for the shell launchers
(scripts/demo.sh, scripts/pipeline.sh), one per line, repo-relative; `--help` lists the kinds.
"""

from __future__ import annotations

import re
from pathlib import Path

from kb.data import dataset_spec, display_name
from kb.defaults import default_shots
from kb.errors import KbError
from kb.paths import lock_path, repo_path, shard_path, shown_path, slug  # noqa: F401 (lock, shard: kb.paths)

TRAINING_DATA, RESULTS, MODELS = "training_data", "results", "models"  # the stages' default roots
REPORT_FILES = "report_files"  # the report's figures: a folder under the results root that is not a model
REHEARSED = "_rehearsed"  # state_<name>_rehearsed.jsonl: the rehearsed model's state
SEED_RE = re.compile(r"^(?P<method>.+)_seed(?P<seed>\d+)$")
# name_of's kinds: the file-name prefix and suffix around <name>
_AFFIXES = {"probe": ("probe_", ".jsonl"), "state": ("state_", ".jsonl"), "flow": ("flow_", ".jsonl")}

Root = str | Path


# ---------------------------------------------------------------- folders


def data_dir(root: Root, label: str) -> Path:
    """training_data/<label>/ (root: a stage's --output-dir)."""
    return repo_path(root) / label


def results_dir(root: Root, label: str) -> Path:
    """results/<label>/ (root: a stage's --results-dir)."""
    return repo_path(root) / label


def runs_dir(label: str, root: Root = MODELS) -> Path:
    """models/<label>/: the fine-tuned models and adapters of one base model."""
    return repo_path(root) / label


def seeded(name: str, seed: int | str | None) -> str:
    """A method (or run) repeated per seed: 'craft', 2 -> 'craft_seed2'; no seed -> the name as it is."""
    return name if seed is None or seed == "" else f"{name}_seed{seed}"


def split_seed(name: str) -> tuple[str, int | None]:
    """seeded's inverse: 'craft_seed2' -> ('craft', 2); a name without a seed suffix -> (name, None)."""
    m = SEED_RE.match(name)
    return (m["method"], int(m["seed"])) if m else (name, None)


def tuned_dir(label: str, method: str, source: str, seed: int | str | None = None, root: Root = MODELS) -> Path:
    """A launcher's fine-tune of one method: models/<label>/<method>_<source>[_seed<S>]."""
    return runs_dir(label, root) / seeded(f"{method}_{source}", seed)


def default_tuned_dir(label: str, recipe_name: str, train_file: Root) -> Path:
    """finetune.py without --output-dir: models/<label>/<recipe>__<training file stem>, one per (base, recipe, data)."""
    return runs_dir(label) / f"{slug(recipe_name)}__{slug(Path(train_file).stem)}"


def finetune_log(label: str, run: str, root: Root = MODELS) -> Path:
    """Where a launcher running fine-tunes in parallel keeps one chain's output: models/<label>/log_<run>.txt."""
    return runs_dir(label, root) / f"log_{run}.txt"


def finetune_results(results: Path, run_dir: Path) -> Path:
    """results/<label>/finetune/<run>/: the copy of a fine-tune's loss curve and provenance."""
    return results / "finetune" / run_dir.name


# ---------------------------------------------------------------- question-set names


def test_name(dataset: str, split: str) -> str:
    """An evaluated set: <Dataset>_<split> (ParaRel_ID_test)."""
    return f"{display_name(dataset)}_{split}"


def source_name(dataset: str, split: str, shots: int | None) -> str:
    """The <name> of the state, flow, RAIT and CRSS files: <Dataset>_<split>_<k>shot (k: the query's shots,
    the registry's `query` shots for the dataset when None)."""
    k = default_shots(dataset, "query") if shots is None else shots
    return f"{test_name(dataset, split)}_{k}shot"


def probe_name(dataset: str, split: str, shots: int | None, tag: str = "") -> str:
    """A probe's <name>: <Dataset>_<split>, _<k>shot for multiple choice, _<tag> for a non-default prompt."""
    mcq = dataset_spec(dataset).kind == "mcq"
    if mcq and shots is None:
        raise KbError(f"a {display_name(dataset)} probe's name needs its number of shots")
    return test_name(dataset, split) + (f"_{shots}shot" if mcq else "") + (f"_{tag}" if tag else "")


# ---------------------------------------------------------------- beside a records file


def stem_of(records: Path) -> str:
    """A records file's name without `.jsonl` (state_X.jsonl -> state_X)."""
    return records.name.removesuffix(".jsonl")


def meta_path(records: Path) -> Path:
    """The provenance beside a records file: X.jsonl -> X.meta.json."""
    return records.with_name(stem_of(records) + ".meta.json")


def reps_paths(records: Path) -> tuple[Path, Path]:
    """A state file's question representations: X.jsonl -> (X.reps.npy, X.reps.json)."""
    return records.with_name(stem_of(records) + ".reps.npy"), records.with_name(stem_of(records) + ".reps.json")


def judged_path(records: Path) -> Path:
    """The judgement file beside evaluation records (evaluate.py --reclassify): X.jsonl -> X.judged.jsonl."""
    return records.with_name(stem_of(records) + ".judged.jsonl")


def is_judged(path: Path) -> bool:
    return path.name.endswith(".judged.jsonl")


# ---------------------------------------------------------------- probing (run_MMLU.py, run_ParaRel.py)


def probe_records(folder: Path, name: str) -> Path:
    return folder / f"probe_{name}.jsonl"


def probe_meta(folder: Path, name: str) -> Path:
    return meta_path(probe_records(folder, name))


def probe_summary(folder: Path, name: str) -> Path:
    """results/<label>/probe_<name>.json."""
    return folder / f"probe_{name}.json"


def rtuning_set(folder: Path, method: str, name: str, text2text: bool) -> Path:
    """R-Tuning training data: rtuning_<method>_<name>[_text2text].json (text_only without the suffix)."""
    return folder / f"rtuning_{method}_{name}{'_text2text' if text2text else ''}.json"


def probe_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("probe_*.jsonl"))


# ---------------------------------------------------------------- CRaFT: state, flow, RAIT sets


def state_records(folder: Path, name: str) -> Path:
    """state_<name>.jsonl (+ meta_path, reps_paths beside it); `name` may be rehearsed(...)."""
    return folder / f"state_{name}.jsonl"


def state_summary(folder: Path, name: str) -> Path:
    return folder / f"state_{name}.json"


def rehearsed(name: str) -> str:
    """The rehearsed model's state of source set `name`: <name>_rehearsed."""
    return name + REHEARSED


def is_rehearsed(name: str) -> bool:
    return name.endswith(REHEARSED)


def rehearsal_set(folder: Path, name: str) -> Path:
    return folder / f"rehearsal_{name}.json"


def flow_records(folder: Path, name: str) -> Path:
    return folder / f"flow_{name}.jsonl"


def flow_summary(folder: Path, name: str) -> Path:
    return folder / f"flow_{name}.json"


def rait_set(folder: Path, method: str, name: str, text2text: bool) -> Path:
    """A RAIT set: rait_<method>_<name>[_text2text].json."""
    return folder / f"rait_{method}_{name}{'_text2text' if text2text else ''}.json"


def crss_summary(folder: Path, name: str) -> Path:
    return folder / f"crss_{name}.json"


def state_files(folder: Path) -> list[Path]:
    """Every state file in a folder, the rehearsed models' included."""
    return sorted(folder.glob("state_*.jsonl"))


def flow_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("flow_*.jsonl"))


def rait_files(folder: Path) -> list[Path]:
    """The text2text RAIT sets of a folder (every method, every source set)."""
    return sorted(folder.glob("rait_*_text2text.json"))


def name_of(path: Path, kind: str) -> str:
    """The <name> a probe, state or flow file was written under: state_X.jsonl -> X (a file of another
    name keeps what is left of it, so a --state path of any name still names its outputs)."""
    prefix, suffix = _AFFIXES[kind]
    return path.name.removeprefix(prefix).removesuffix(suffix)


def rait_name_of(path: Path, method: str) -> str:
    """The source <name> of a text2text RAIT set of `method`."""
    return path.name.removeprefix(f"rait_{method}_").removesuffix("_text2text.json")


# ---------------------------------------------------------------- evaluation


def eval_root(folder: Path) -> Path:
    """results/<label>/eval/: one folder per evaluated method (or row: initial_refuse, craft_seed2)."""
    return folder / "eval"


def eval_paths(folder: Path, method: str, test: str, template: str) -> tuple[Path, Path, Path]:
    """(records .jsonl, summary .json, meta .meta.json) of one evaluation: results/<label>/eval/<method>/
    <test>_<template>.*, test a test_name."""
    stem = eval_root(folder) / method / f"{test}_{template}"
    return stem.with_suffix(".jsonl"), stem.with_suffix(".json"), stem.with_name(stem.name + ".meta.json")


def summary_records(summary_path: Path, summary: dict) -> Path:
    """The records file an evaluation summary was computed from (its `records` field, else its namesake)."""
    return summary_path.with_name(summary.get("records") or summary_path.with_suffix(".jsonl").name)


def eval_summary_files(root: Path) -> list[Path]:
    """Every evaluation summary under a results root (results/*/eval/*/*.json, metas left out)."""
    return [p for p in sorted(root.glob("*/eval/*/*.json")) if not p.name.endswith(".meta.json")]


def eval_record_files(folder: Path) -> list[Path]:
    """Every evaluation records file under results/<label>/eval/ (judgement files left out)."""
    root = eval_root(folder)
    return [p for p in sorted(root.rglob("*.jsonl")) if not is_judged(p)] if root.is_dir() else []


def threshold_summary(folder: Path, train_test: str) -> Path:
    """threshold_baseline.py's choice of t on a training set: results/<label>/threshold_<test name>.json."""
    return folder / f"threshold_{train_test}.json"


# ---------------------------------------------------------------- tables and the report


def table_path(folder: Path, abstention: bool = False) -> Path:
    """results/<label>/table_rtuning.md, or table_abstention.md."""
    return folder / ("table_abstention.md" if abstention else "table_rtuning.md")


def report_paths(report_dir: Path) -> tuple[Path, Path]:
    """(report.md, report.html) in the report's folder (report.py --report-dir, default the results root)."""
    return report_dir / "report.md", report_dir / "report.html"


def figure_path(report_dir: Path, name: str) -> Path:
    return report_dir / REPORT_FILES / f"{name}.png"


# ---------------------------------------------------------------- what a stage says it wrote


def wrote(path: Path, *beside: Path) -> None:
    """The one line a stage prints per output it wrote: `-> <path>` (repo-relative when inside the repo), the
    files written beside it named by what they add to its name (`-> .../state_X.jsonl (+ .meta.json)`)."""
    extra = f" (+ {', '.join(p.name.removeprefix(stem_of(path)) for p in beside)})" if beside else ""
    print(f"-> {shown_path(path)}{extra}")
