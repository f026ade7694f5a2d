"""The README opens with exactly two set-up commands, and CI runs the second one verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
    assert first_block, "README.md must open with a code block of set-up commands"
    before = text[: first_block.start()]
    assert before.strip().startswith("#") and before.count("\n") <= 2, "the commands come first"
    return [line for line in first_block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_two_commands():
    commands = readme_commands()
    assert len(commands) == 2
    assert "wan run generate --preset demo" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in [line.strip() for line in ci]


def test_setup_script_installs_every_default_plugin():
    script = (ROOT / "scripts" / "setup.sh").read_text()
    for name in ("attention_sdpa", "cfg_schedules", "timestep_sampling", "quant_fp8", "offload_blockswap"):
        assert name in script
