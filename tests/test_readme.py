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
