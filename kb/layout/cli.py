"""`python -m kb.layout KIND ...`: the names kb.layout gives the stages' files, printed one per line for the
shell launchers (scripts/demo.sh, scripts/pipeline.sh), paths relative to the repo. A launcher asks here
instead of spelling a file name, so its commands read exactly the files the stages write.

    python -m kb.layout rait-set --model smollm2-135m --dataset pararel --split ID_train --method van,craft --text2text
    python -m kb.layout tuned-dir --model smollm2-135m --method craft --source open --seed 0 --seed 1
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kb.errors import KbError
from kb.layout import (
    MODELS,
    RESULTS,
    TRAINING_DATA,
    data_dir,
    eval_paths,
    finetune_log,
    flow_records,
    probe_name,
    rait_set,
    report_paths,
    results_dir,
    rtuning_set,
    runs_dir,
    seeded,
    source_name,
    state_records,
    table_path,
    test_name,
    tuned_dir,
)
from kb.paths import repo_path, shown_path, slug


def _tests(items: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        ds, _, split = item.partition(":")
        out.append((ds, split))
    return out


def _names(args: argparse.Namespace) -> list[str]:
    """What one command-line request names, one entry per line."""
    label = slug(args.model) if getattr(args, "model", None) else ""
    data, res = data_dir(args.output_dir, label), results_dir(args.results_dir, label)
    methods = [m for m in (getattr(args, "method", None) or "").split(",") if m]
    seeds = getattr(args, "seed", None) or [None]
    k = args.kind
    if k == "label":
        return [label]
    if k == "test-name":
        return [test_name(ds, split) for ds, split in _tests(args.test)]
    if k == "source-name":
        return [source_name(args.dataset, args.split, args.shots)]
    if k == "probe-name":
        return [probe_name(args.dataset, args.split, args.shots, args.tag)]
    if k == "rtuning-set":
        name = probe_name(args.dataset, args.split, args.shots, args.tag)
        return [shown_path(rtuning_set(data, m, name, args.text2text)) for m in methods]
    if k == "rait-set":
        name = source_name(args.dataset, args.split, args.shots)
        return [shown_path(rait_set(data, m, name, args.text2text)) for m in methods]
    if k == "state":
        return [shown_path(state_records(data, source_name(args.dataset, args.split, args.shots)))]
    if k == "flow":
        return [shown_path(flow_records(data, source_name(args.dataset, args.split, args.shots)))]
    if k == "eval":
        return [shown_path(p) for ds, split in _tests(args.test)
                for p in eval_paths(res, args.method, test_name(ds, split), args.template)[:2]]
    if k == "runs-dir":
        return [shown_path(runs_dir(label, args.models_dir))]
    if k == "tuned-dir":
        return [shown_path(tuned_dir(label, m, args.source, s, args.models_dir)) for m in methods for s in seeds]
    if k == "seeded":
        return [seeded(m, s) for m in methods for s in seeds]
    if k == "finetune-log":
        return [shown_path(finetune_log(label, seeded(m, s), args.models_dir)) for m in methods for s in seeds]
    if k == "table":
        return [shown_path(table_path(res, args.abstention))]
    if k == "report":
        return [shown_path(p) for p in report_paths(repo_path(args.report_dir or args.results_dir))]
    raise AssertionError(k)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kb.layout", description="Print the names kb's stages give their "
                                "files, one per line (paths relative to the repo).")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=None, help="--model value; its label (kb.paths.slug) names the folders")
    common.add_argument("--output-dir", default=TRAINING_DATA, help="the stages' --output-dir")
    common.add_argument("--results-dir", default=RESULTS, help="the stages' --results-dir")
    common.add_argument("--models-dir", default=MODELS, help="where fine-tuned models go")
    sets = argparse.ArgumentParser(add_help=False)
    sets.add_argument("--dataset", required=True, help="registered dataset (mmlu, pararel, ...)")
    sets.add_argument("--split", required=True, help="its split, e.g. ID_train")
    sets.add_argument("--shots", type=int, default=None, help="probes: the probe's shots (MCQ); state sets: the "
                      "query's (default per kind)")
    sets.add_argument("--tag", default="", help="probes: the non-default prompt a probe file names")
    listing = argparse.ArgumentParser(add_help=False)
    listing.add_argument("--method", required=True, help="a method or a comma list (one line each)")
    listing.add_argument("--seed", action="append", default=None, help="repeatable: one line per seed")
    sub = p.add_subparsers(dest="kind", required=True, metavar="KIND")

    def kind(name: str, help_: str, *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, parents=[common, *parents])

    kind("label", "the model's folder name under training_data/, results/ and models/")
    kind("test-name", "an evaluated set's name, per --test").add_argument("--test", action="append", required=True,
                                                                         help="DATASET:SPLIT (repeatable)")
    kind("source-name", "the <name> of state, flow, RAIT and CRSS files", sets)
    kind("probe-name", "a probe's <name>", sets)
    kind("rtuning-set", "R-Tuning training files, per --method", sets, listing).add_argument(
        "--text2text", action="store_true", help="the text2text file (default: text_only)")
    kind("rait-set", "RAIT training files, per --method", sets, listing).add_argument(
        "--text2text", action="store_true", help="the text2text file (default: text_only)")
    kind("state", "the state records file", sets)
    kind("flow", "the flow records file", sets)
    ev = kind("eval", "an evaluation's records and summary, per --test")
    ev.add_argument("--method", required=True, help="the evaluated method (its results folder)")
    ev.add_argument("--test", action="append", required=True, help="DATASET:SPLIT (repeatable)")
    ev.add_argument("--template", required=True, help="the prompt template's name")
    kind("runs-dir", "models/<label>/")
    kind("tuned-dir", "a launcher's fine-tuned dir, per --method and --seed", listing).add_argument(
        "--source", required=True, help="what the run is named after (a track, a training set's name)")
    kind("seeded", "a method's evaluation name, per --seed", listing)
    kind("finetune-log", "a parallel fine-tune chain's log, per --method and --seed", listing)
    kind("table", "results_table.py's table").add_argument("--abstention", action="store_true")
    kind("report", "report.py's report.md and report.html").add_argument("--report-dir", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print("\n".join(_names(args)))
    except KbError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
