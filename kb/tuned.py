"""What a fine-tuning run leaves in its output dir, besides the weights.

Both trainers write these files the same way (kb.finetune: TRL; kb.lmflow: LMFlow's examples/finetune.py),
so `--model <dir>` loads either (kb_base_model.json names the base model) and the report reads either:
  kb_base_model.json   the base model, recipe name, training file (what kb.models.load_model reads)
  kb_finetune.json     provenance, losses, wall time, and the run key a rerun must match to resume
  config.yaml          the resolved recipe
  loss.json, loss.png  the training-loss curve
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kb.gguf import OFFLINE_MODELS
from kb.io import read_json, write_text
from kb.paths import repo_path
from kb.recipe import Recipe

META_FILE = "kb_finetune.json"


def base_model_ref(name: str) -> str:
    """How a tuned dir names its base so load_model can find it from anywhere: aliases and hub ids as
    given, local paths made absolute."""
    if name in OFFLINE_MODELS:
        return name
    path = repo_path(name)
    return str(path.resolve()) if path.exists() else name


def write_recipe_yaml(path: Path, recipe: Recipe, comment: str) -> Path:
    """config.yaml: the resolved recipe, keys in declaration order, loadable as a recipe again."""
    return write_text(path, f"# {comment}\n" + yaml.safe_dump(recipe.to_dict(), sort_keys=False))


def loss_curve(log_history: list[dict[str, Any]]) -> dict[str, list[float]]:
    """The training-loss records of a Trainer log history (one per logging step)."""
    rows = [r for r in log_history if "loss" in r and "step" in r]
    return {"step": [int(r["step"]) for r in rows], "epoch": [float(r.get("epoch", 0.0)) for r in rows],
            "loss": [float(r["loss"]) for r in rows],
            "learning_rate": [float(r.get("learning_rate", 0.0)) for r in rows]}


def plot_loss(curve: dict[str, list[float]], path: Path, title: str) -> Path:
    import matplotlib  # heavy: imported only when a run ends

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.plot(curve["step"], curve["loss"], marker="o", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=8, wrap=True)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def summary_line(out: Path) -> str:
    """One line about a finished finetune.py run, from its kb_finetune.json."""
    meta = read_json(out / META_FILE)
    return (f"fine-tuned {meta['base_label']} ({meta['run_key']['config']['tuning']}, {meta['config_name']}) on "
            f"{meta['run_key']['n_instances']} {meta['run_key']['train_type']} instances: {meta.get('steps')} steps, "
            f"loss {meta.get('first_loss')} -> {meta.get('last_loss')}, {meta.get('train_wall_s')} s -> {out}")
