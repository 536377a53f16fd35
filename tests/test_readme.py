"""The README's set-up commands are the ones CI proves."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands():
    return [l.strip() for l in (ROOT / "README.md").read_text().splitlines() if l.startswith("    pip install")]


def test_readme_starts_with_the_run_and_test_commands():
    run, test = _commands()[:2]
    assert run.endswith("grokfast train")
    assert "pytest" in test


def test_ci_runs_the_readme_test_command():
    test = _commands()[1]
    ci = [l.strip() for l in (ROOT / ".ci" / "run").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert test in ci
