"""kb/registry.yaml decides which template each role uses (kb.prompts.prompt_for / budget_for): every
registered dataset resolves every role, unknown names fail in one line, and the REFUSE prompt that RAIT and
rehearsal data are built with is the one evaluation's --template refuse asks with."""

from __future__ import annotations

import pytest

from kb.data import dataset_spec, load_split, registry
from kb.errors import KbError
from kb.eval_summary import template_for
from kb.prompts import ROLES, PromptFormat, budget_for, prompt_for, render, templates, training_prompt
from kb.testing import tiny_tokenizer

DATASETS = sorted(registry()["datasets"])
EXPECTED = {  # the templates the stages used before the registry decided them (pinned: outputs depend on them)
    "mcq": {("probe", False): "mcq_harness", ("probe", True): "mcq_harness", ("query", False): "mcq_harness",
            ("query", True): "mcq_harness", ("basic", False): "mcq_basic", ("refuse", False): "mcq_refuse"},
    "open": {("probe", False): "open_rtuning", ("probe", True): "open_short", ("query", False): "open_rtuning",
             ("query", True): "open_short", ("basic", False): "open_basic", ("refuse", False): "open_refuse"},
}
BUDGETS = {"mcq": {"probe": 0, "eval": 8, "eval_extra": 32, "query": 0},
           "open": {"probe": 15, "eval": 16, "eval_extra": 32, "query": 50}}


@pytest.mark.parametrize("dataset", DATASETS)
def test_every_dataset_has_a_registered_template_for_every_role(dataset: str) -> None:
    kind = dataset_spec(dataset).kind
    for role in ROLES:
        for chat in (False, True):
            name = prompt_for(dataset, role, chat)
            assert name in templates()
            assert ("{options}" in templates()[name]["item"]) == (kind == "mcq")
            if (role, chat) in EXPECTED[kind]:
                assert name == EXPECTED[kind][(role, chat)]
    for role, n in BUDGETS[kind].items():
        assert budget_for(dataset, role) == n


@pytest.mark.parametrize("dataset", DATASETS)
def test_training_refuse_prompt_is_the_evaluation_refuse_prompt(dataset: str) -> None:
    split = next(iter(dataset_spec(dataset).splits))
    sample = load_split(dataset, split)[0]
    rec = {"id": sample.id, "kind": dataset_spec(dataset).kind, "question": sample.question, "gold": sample.answer,
           "choices": list(sample.choices), "aliases": list(sample.aliases), "group": sample.group}
    assert template_for("refuse", dataset) == prompt_for(dataset, "refuse")
    for chat in (False, True):
        tok = tiny_tokenizer(chat)
        evaluated = render(sample, PromptFormat(template_for("refuse", dataset), 0, chat), [], tok)
        assert training_prompt(rec, tok, chat, dataset) == evaluated


def test_unknown_dataset_or_role_is_a_one_line_error() -> None:
    with pytest.raises(KbError, match="unknown dataset 'nope'") as err:
        prompt_for("nope", "refuse")
    assert "\n" not in str(err.value)
    with pytest.raises(KbError, match="unknown prompt role 'judge' for dataset mmlu") as err:
        prompt_for("mmlu", "judge")
    assert "\n" not in str(err.value)
    with pytest.raises(KbError, match="unknown budget role 'refuse' for dataset pararel"):
        budget_for("pararel", "refuse")
