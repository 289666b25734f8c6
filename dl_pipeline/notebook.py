"""Notebook helpers: ``dbutils.widgets`` on Databricks, a local stand-in everywhere else.

Notebooks call ``widgets(globals())`` and then only ``text``/``dropdown``/``get``. On Databricks
the real ``dbutils.widgets`` is returned. Locally (tests, a laptop) values come from the
defaults, overridden by the JSON object in ``DL_PIPELINE_WIDGETS``, so every notebook runs end
to end as a plain script: ``DL_PIPELINE_WIDGETS='{"config": "conf/demo.yaml"}' python notebooks/01_prepare.py``.
"""

from __future__ import annotations

import json
import os
from typing import Any

from dl_pipeline.errors import UserError


class LocalWidgets:
    """The subset of ``dbutils.widgets`` our notebooks use."""

    def __init__(self, values: dict[str, str] | None = None):
        self._defaults: dict[str, str] = {}
        self._values = dict(values if values is not None else json.loads(os.environ.get("DL_PIPELINE_WIDGETS", "{}")))

    def text(self, name: str, defaultValue: str, label: str | None = None) -> None:  # noqa: N803 (dbutils' names)
        self._defaults[name] = defaultValue

    def dropdown(self, name: str, defaultValue: str, choices: list[str], label: str | None = None) -> None:  # noqa: N803
        if defaultValue not in choices:
            raise ValueError(f"widget {name}: default {defaultValue!r} not in {choices}")
        self._defaults[name] = defaultValue
        value = self._values.get(name)
        if value is not None and value not in choices:
            raise UserError(f"widget {name}={value!r}: must be one of {', '.join(choices)}")

    def get(self, name: str) -> str:
        if name in self._values:
            return str(self._values[name])
        if name not in self._defaults:
            raise UserError(f"widget {name!r} is not defined in this notebook")
        return self._defaults[name]


def widgets(namespace: dict[str, Any]):
    """``dbutils.widgets`` when the notebook runs on Databricks, else a LocalWidgets."""
    dbutils = namespace.get("dbutils")
    return dbutils.widgets if dbutils is not None else LocalWidgets()


def overrides(text: str) -> list[str]:
    """Widget text 'a.b=1; c.d=x' (';' or newline separated) -> ['a.b=1', 'c.d=x']."""
    return [part.strip() for chunk in text.splitlines() for part in chunk.split(";") if part.strip()]


def use_repo_root(marker: str = "conf") -> str:
    """chdir to the repository root (the nearest parent holding ``conf/``), so the relative
    paths in conf/*.yaml work: Databricks Repos starts a notebook in its own folder."""
    here = os.path.abspath(os.getcwd())
    probe = here
    while True:
        if os.path.isdir(os.path.join(probe, marker)) and os.path.isdir(os.path.join(probe, "dl_pipeline")):
            os.chdir(probe)
            return probe
        parent = os.path.dirname(probe)
        if parent == probe:
            return here  # not inside the repo (an installed wheel): paths must be absolute URIs
        probe = parent
