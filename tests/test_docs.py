"""The README cannot drift from the code: settings table and command list are checked here."""

from __future__ import annotations

import re
from pathlib import Path

from worker.cli import build_parser
from worker.settings import Settings

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_readme_configuration_table_matches_the_settings_class() -> None:
    rows = dict(re.findall(r"^\| `(CRMSYNC_[A-Z_]+)` \| (.*?) \|", README, re.M))
    expected = {}
    for name, field in Settings.model_fields.items():
        expected[f"CRMSYNC_{name.upper()}"] = "" if field.default is None else f"`{field.default}`"
    assert {k: v.strip() for k, v in rows.items()} == expected


def test_readme_documents_every_command() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in sub.choices:  # type: ignore[union-attr]
        assert f"`crmsync {name}" in README, name


def test_readme_shows_the_two_fresh_machine_commands() -> None:
    assert "bash scripts/demo.sh" in README and "bash scripts/test.sh" in README
    assert "crmsync demo" in README
