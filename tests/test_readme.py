"""The README's two set-up commands are what a fresh machine runs, and CI runs the second one."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = text.split("```bash")[1:3]
    return [next(l for l in b.split("```")[0].splitlines() if l.strip() and not l.startswith("#")) for b in blocks]


def test_readme_opens_with_exactly_two_commands_and_ci_runs_the_second():
    serve, tests = readme_commands()
    assert "mmserve serve" in serve and "pip install" in serve
    assert "pytest" in tests and "pip install" in tests
    assert tests in (ROOT / ".ci" / "run").read_text()
