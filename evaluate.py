"""Evaluate an initial or tuned model on ID and OOD test sets (Task 2.2.1): Pc, Pw, Pr, P_fail, THS, AP.

Inputs: --model (alias, hub id, dir or .gguf; a tuned dir from finetune.py works as is) and optionally
--adapter; test sets as DATASET:SPLIT (mmlu:ID_test, mmlu:OOD_test, mmlu:val, arc_challenge:test,
pararel:ID_test, pararel:OOD_test; abstention: selfaware:test, falseqa:test); prompts basic / refuse /
any template in kb/registry.yaml.
Greedy, 0-shot. Each reply is correct / incorrect / refused / fail_parse (strict refusal: contains
"I don't know"; broad: kb/answers.py's phrase list; R-Tuning's "... I am unsure." is a refusal).
THS is taken against the initial model's BASIC run on the same test set (run that first; rows are
filed under the base model's name). AP is R-Tuning's (confidence = 0.5 answer_conf + 0.5 p(sure)).
--reclassify re-judges stored replies without the model (after a change to the answer rules) into a
judgement file beside them, which the summary, tables and report then read.
Every summary also holds kb.metrics.suite (AUROC, ECE, AURC, and the refusal rates and abstention
precision / recall / F1 on questions that should be refused: SelfAware unanswerable, FalseQA false
premise); `results_table.py --abstention` tabulates them.
Outputs, per test set and prompt:
  results/<model>/eval/<method>/<DATASET>_<split>_<template>.jsonl   per-question records (resumable)
  results/<model>/eval/<method>/<DATASET>_<split>_<template>.json    summary (rates, THS, AP, meta)

    python evaluate.py --model smollm2-135m --test mmlu:ID_test --test arc_challenge:test --limit 200
    python evaluate.py --model models/smollm2-135m/<run> --method rtuning_unknown --test mmlu:ID_test --limit 200
    python evaluate.py --model smollm2-135m --test selfaware:test --test falseqa:test --template refuse --limit 40
"""

from __future__ import annotations

import argparse

from kb.config import add_common_args, parse_with_config
from kb.errors import cli_main
from kb.evaluate import DEFAULT_TESTS, run_eval


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--test", action="append", default=None, metavar="DATASET:SPLIT",
                   help=f"test set (repeatable; default {' '.join(DEFAULT_TESTS)})")
    p.add_argument("--template", action="append", default=None,
                   help="basic, refuse or a registered template (repeatable or comma-separated; default: "
                        "basic and refuse for an initial model, refuse for a tuned one)")
    p.add_argument("--method", default=None,
                   help="row name: 'initial' for a base model (default), else the tuned dir's name")
    p.add_argument("--max-new-tokens", type=int, default=None, help="reply budget (default: MCQ 8, open 16)")
    p.add_argument("--baseline", default=None,
                   help="initial BASIC summary JSON for THS (default: results/<model>/eval/initial/...)")
    p.add_argument("--no-ap", dest="ap", action="store_false",
                   help="skip R-Tuning's p(sure) probe (sure_prob, AP stay empty); saves ~15%% of the time")
    p.add_argument("--reclassify", action="store_true",
                   help="no model run: re-judge the stored replies of finished runs with the current kb/answers.py "
                        "rules into a judgement file beside them (<TEST>_<template>.judged.jsonl; the replies file "
                        "is not rewritten) and rewrite their summaries")
    p.set_defaults(results_dir="results")
    return p


@cli_main
def main(argv: list[str] | None = None) -> None:
    run_eval(parse_with_config(build_parser(), argv))


if __name__ == "__main__":
    main()
