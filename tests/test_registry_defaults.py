"""kb/registry.yaml declares every per-kind default beside `roles` and `budgets` (few-shot counts, the state
query's chat template, RAIT set sizes), read through kb.defaults.declared: every registered dataset
resolves each of them, the values are those the stages used when they were constants in code, and the
stages (file names, query settings, the scripts' flags) take them from there."""

from __future__ import annotations

import argparse

import pytest

from kb.config import parse_with_config
from kb.data import dataset_spec, registry
from kb.defaults import CHAT_MODES, TABLES, declared, default_chat, default_shots, kind_declared
from kb.errors import KbError
from kb.layout import source_name
from kb.state_settings import settings_from_args
from kb.testing import tiny_tokenizer

DATASETS = sorted(registry()["datasets"])
KINDS = ("mcq", "open")
# R-Tuning probes MMLU 5-shot and ParaRel 0-shot; CRaFT queries MCQ 5-shot without a chat template and open
# QA 3-shot with one, and builds RAIT sets of 4,000 + 1,000 (MMLU) and 8,000 + 2,000 (TriviaQA).
PINNED = {
    "mcq": {("shots", "probe"): 5, ("shots", "query"): 5, ("chat_template", "query"): "off",
            ("rait", "n_van"): 4000, ("rait", "n_idk"): 1000},
    "open": {("shots", "probe"): 0, ("shots", "query"): 3, ("chat_template", "query"): "auto",
             ("rait", "n_van"): 8000, ("rait", "n_idk"): 2000},
}


def test_every_table_has_an_entry_per_kind_and_declared_reads_every_per_kind_table() -> None:
    for table in TABLES:
        assert set(registry()[table]) == set(KINDS), table
    per_kind = {k for k, v in registry().items() if isinstance(v, dict) and set(v) == set(KINDS)}
    assert per_kind == set(TABLES)


@pytest.mark.parametrize("dataset", DATASETS)
def test_every_dataset_declares_its_defaults(dataset: str) -> None:
    kind = dataset_spec(dataset).kind
    for (table, key), value in PINNED[kind].items():
        assert declared(dataset, table, key) == value
        assert kind_declared(kind, table, key) == value
    assert default_chat(dataset, "query") in CHAT_MODES
    for role in ("probe", "query"):
        assert isinstance(default_shots(dataset, role), int) and default_shots(dataset, role) >= 0


def test_unknown_key_or_table_is_a_one_line_error() -> None:
    with pytest.raises(KbError, match="unknown shots role 'refuse' for dataset mmlu") as err:
        default_shots("mmlu", "refuse")
    assert "\n" not in str(err.value)
    with pytest.raises(KbError, match="no per-kind table 'nope'"):
        declared("mmlu", "nope", "query")
    with pytest.raises(KbError, match="unknown dataset 'nope'"):
        default_shots("nope", "query")


def test_a_bare_off_in_the_registry_would_be_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    table = {**registry(), "chat_template": {"mcq": {"query": False}, "open": {"query": "auto"}}}
    monkeypatch.setattr("kb.defaults.registry", lambda: table)
    with pytest.raises(KbError, match="must be one of auto, on, off"):
        default_chat("mmlu", "query")


def test_state_file_names_carry_the_declared_query_shots() -> None:
    assert source_name("mmlu", "ID_train", None) == "MMLU_ID_train_5shot"
    assert source_name("pararel", "ID_train", None) == "ParaRel_ID_train_3shot"
    assert source_name("pararel", "ID_train", 0) == "ParaRel_ID_train_0shot"


def _parser(script: str) -> argparse.ArgumentParser:
    module = __import__(script)
    return module.build_parser()


@pytest.mark.parametrize(("dataset", "chat_template", "shots", "chat"),
                         [("mmlu", True, 5, False), ("pararel", True, 3, True), ("pararel", False, 3, False)])
def test_query_settings_take_shots_and_chat_template_from_the_registry(dataset: str, chat_template: bool, shots: int,
                                                                       chat: bool) -> None:
    args = parse_with_config(_parser("query_state"), ["--dataset", dataset])
    settings = settings_from_args(args, tiny_tokenizer(chat_template))
    assert (settings.shots, settings.chat) == (shots, chat)


def test_probe_scripts_default_to_the_declared_probe_shots() -> None:
    assert parse_with_config(_parser("run_MMLU"), []).shots == default_shots("mmlu", "probe") == 5
    assert parse_with_config(_parser("run_ParaRel"), []).shots == default_shots("pararel", "probe") == 0
