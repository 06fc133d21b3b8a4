"""The README's promises: its two commands, CI calling the test one, and a
library example that runs as written."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_two_commands_and_ci_calls_the_test_command():
    assert "make run " in README and "make test " in README
    assert "make test" in (ROOT / ".ci/run").read_text()


def test_library_example_runs(capsys):
    code = re.search(r"## Use as a library.*?```python\n(.*?)```", README, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "'draft')" in out and "'acceptance_rate'" in out


@pytest.mark.parametrize("marker, least", [("BENCH-TABLE", 10), ("VARIANT-TABLE", 3)])
def test_readme_tables_are_the_committed_report(marker, least):
    # The README's benchmark rows must be those of docs/benchmark/report.md,
    # the full report they come from, not edited figures.
    table = re.search(rf"<!-- {marker} -->(.*?)<!-- /{marker} -->", README, re.S).group(1)
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    report = (ROOT / "docs/benchmark/report.md").read_text()
    assert len(rows) >= least
    assert all(row in report for row in rows)
