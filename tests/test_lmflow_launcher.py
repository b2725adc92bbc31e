"""scripts/lmflow_finetune.sh: LMFlow is not installable here, so test what can be: the script parses,
its --dry-run command carries every hyperparameter of the recipe explicitly (LMFlow's own launcher
would train 0.01 epochs), the training file is validated first, and a dry run writes nothing."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from kb.paths import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "lmflow_finetune.sh"
# Flags LMFlow's examples/finetune.py must receive for the run to be the recipe's, not LMFlow's defaults.
REQUIRED = ("model_name_or_path", "dataset_path", "output_dir", "num_train_epochs", "max_steps", "learning_rate",
            "lr_scheduler_type", "warmup_steps", "warmup_ratio", "weight_decay", "per_device_train_batch_size",
            "gradient_accumulation_steps", "max_grad_norm", "optim", "adam_beta1", "adam_beta2", "adam_epsilon",
            "block_size", "disable_group_texts", "validation_split_percentage", "seed", "gradient_checkpointing",
            "logging_steps", "save_steps", "save_total_limit", "group_by_length", "use_lora")
LORA = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "save_aggregated_lora")


def _flags(argv: list[str]) -> dict[str, list[str]]:
    """--name v1 v2 --flag ... -> {name: [v1, v2], flag: []} for the part after examples/finetune.py."""
    argv = argv[argv.index("examples/finetune.py") + 1:]
    out: dict[str, list[str]] = {}
    key = None
    for tok in argv:
        if tok.startswith("--"):
            key = tok[2:]
            assert key not in out, f"--{key} given twice"
            out[key] = []
        else:
            assert key is not None
            out[key].append(tok)
    return out


def _dry_run(config: str, train: Path, out: Path, model: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", "--config", config, "--train-file", str(train),
                           "--model", model, "--output-dir", str(out), *extra],
                          capture_output=True, text=True, timeout=120, cwd="/")


@pytest.fixture()
def train_file(tmp_path: Path) -> Path:
    path = tmp_path / "rtuning_unsure_toy.json"
    path.write_text(json.dumps({"type": "text_only", "instances": [{"text": "Q: 1+1? A: 2. I am sure."}]}))
    return path


def test_bash_syntax_and_strict_mode() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    assert "set -euo pipefail" in SCRIPT.read_text()


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO_ROOT / "configs").glob("finetune_*.yaml")))
def test_dry_run_passes_every_hyperparameter(config: str, train_file: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = yaml.safe_load((REPO_ROOT / "configs" / config).read_text())
    if cfg["lora"] and cfg["lora"]["layers"] is not None:
        # LMFlow cannot restrict LoRA to some layers: the launcher must say so rather than train differently.
        res = _dry_run(f"configs/{config}", train_file, tmp_path / "out", str(tiny_model_dir))
        assert res.returncode == 2 and "lora.layers" in res.stderr
        res = _dry_run(f"configs/{config}", train_file, tmp_path / "out", str(tiny_model_dir), "--set", "lora.layers=null")
    else:
        res = _dry_run(f"configs/{config}", train_file, tmp_path / "out", str(tiny_model_dir))
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    flags = _flags(shlex.split(lines[0]))
    missing = [k for k in REQUIRED + (LORA if cfg["tuning"] == "lora" else ()) if k not in flags]
    assert not missing, f"{config}: the LMFlow command lacks {missing}"
    assert float(flags["num_train_epochs"][0]) == cfg["num_train_epochs"]
    assert float(flags["learning_rate"][0]) == float(cfg["learning_rate"])
    assert int(flags["per_device_train_batch_size"][0]) == cfg["per_device_train_batch_size"]
    assert int(flags["block_size"][0]) == cfg["max_length"]
    assert flags["use_lora"] == ["1" if cfg["tuning"] == "lora" else "0"]
    if cfg["tuning"] == "lora":
        assert int(flags["lora_r"][0]) == cfg["lora"]["r"]
        assert float(flags["lora_alpha"][0]) == cfg["lora"]["alpha"]
        assert float(flags["lora_dropout"][0]) == cfg["lora"]["dropout"]
        assert flags["lora_target_modules"] == cfg["lora"]["target_modules"]
    assert flags["dataset_path"] == [str(tmp_path / "out" / "lmflow_dataset")]
    assert flags["model_name_or_path"] == [str(tiny_model_dir.resolve())]
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_rtuning_recipe_is_the_papers(train_file: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    res = _dry_run("configs/finetune_rtuning.yaml", train_file, tmp_path / "o", str(tiny_model_dir))
    flags = _flags(shlex.split(res.stdout.strip()))
    assert (flags["num_train_epochs"], flags["learning_rate"], flags["per_device_train_batch_size"], flags["use_lora"]) == \
        (["1"], ["2e-05"], ["4"], ["0"])


def test_malformed_training_file_stops_the_launcher(tmp_path: Path, tiny_model_dir: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"type": "text_only", "instances": [{"text": "ok"}, {"txt": "typo"}]}))
    res = _dry_run("configs/finetune_rtuning.yaml", bad, tmp_path / "o", str(tiny_model_dir))
    assert res.returncode == 2
    assert str(bad) in res.stderr and "instance 1" in res.stderr and "text" in res.stderr


def test_prepare_stages_the_data_folder(train_file: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    from kb.finetune import prepare_lmflow, read_base_info

    out = tmp_path / "lmflow_run"
    flags = prepare_lmflow(train_file, REPO_ROOT / "configs" / "finetune_rtuning.yaml", str(tiny_model_dir), out, write=True)
    assert (out / "lmflow_dataset" / train_file.name).read_text() == train_file.read_text()
    assert read_base_info(out)["base_label"] == tiny_model_dir.name
    assert flags[flags.index("--output_dir") + 1] == str(out)
