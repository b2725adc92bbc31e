"""Gather every evaluation summary under results/ into one markdown table per model.

Inputs: results/<model>/eval/<method>/<TEST>_<template>.json (evaluate.py).
Output: results/<model>/table_rtuning.md -- model x method x test set: Pc, Pw, Pr, P_fail, THS, AP,
Pr broad (printed too). THS missing at evaluation time is filled in from the initial BASIC row.

    python results_table.py --model smollm2-135m
"""

from __future__ import annotations

import argparse

from kb.config import parse_with_config
from kb.errors import cli_main
from kb.eval_table import build_table


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=None, help="model label(s) under results/ (default: all)")
    p.add_argument("--results-dir", default="results", help="where evaluate.py wrote its summaries")
    return p


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = parse_with_config(build_parser(), argv)
    for model, text in build_table(args.results_dir, args.model).items():
        print(text)
        print(f"-> {args.results_dir}/{model}/table_rtuning.md\n")


if __name__ == "__main__":
    main()
