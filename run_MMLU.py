"""Probe a model's knowledge boundary on MMLU and write R-Tuning training data (Task 2.1).

Per question: the four letter probabilities after "Answer:", the prediction, whether it is correct.
Writes training_data/<model>/probe_MMLU_<domain>_<split>_<k>shot[_<template>].jsonl (+ .meta.json; the
template is named only when it is not the default harness format),
training_data/<model>/rtuning_<method>_MMLU_<domain>_<split>_<k>shot[_text2text].json (LMFlow format)
and results/<model>/probe_MMLU_<domain>_<split>_<k>shot.json (accuracy summary).

    python run_MMLU.py --model smollm2-135m --domain ID --split train --shots 5 --limit 200
"""

from __future__ import annotations

import argparse

from kb.config import add_common_args, parse_with_config
from kb.defaults import default_shots
from kb.errors import KbError, cli_main
from kb.probe import run_probe
from kb.prompts import prompt_for


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--domain", default="ID", choices=["ID", "OOD"], help="R-Tuning's 28 ID / 29 OOD subjects")
    p.add_argument("--split", default="train", choices=["train", "test"], help="ID: halves of each test CSV")
    p.add_argument("--shots", type=int, default=default_shots("mmlu", "probe"), choices=[0, 5],
                   help="dev-set shots (harness format; default: MMLU's probe shots in kb/registry.yaml)")
    p.add_argument("--method", default="all",
                   help="R-Tuning data to write: unsure, unknown, uncertain, a comma list of them, or all")
    p.add_argument("--template", default=prompt_for("mmlu", "probe"),
                   help="prompt template name from kb/registry.yaml (default: MMLU's `probe` role there)")
    return p


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = parse_with_config(build_parser(), argv)
    if args.domain == "OOD" and args.split == "train":
        raise KbError("MMLU OOD has no train split in R-Tuning's setup; use --domain OOD --split test")
    tag = "" if args.template == prompt_for("mmlu", "probe") else args.template  # files name a non-default prompt
    run_probe(args, "mmlu", f"{args.domain}_{args.split}", args.template, tag=tag)


if __name__ == "__main__":
    main()
