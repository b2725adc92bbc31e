"""What kb/registry.yaml declares per dataset kind (mcq | open), read in one place.

Tables (each `<table>: {<kind>: {<key>: value}}`; a dataset entry may override any key with its own
`<table>:` mapping): `roles` (the template of each prompt role), `budgets` (new tokens per role),
`shots` (solved examples per role), `chat_template` (the state query's default) and `rait` (RAIT set sizes).
kb.prompts.prompt_for / budget_for, the state query, file names and the stage scripts' defaults all
read them through `declared`, so no stage decides a per-kind setting of its own.

A small module of its own (it needs only kb.data), so that kb.statefile can name files by the default
shots without importing kb.prompts, which imports kb.statefile.
"""

from __future__ import annotations

from typing import Any

from kb.data import dataset_spec, registry
from kb.errors import KbError

TABLES = {"roles": "prompt role", "budgets": "budget role", "shots": "shots role", "chat_template": "chat-template role",
          "rait": "RAIT size"}  # table -> what its keys are, for error messages
CHAT_MODES = ("auto", "on", "off")


def declared(dataset: str, table: str, key: str) -> Any:
    """The registry's `table` value of `key` for a dataset: its own override, else its kind's."""
    spec = dataset_spec(dataset)  # an unknown dataset fails here, naming it
    kinds = _table(table)
    if spec.kind not in kinds:
        raise KbError(f"kb/registry.yaml: no `{table}` entry for dataset kind {spec.kind!r} (dataset {spec.name})")
    entry = {**kinds[spec.kind], **(spec.options.get(table) or {})}
    if key not in entry:
        raise KbError(f"unknown {TABLES[table]} {key!r} for dataset {spec.name}; registered: {', '.join(entry)}")
    return entry[key]


def kind_declared(kind: str, table: str, key: str) -> Any:
    """A kind's value, for defaults needed before the dataset is known (e.g. an argparse default)."""
    entry = _table(table).get(kind) or {}
    if key not in entry:
        raise KbError(f"kb/registry.yaml: no {TABLES[table]} {key!r} for dataset kind {kind!r}")
    return entry[key]


def _table(table: str) -> dict[str, dict[str, Any]]:
    if table not in TABLES:
        raise KbError(f"no per-kind table {table!r} in kb/registry.yaml; tables: {', '.join(TABLES)}")
    return registry().get(table) or {}


def default_shots(dataset: str, role: str) -> int:
    """Solved examples before each question in `role` (probe: R-Tuning's probe; query: CRaFT's state query)."""
    return int(declared(dataset, "shots", role))


def default_chat(dataset: str, role: str) -> str:
    """The --chat-template default (auto | on | off) of `role` for a dataset."""
    mode = declared(dataset, "chat_template", role)
    if mode not in CHAT_MODES:
        raise KbError(f"kb/registry.yaml: chat_template {role!r} of dataset {dataset!r} must be one of "
                      f"{', '.join(CHAT_MODES)} (quoted: YAML reads a bare off as false), not {mode!r}")
    return str(mode)
