"""The README and docs/ stay true: every flag is documented, the tables match the code, links resolve,
the README stays short, and CI runs exactly the README's test command."""
import dataclasses
import os
import re

from config import TrainConfig
from flags import build_arg_parser, flags_markdown, parse_args
from model import apply_trainable, build_model
from tests.mutations import table_markdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name: str) -> str:
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def test_every_flag_is_documented():
    flags = read("docs/flags.md")
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f"`--{f.name}`" not in flags]
    assert not missing, f"flags missing from docs/flags.md: {missing}"


def test_help_prints_every_flag():
    """`python multitask_classifier.py --help` works and lists every flag (argparse %-formats help
    strings, so a literal "1%" in one once made --help crash)."""
    text = build_arg_parser().format_help()
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f"--{f.name}" not in text]
    assert not missing, f"flags missing from --help: {missing}"
    assert "(1% of the budget" in text


def test_the_readme_reads_in_five_minutes_and_its_links_resolve():
    assert len(read("README.md").encode()) < 12_000
    for name in ["README.md"] + [f"docs/{f}" for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md")]:
        folder = os.path.dirname(os.path.join(ROOT, name))
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", read(name)):
            if not target.startswith("http"):
                assert os.path.exists(os.path.join(folder, target)), f"{name}: broken link {target}"


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"^\./setup\.sh && (\.venv/bin/python -m pytest)\s*$", read("README.md"), re.M)
    assert commands, "README.md has no test command"
    ci_lines = [line.strip() for line in read(".ci/run").splitlines() if line.strip() and not line.startswith("#")]
    assert f"./setup.sh && {commands[0]}" in ci_lines


def test_flag_tables_match_the_config():
    assert flags_markdown().strip() in read("docs/flags.md"), "regenerate with: python flags.py"


def test_trainable_parameter_table_matches_the_model():
    """Each row of docs/usage.md's table: the flags in its first cell give those counts on the embedded model."""
    usage = read("docs/usage.md")
    table = usage[usage.index("| option | trainable | total |"):].split("\n\n")[0].splitlines()[2:]
    assert len(table) >= 5
    for line in table:
        option, trainable, total = [cell.strip() for cell in line.strip("|").split("|")]
        cfg = parse_args([arg for flags in re.findall(r"`([^`]*)`", option) for arg in flags.split()])
        model = build_model(cfg)
        apply_trainable(model, cfg, epoch=0)
        counts = (sum(p.numel() for p in model.parameters() if p.requires_grad),
                  sum(p.numel() for p in model.parameters()))
        assert counts == (int(trainable.replace(",", "")), int(total.replace(",", ""))), option


def test_the_mutation_table_matches_the_mutations():
    assert table_markdown() in read("docs/techniques.md"), "regenerate with: python tests/mutations.py --table"
