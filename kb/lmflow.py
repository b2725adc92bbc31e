"""LMFlow's dataset format, written and validated in one place.

text_only: {"type": "text_only", "instances": [{"text": ...}]}          loss on every token
text2text: {"type": "text2text", "instances": [{"input": ..., "output": ...}]}  loss on the output only
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kb.errors import KbError, data_error
from kb.io import read_json, write_json

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
