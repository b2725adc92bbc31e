"""Fine-tune a model on a refusal-aware training file in LMFlow's format (Task 2.2.1).

Inputs: a training file from training_data/ (text_only: loss on every token; text2text: loss on the
output only) and a recipe from configs/ that pins every hyperparameter (override one with
--set key=value, e.g. --set learning_rate=1e-4 --set lora.r=8). Trains with TRL's SFTTrainer
(LoRA or full) and resumes from the last checkpoint when rerun with the same settings.
Outputs, in --output-dir (default models/<model>/<config>__<training file>): the LoRA adapter or the
full model, kb_base_model.json (so `--model <dir>` loads it everywhere), config.yaml (resolved),
kb_finetune.json (provenance, losses, wall time), loss.json and loss.png; a copy of the loss curve
goes to results/<model>/finetune/<run>/.

    python finetune.py --config configs/finetune_cpu_demo.yaml \
        --train-file training_data/smollm2-135m/rtuning_unknown_MMLU_ID_train_0shot_text2text.json
"""

from __future__ import annotations

import argparse
import shutil

from kb.config import add_common_args
from kb.errors import KbError, cli_main
from kb.finetune import (
    default_output_dir,
    describe_fields,
    finetune,
    finish_lmflow,
    parse_overrides,
    prepare_lmflow,
    resolve_config,
    summary_line,
)
from kb.io import read_json
from kb.models import resolve_model
from kb.paths import repo_path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="config keys:\n" + describe_fields())
    add_common_args(p)
    p.add_argument("--config", required=True, help="fine-tuning recipe (YAML under configs/)")
    p.add_argument("--train-file", required=True, help="LMFlow-format JSON (text_only or text2text)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable; lora.<key> for the LoRA section)")
    p.add_argument("--lmflow", choices=["args", "prepare", "finish"], default=None,
                   help="do not train: print the same run's flags for LMFlow's examples/finetune.py, one per line "
                        "(prepare: also stage the data folder and kb_base_model.json; finish: after LMFlow's run, "
                        "apply keep_checkpoints and write loss.json and kb_finetune.json; used by scripts/lmflow_finetune.sh)")
    # Common flags given a fine-tuning meaning: --limit = max_train_samples, --batch-size = per-device batch.
    p.set_defaults(output_dir=None, batch_size=None, seed=None)
    return p


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.adapter:
        raise KbError("--adapter: fine-tuning starts from a full model; merge the adapter first")
    overrides = parse_overrides(args.set)
    if args.limit is not None:
        overrides["max_train_samples"] = args.limit
    if args.batch_size is not None:
        overrides["per_device_train_batch_size"] = args.batch_size
    _, cfg_name = resolve_config(args.config, overrides, args.seed)  # fail on a bad config before anything loads
    out = repo_path(args.output_dir) if args.output_dir else default_output_dir(
        resolve_model(args.model)[1], cfg_name, args.train_file)
    if args.lmflow == "finish":
        meta = read_json(finish_lmflow(out, args.config, seed=args.seed, overrides=overrides) / "kb_finetune.json")
        print(f"LMFlow run: {meta['steps']} steps, loss {meta['first_loss']} -> {meta['last_loss']}, "
              f"{meta['train_wall_s']} s -> {out}")
        return
    if args.lmflow:
        flags = prepare_lmflow(args.train_file, args.config, args.model, out, seed=args.seed, overrides=overrides,
                               write=args.lmflow == "prepare")
        print("\n".join(flags))
        return
    out = finetune(args.train_file, args.config, args.model, out, seed=args.seed, overrides=overrides,
                   resume=not args.restart, trust_remote_code=args.trust_remote_code, revision=args.revision)
    label = resolve_model(args.model)[1]
    res = repo_path(args.results_dir or "results") / label / "finetune" / out.name
    res.mkdir(parents=True, exist_ok=True)
    for name in ("loss.json", "loss.png", "kb_finetune.json"):
        shutil.copyfile(out / name, res / name)
    print(summary_line(out))


if __name__ == "__main__":
    main()
