"""The README keeps exactly the two set-up commands that CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_has_the_install_and_test_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"<!-- ci:(\w+) -->\s*```bash\n(.*?)```", readme, re.S)
    assert [name for name, _ in blocks] == ["install", "test"]
    for _, command in blocks:
        assert len(command.strip().splitlines()) == 1
    ci = (ROOT / ".ci" / "run").read_text()
    assert "ci:install" not in ci or "readme_command install" in ci
    assert 'eval "$install"' in ci and 'eval "$test"' in ci


def test_every_python_block_of_the_readme_runs(tmp_path, monkeypatch):
    """The README's Python blocks, in order, as one script run in an empty folder (offline).

    The plugin example (``<!-- example:plugin -->``) runs in its own test, in Python
    and across processes (``tests/test_engine.py``); the other blocks register
    nothing, so they run in this process.
    """
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"(<!-- example:plugin -->\s*)?```python\n(.*?)```", readme, re.S)
    assert len(blocks) >= 3 and sum(bool(mark) for mark, _ in blocks) == 1
    script = "\n\n".join(code for mark, code in blocks if not mark)
    monkeypatch.chdir(tmp_path)
    exec(compile(script, "README.md", "exec"), {"__name__": "__main__"})
    assert (tmp_path / "runs" / "api" / "checkpoint.pt").exists()
    assert (tmp_path / "runs" / "by-hand" / "checkpoint.pt").exists()
