"""LMFlow in one place: its dataset format (written and validated here), and a recipe's run as flags
for LMFlow's own trainer (scripts/lmflow_finetune.sh), so both trainers get the same numbers.

text_only: {"type": "text_only", "instances": [{"text": ...}]}          loss on every token
text2text: {"type": "text2text", "instances": [{"input": ..., "output": ...}]}  loss on the output only
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from kb.checkpoint import BASE_FILE, make_portable
from kb.errors import KbError, data_error
from kb.io import read_json, write_json
from kb.models import default_device, resolve_model
from kb.paths import repo_path
from kb.recipe import KEYS, LORA_KEYS, Recipe
from kb.tuned import META_FILE, base_model_ref, loss_curve, plot_loss, write_recipe_yaml

FIELDS = {"text_only": ("text",), "text2text": ("input", "output")}


def make_dataset(kind: str, instances: list[dict[str, str]], meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """An LMFlow dataset dict. Extra keys (our `kb_meta`) are ignored by LMFlow's loader."""
    data: dict[str, Any] = {"type": kind, "instances": instances}
    validate(data, "<in memory>")
    if meta is not None:
        data["kb_meta"] = meta
    return data


def validate(data: Any, path: str | os.PathLike[str], expect: str | None = None) -> str:
    """Check LMFlow's rules; returns the type. Errors name the file, the instance and the field."""
    if not isinstance(data, dict):
        raise data_error(path, "an LMFlow dataset must be a JSON object with 'type' and 'instances'")
    kind = data.get("type")
    if kind not in FIELDS:
        raise data_error(path, f"unknown LMFlow type {kind!r}; expected one of {', '.join(FIELDS)}", field="type")
    if expect is not None and kind != expect:
        raise data_error(path, f"LMFlow type is {kind!r} but {expect!r} is required", field="type")
    inst = data.get("instances")
    if not isinstance(inst, list):
        raise data_error(path, "'instances' must be a list", field="instances")
    if not inst:
        raise data_error(path, "no instances (empty dataset)", field="instances")
    need = FIELDS[kind]
    for i, row in enumerate(inst):
        if not isinstance(row, dict):
            raise data_error(path, "instance must be an object", row=f"instance {i}")
        for key in need:
            if key not in row:
                raise data_error(path, f"missing field for type {kind}", row=f"instance {i}", field=key)
            if not isinstance(row[key], str):
                raise data_error(path, f"must be a string, got {type(row[key]).__name__}", row=f"instance {i}", field=key)
        extra = set(row) - set(need)
        if extra:
            raise data_error(path, f"unexpected field(s) {sorted(extra)} for type {kind}", row=f"instance {i}")
        if kind == "text2text" and not row["output"]:
            raise data_error(path, "empty output (nothing to learn)", row=f"instance {i}", field="output")
    return kind


def read_dataset(path: str | os.PathLike[str], expect: str | None = None) -> dict[str, Any]:
    data = read_json(path)
    validate(data, path, expect)
    return data


def write_dataset(path: Path, data: dict[str, Any]) -> Path:
    validate(data, path)
    return write_json(path, data)


def to_text_only(instances: list[dict[str, str]]) -> list[dict[str, str]]:
    """R-Tuning's original layout: prompt and answer in one text, loss on everything."""
    return [{"text": r["input"] + r["output"]} for r in instances]


def check_fields(kind: str) -> None:
    if kind not in FIELDS:
        raise KbError(f"unknown LMFlow type {kind!r}")


# ---------------------------------------------------------------- a recipe as LMFlow's flags


# How each recipe key reaches LMFlow's examples/finetune.py (LMFlow 1.1 on transformers 4.x: its
# ModelArguments, DatasetArguments and FinetunerArguments, a TrainingArguments subclass). Every key of
# kb.recipe.Recipe and LoraRecipe is here; a value LMFlow cannot express is an error in lmflow_args(),
# never a silent drop (tests/test_lmflow_launcher.py checks the table against the recipe and LMFlow's parser).
LMFLOW_MAPPING: dict[str, str] = {
    "tuning": "--use_lora 0|1",
    "num_train_epochs": "--num_train_epochs",
    "max_steps": "--max_steps",
    "learning_rate": "--learning_rate",
    "lr_scheduler_type": "--lr_scheduler_type",
    "warmup_steps": "--warmup_steps (int) or --warmup_ratio (float in (0, 1)); the other one 0",
    "weight_decay": "--weight_decay",
    "per_device_train_batch_size": "--per_device_train_batch_size",
    "gradient_accumulation_steps": "--gradient_accumulation_steps",
    "max_grad_norm": "--max_grad_norm",
    "optim": "--optim",
    "adam_beta1": "--adam_beta1",
    "adam_beta2": "--adam_beta2",
    "adam_epsilon": "--adam_epsilon",
    "max_length": "--block_size with --disable_group_texts 1 --truncation_side right (one sample per row, cut at the end)",
    "max_train_samples": "--max_train_samples N; null: no flag (LMFlow's default, every instance)",
    "seed": "--seed",
    "precision": "--bf16 0|1 --fp16 0|1 (weights loaded as --torch_dtype float32, as finetune.py does)",
    "gradient_checkpointing": "--gradient_checkpointing 0|1",
    "logging_steps": "--logging_steps",
    "save_steps": "--save_steps",
    "save_total_limit": "--save_total_limit",
    "keep_checkpoints": "the launcher: `finetune.py --lmflow finish` deletes <output_dir>/checkpoint-* when false",
    "train_sampling_strategy": "--group_by_length 0 (random) | 1 (group_by_length); sequential: error",
    "lora": "null: --use_lora 0; else the lora.* flags",
    "lora.r": "--lora_r",
    "lora.alpha": "--lora_alpha",
    "lora.dropout": "--lora_dropout",
    "lora.target_modules": "--lora_target_modules a,b,c (one comma-separated value); 'all-linear': error",
    "lora.layers": "null only (error otherwise: LMFlow has no per-layer LoRA)",
    "lora.bias": "none only (error otherwise: LMFlow's LoRA has no bias option)",
}


def unmapped_keys() -> list[str]:
    """Recipe keys with no entry in LMFLOW_MAPPING (a key added to the recipe needs one before LMFlow runs it)."""
    return sorted((set(KEYS) | {f"lora.{k}" for k in LORA_KEYS}) - set(LMFLOW_MAPPING))


def lmflow_args(recipe: Recipe, model_path: str, dataset_dir: str, output_dir: str, device: str) -> list[str]:
    """The same run as flags for LMFlow's examples/finetune.py; every hyperparameter explicit (LMFlow's
    own launcher would otherwise train 0.01 epochs). Raises KbError for a value LMFlow cannot express."""
    if unmapped_keys():
        raise KbError(f"no LMFlow flag for recipe key(s) {', '.join(unmapped_keys())}")
    if recipe.train_sampling_strategy == "sequential":
        raise KbError("LMFlow has no sequential sampler flag; use random or group_by_length for LMFlow")
    precision = recipe.precision_on(device)
    args = [
        "--model_name_or_path", model_path, "--dataset_path", dataset_dir, "--output_dir", output_dir,
        "--overwrite_output_dir", "--do_train", "--torch_dtype", "float32",
        "--num_train_epochs", _num(recipe.num_train_epochs), "--max_steps", str(recipe.max_steps),
        "--learning_rate", _num(recipe.learning_rate), "--lr_scheduler_type", recipe.lr_scheduler_type,
        *_lmflow_warmup(recipe.warmup_steps), "--weight_decay", _num(recipe.weight_decay),
        "--per_device_train_batch_size", str(recipe.per_device_train_batch_size),
        "--gradient_accumulation_steps", str(recipe.gradient_accumulation_steps),
        "--max_grad_norm", _num(recipe.max_grad_norm), "--optim", recipe.optim,
        "--adam_beta1", _num(recipe.adam_beta1), "--adam_beta2", _num(recipe.adam_beta2),
        "--adam_epsilon", _num(recipe.adam_epsilon),
        "--block_size", str(recipe.max_length), "--disable_group_texts", "1", "--truncation_side", "right",
        "--padding_side", "right", "--validation_split_percentage", "0", "--seed", str(recipe.seed),
        "--bf16", "1" if precision == "bf16" else "0", "--fp16", "1" if precision == "fp16" else "0",
        "--gradient_checkpointing", "1" if recipe.gradient_checkpointing else "0",
        "--logging_steps", str(recipe.logging_steps), "--logging_first_step", "1",
        "--save_steps", str(recipe.save_steps), "--save_total_limit", str(recipe.save_total_limit),
        "--report_to", "none", "--dataloader_num_workers", "0",
        # transformers 4.x (LMFlow's) spells the sampler as a switch
        "--group_by_length", "1" if recipe.train_sampling_strategy == "group_by_length" else "0",
    ]
    if recipe.max_train_samples is not None:
        args += ["--max_train_samples", str(recipe.max_train_samples)]
    lora = recipe.lora
    if lora is not None:
        targets = lora.target_modules if isinstance(lora.target_modules, list) else [lora.target_modules]
        if lora.layers is not None:
            raise KbError("LMFlow has no flag for LoRA on a subset of layers (lora.layers); set it to null for LMFlow")
        if lora.bias != "none":
            raise KbError("LMFlow's LoRA has no bias option; set lora.bias to none for LMFlow")
        if targets == ["all-linear"]:
            raise KbError("LMFlow passes lora.target_modules as a list of names, so 'all-linear' is not expressible; "
                          "list the modules")
        args += ["--use_lora", "1", "--lora_r", str(lora.r), "--lora_alpha", _num(lora.alpha),
                 "--lora_dropout", _num(lora.dropout), "--lora_target_modules", ",".join(targets),
                 "--save_aggregated_lora", "0"]
    else:
        args += ["--use_lora", "0"]
    return args


def prepare_lmflow(train_file: str | Path, recipe: Recipe, recipe_name: str, model: str, output_dir: str | Path, *,
                   write: bool = False) -> list[str]:
    """LMFlow's flags for the same run. write=False only validates and prints (--dry-run); write=True
    also copies the file into <output_dir>/lmflow_dataset/ (LMFlow reads a folder) and writes
    kb_base_model.json + config.yaml, so LMFlow's output loads with `--model <output_dir>`."""
    read_dataset(repo_path(train_file))  # a bad file stops here, before LMFlow starts
    source, label, _ = resolve_model(model)
    if not isinstance(source, Path):
        source_str = str(source)  # a hub id: LMFlow downloads it itself
    elif (source / "config.json").is_file():
        source_str = str(source.resolve())
    else:
        raise KbError(f"{model}: LMFlow needs a full model, not an adapter dir")
    out = repo_path(output_dir)
    data_dir = out / "lmflow_dataset"
    args = lmflow_args(recipe, source_str, str(data_dir), str(out), default_device())
    if write:
        data_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(repo_path(train_file), data_dir / repo_path(train_file).name)
        write_json(out / BASE_FILE, {"base_model": base_model_ref(model), "base_label": label, "base_source": source_str,
                                     "tuning": recipe.tuning, "config_name": recipe_name,
                                     "train_file": str(repo_path(train_file)), "trainer": "LMFlow examples/finetune.py"})
        write_recipe_yaml(out / "config.yaml", recipe, f"resolved fine-tuning config ({recipe_name}), trained with LMFlow")
    return args


def finish_lmflow(output_dir: str | Path, recipe: Recipe, recipe_name: str) -> Path:
    """After LMFlow's run: apply keep_checkpoints, make the saved model load under both transformers
    majors (make_portable), and write loss.json / loss.png / kb_finetune.json from LMFlow's
    trainer_state.json, the files a finetune.py run leaves."""
    out = repo_path(output_dir)
    if not (out / BASE_FILE).is_file() or not (out / "trainer_state.json").is_file():
        raise KbError(f"{out}: not a finished LMFlow run of scripts/lmflow_finetune.sh (no {BASE_FILE} / trainer_state.json)")
    if not recipe.keep_checkpoints:
        for ckpt in sorted(out.glob("checkpoint-*")):
            shutil.rmtree(ckpt)
    make_portable(out)
    state = read_json(out / "trainer_state.json")
    curve = loss_curve(state.get("log_history", []))
    info = read_json(out / BASE_FILE)
    write_json(out / "loss.json", {**curve, "config_name": recipe_name, "train_file": info.get("train_file")})
    plot_loss(curve, out / "loss.png", f"{info.get('base_label')} | {recipe_name} | LMFlow\n{Path(info.get('train_file', '')).name}")
    results = read_json(out / "train_results.json") if (out / "train_results.json").is_file() else {}
    write_json(out / META_FILE, {"status": "complete", "trainer": "LMFlow", "config_name": recipe_name,
                                 "steps": int(state.get("global_step", 0)),
                                 "train_wall_s": results.get("train_runtime"), "train_loss": results.get("train_loss"),
                                 "first_loss": curve["loss"][0] if curve["loss"] else None,
                                 "last_loss": curve["loss"][-1] if curve["loss"] else None})
    return out


def _lmflow_warmup(w: float | int) -> list[str]:
    # LMFlow runs on transformers 4.x, where a warm-up ratio has its own flag (v5 folded it into warmup_steps).
    if isinstance(w, float) and 0 < w < 1:
        return ["--warmup_ratio", _num(w), "--warmup_steps", "0"]
    return ["--warmup_steps", str(int(w)), "--warmup_ratio", "0.0"]


def _num(x: float | int) -> str:
    return repr(x) if isinstance(x, float) else str(x)
