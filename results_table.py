"""Gather every evaluation summary under results/ into one markdown table per model.

Inputs: results/<model>/eval/<method>/<TEST>_<template>.json (evaluate.py).
Output: results/<model>/table_rtuning.md -- model x method x test set: Pc, Pw, Pr, P_fail, THS, AP,
Pr broad (printed too). THS missing at evaluation time is filled in from the initial BASIC row.
With --abstention: results/<model>/table_abstention.md instead -- refusal rates on questions that
should be refused (SelfAware unanswerable, FalseQA false premise) and answered, abstention
precision / recall / F1, AUROC, AURC and ECE per model x method x test set.

    python results_table.py --model smollm2-135m
    python results_table.py --model smollm2-135m --abstention
"""

from __future__ import annotations

import argparse

from kb.config import parse_with_config
from kb.errors import cli_main
from kb.eval_table import build_abstention_table, build_table
from kb.layout import results_dir, table_path, wrote


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=None, help="model label(s) under results/ (default: all)")
    p.add_argument("--results-dir", default="results", help="where evaluate.py wrote its summaries")
    p.add_argument("--test-set", action="append", default=None,
                   help="only these test sets in table_rtuning.md, e.g. ParaRel_ID_test (repeatable; default: all)")
    p.add_argument("--abstention", action="store_true",
                   help="the abstention table (table_abstention.md) instead of table_rtuning.md")
    return p


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = parse_with_config(build_parser(), argv)
    if args.abstention:
        for model, text in build_abstention_table(args.results_dir, args.model).items():
            print(text)
            wrote(table_path(results_dir(args.results_dir, model), abstention=True))
            print()
        return
    for model, text in build_table(args.results_dir, args.model, test_sets=args.test_set).items():
        print(text)
        wrote(table_path(results_dir(args.results_dir, model)))
        print()


if __name__ == "__main__":
    main()
