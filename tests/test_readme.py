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


def test_every_python_block_of_the_readme_runs(tmp_path):
    """The README's Python blocks, in order, as one script in an empty folder (offline).

    The plugin example (``<!-- example:plugin -->``) runs in its own test, in Python
    and across processes (``tests/test_engine.py``).
    """
    import os
    import subprocess
    import sys

    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"(<!-- example:plugin -->\s*)?```python\n(.*?)```", readme, re.S)
    assert len(blocks) >= 3 and sum(bool(mark) for mark, _ in blocks) == 1
    blocks = [code for mark, code in blocks if not mark]
    script = tmp_path / "readme.py"
    script.write_text("\n\n".join(blocks))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
        timeout=600, env=env,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr[-2000:]
    assert (tmp_path / "runs" / "api" / "checkpoint.pt").exists()
    assert (tmp_path / "runs" / "by-hand" / "checkpoint.pt").exists()
