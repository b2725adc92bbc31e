"""The free baseline none of the papers reports: the initial model plus a confidence threshold.

M0 refuses whenever its confidence in its own answer (answer_conf of its BASIC evaluation: max letter
probability, or the geometric mean of the reply's token probabilities) is below t. t maximises THS on
--train (M0's BASIC evaluation of training questions) and is then applied to every --test unchanged.
No model runs. Inputs: results/<model>/eval/initial/<SET>_<basic>.jsonl for --train and each --test
(evaluate.py --model M0 --template basic). Outputs: results/<model>/eval/threshold/<TEST>_<basic>.{jsonl,json}
(read by results_table.py and report.py like a tuned model's) and results/<model>/threshold_<TRAIN>.json
(t and the THS-vs-t curve on the training questions).

    python evaluate.py --model smollm2-135m --template basic --test pararel:ID_train --limit 100
    python threshold_baseline.py --model smollm2-135m --train pararel:ID_train \
        --test pararel:ID_test --test pararel:OOD_test
"""

from __future__ import annotations

import argparse

from kb.config import parse_with_config
from kb.errors import cli_main
from kb.paths import slug
from kb.threshold import run_threshold


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the initial model's label under results/ (or its --model value)")
    p.add_argument("--train", required=True, help="DATASET:SPLIT the threshold is chosen on, e.g. pararel:ID_train")
    p.add_argument("--test", action="append", required=True, help="DATASET:SPLIT to apply it to (repeatable)")
    p.add_argument("--results-dir", default="results")
    p.add_argument("--baseline", default=None, help=argparse.SUPPRESS)  # write_summary's optional override
    return p


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = parse_with_config(build_parser(), argv)
    args.model = slug(args.model)
    run_threshold(args)


if __name__ == "__main__":
    main()
