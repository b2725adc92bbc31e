"""Every YAML in configs/ loads through the loader its user calls, with no unknown or missing key, and
recipes that start from another one (`base:`) resolve to the keys they say."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from kb import finetune as ft
from kb.config import load_yaml, parse_with_config
from kb.errors import KbError
from kb.paths import REPO_ROOT
from kb.rehearsal import TRAIN_CONFIGS

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))
STAGE_CONFIGS = {"query_state_demo_cpu.yaml": "query_state.py"}  # --config of a stage script; the rest are recipes


def _parser(script: str):
    spec = importlib.util.spec_from_file_location(f"cfgtest_{Path(script).stem}", REPO_ROOT / script)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build_parser()


def test_configs_are_found() -> None:
    names = {p.name for p in CONFIGS}
    assert {"finetune_rtuning.yaml", "finetune_craft_mcq_lora.yaml", "rehearsal_mcq_lora.yaml",
            "rehearsal_open_full.yaml", "rehearsal_demo_cpu.yaml"} <= names
    assert set(STAGE_CONFIGS) <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_with_no_unknown_key(path: Path) -> None:
    if path.name in STAGE_CONFIGS:
        args = parse_with_config(_parser(STAGE_CONFIGS[path.name]), ["--config", str(path)])
        for key, value in load_yaml(str(path)).items():
            assert getattr(args, key.replace("-", "_")) == value
    else:
        cfg, name = ft.resolve_config(path)
        assert name == path.stem
        assert set(cfg) == set(ft.FIELDS)


def test_rehearsal_recipes_are_the_paper_finetune_recipes() -> None:
    """CRaFT trains the rehearsal like the final RAIT SFT: the rehearsal recipes inherit it, key for key."""
    for rehearsal, final in (("rehearsal_mcq_lora", "finetune_craft_mcq_lora"),
                             ("rehearsal_open_full", "finetune_craft_open_full")):
        assert ft.resolve_config(REPO_ROOT / "configs" / f"{rehearsal}.yaml")[0] == \
            ft.resolve_config(REPO_ROOT / "configs" / f"{final}.yaml")[0]
    assert all((REPO_ROOT / p).is_file() for p in TRAIN_CONFIGS.values())
    demo, _ = ft.resolve_config(REPO_ROOT / "configs" / "rehearsal_demo_cpu.yaml")
    assert (demo["learning_rate"], demo["lora"]["r"], demo["lora"]["alpha"], demo["lora"]["dropout"]) == (2e-4, 64, 16, 0.1)
    assert demo["lora"]["layers"] == [-4, -3, -2, -1] and demo["max_train_samples"] == 24


def test_base_merges_nested_keys_and_rejects_cycles_and_unknown_keys(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("x: 1\nlora:\n  r: 8\n  alpha: 16\nkeep: [1, 2]\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nx: 2\nlora:\n  r: 4\n")
    assert load_yaml(str(tmp_path / "b.yaml")) == {"x": 2, "lora": {"r": 4, "alpha": 16}, "keep": [1, 2]}
    (tmp_path / "c.yaml").write_text("base: b.yaml\nlora: null\n")
    assert load_yaml(str(tmp_path / "c.yaml"))["lora"] is None
    (tmp_path / "d.yaml").write_text("base: e.yaml\n")
    (tmp_path / "e.yaml").write_text("base: d.yaml\n")
    with pytest.raises(KbError, match="include each other"):
        load_yaml(str(tmp_path / "d.yaml"))
    (tmp_path / "f.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(KbError, match="missing.yaml: config file not found"):
        load_yaml(str(tmp_path / "f.yaml"))
    (tmp_path / "g.yaml").write_text(f"base: {REPO_ROOT / 'configs' / 'finetune_rtuning.yaml'}\nepochs: 3\n")
    with pytest.raises(KbError, match="unknown key.*epochs"):
        ft.resolve_config(tmp_path / "g.yaml")
