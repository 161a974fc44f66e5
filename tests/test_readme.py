"""The README stays true: every flag is documented, and CI runs exactly the README's test command."""
import dataclasses
import os
import re

from config import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name: str) -> str:
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def test_every_flag_is_in_the_readme():
    readme = read("README.md")
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f"`--{f.name}`" not in readme]
    assert not missing, f"flags missing from README.md: {missing}"


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"^\./setup\.sh && (\.venv/bin/python -m pytest)\s*$", read("README.md"), re.M)
    assert commands, "README.md has no test command"
    ci_lines = [line.strip() for line in read(".ci/run").splitlines() if line.strip() and not line.startswith("#")]
    assert f"./setup.sh && {commands[0]}" in ci_lines


def test_readme_flag_tables_match_the_config():
    from config import flags_markdown
    assert flags_markdown().strip() in read("README.md"), "regenerate with: python config.py"
