"""Probe a model's knowledge boundary on ParaRel and write R-Tuning training data (Task 2.1).

Per question: the greedy answer (up to 15 new tokens, cut at the first period), whether it contains
the gold answer, and its confidence (geometric mean of the greedy token probabilities).
Writes training_data/<model>/probe_ParaRel_<domain>_<split>.jsonl (+ .meta.json),
training_data/<model>/rtuning_<method>_ParaRel_<domain>_<split>[_text2text].json (LMFlow format)
and results/<model>/probe_ParaRel_<domain>_<split>.json.

    python run_ParaRel.py --model smollm2-135m --domain ID --split train --limit 200
"""

from __future__ import annotations

import argparse

from kb.config import add_common_args, parse_with_config
from kb.defaults import default_shots
from kb.errors import KbError, cli_main
from kb.probe import run_probe
from kb.prompts import budget_for, prompt_for


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--domain", default="ID", choices=["ID", "OOD"])
    p.add_argument("--split", default="train", choices=["train", "test"])
    p.add_argument("--shots", type=int, default=default_shots("pararel", "probe"),
                   help="solved ParaRel training examples before the question (default: its probe shots in kb/registry.yaml)")
    p.add_argument("--method", default="all",
                   help="R-Tuning data to write: unsure, unknown, uncertain, a comma list of them, or all")
    p.add_argument("--max-new-tokens", type=int, default=budget_for("pararel", "probe"),
                   help="greedy answer budget (default: ParaRel's probe budget in kb/registry.yaml)")
    p.add_argument("--template", default=None,
                   help="prompt template (default: ParaRel's `probe` role in kb/registry.yaml: open_short with a "
                        "chat template, else open_rtuning)")
    return p


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = parse_with_config(build_parser(), argv)
    if args.domain == "OOD" and args.split == "train":
        raise KbError("ParaRel OOD has only a test split; use --domain OOD --split test")
    template = args.template or prompt_for("pararel", "probe", chat=args.chat_template != "off")
    run_probe(args, "pararel", f"{args.domain}_{args.split}", template, args.max_new_tokens, tag=args.template or "")


if __name__ == "__main__":
    main()
