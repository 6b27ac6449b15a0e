"""The README and docs/ say only what is true: every `qzoom` command line they show names commands
and flags that exist, and the README's first answer works as written."""

import json
import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from qzoom_cli import cli

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"(?<![\w/.-])qzoom (?=[a-z-])")  # `qzoom ask …`, not `qzoom: error` nor `qzoom_cli`


def command_lines(text: str) -> list[str]:
    """Each `qzoom …` command shown: in code blocks (a line from `qzoom` on, up to a comment or
    `&&`) and in inline code."""
    found, in_block = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_block = not in_block
            continue
        spans = [line] if in_block else re.findall(r"`([^`]+)`", line)
        for span in spans:
            for match in COMMAND.finditer(span):
                command = span[match.start():].split(" #")[0].split("&&")[0]
                found.append(command.strip())
    return found


def option_names(command) -> set[str]:
    return {name for param in command.params for name in (*param.opts, *param.secondary_opts)}


def unknown_flags(line: str, root) -> list[str]:
    """The subcommands and flags of `line` that the CLI does not have."""
    try:
        tokens = shlex.split(line.replace("\\|", "|"))[1:]
    except ValueError:
        tokens = line.split()[1:]
    command, problems = root, []
    while tokens and hasattr(command, "commands") and tokens[0].rstrip(",:;)") in command.commands:
        command = command.commands[tokens.pop(0).rstrip(",:;)")]  # prose may follow a name: `qzoom run: …`
    if hasattr(command, "commands"):  # a group left without its subcommand
        return [f"{line}: no such command {tokens[0] if tokens else '(none)'}"] if tokens else []
    known = option_names(command) | {"-h", "--help"}
    for token in tokens:
        for name in token.strip("[]()").split("|"):
            name = name.split("=")[0]
            if re.fullmatch(r"--?[a-z][a-z0-9-]*", name) and name not in known:
                problems.append(f"{line}: {name}")
    return problems


def test_every_command_line_in_the_docs_names_what_exists():
    root = typer.main.get_command(cli.app)
    lines = [line for page in PAGES for line in command_lines(page.read_text())]
    assert len(lines) > 40  # the pages do show commands
    problems = [problem for line in lines for problem in unknown_flags(line, root)]
    assert problems == []


def test_the_checker_catches_a_flag_that_does_not_exist():
    root = typer.main.get_command(cli.app)
    assert unknown_flags("qzoom ask doc.pdf q --zoom auto -o x", root) == ["qzoom ask doc.pdf q --zoom auto -o x: -o"]
    assert unknown_flags("qzoom train rpn m.jsonl -o out --seed 1", root) == []
    assert unknown_flags("qzoom models fetch x", root) == ["qzoom models fetch x: no such command fetch"]
    assert command_lines("run `qzoom run m.jsonl -o x` and\n```\n$ qzoom ask a.pdf q  # why\n```") == [
        "qzoom run m.jsonl -o x", "qzoom ask a.pdf q"]


def test_the_readmes_first_answer_works_as_written(tiny_dir):
    """`qzoom ask samples/invoice.pdf "What is the total due?" --model tiny --device cpu --json`,
    with the tiny model `qzoom models make-tiny tiny` writes (the session's is made the same way)."""
    readme = (ROOT / "README.md").read_text()
    [line] = [line for line in command_lines(readme) if "--model tiny" in line]
    args = [str(tiny_dir) if arg == "tiny" else str(ROOT / arg) if arg.startswith("samples/") else arg
            for arg in shlex.split(line)[1:]]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["schema"] == "qzoom.result/v1"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_link_between_the_pages_leads_somewhere(page):
    for target in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
        if not target.startswith("http"):
            assert (page.parent / target).exists(), f"{page.name} links to {target}"
