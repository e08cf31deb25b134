"""The commands the README and docs/usage.md print are commands the CLI
takes: each `fdgbench` line parses (command, options, their types and
choices) without running, and the presets the README's `make reproduce-*`
line names exist in the specs it names them for."""
import re
import shlex

import click
import pytest

from fdgbench.cli import cli
from fdgbench.report.specs import load_spec

from .conftest import ROOT


def _code_block_after(path, heading: str) -> list[str]:
    """The lines of the first code block after ``heading`` in ``path``."""
    section = (ROOT / path).read_text().split(f"\n{heading}\n", 1)[1]
    return section.split("```", 2)[1].strip("\n").splitlines()


def _without_comment(line: str) -> str:
    return line.split("  #", 1)[0].strip()


def _fdgbench_commands() -> list[str]:
    """Every `fdgbench ...` line of the README's five commands and of
    docs/usage.md's commands, less those written as patterns (a|b, [opt],
    <placeholder>), which are not one command."""
    lines = (_code_block_after("README.md", "## Five commands")
             + _code_block_after("docs/usage.md", "## Commands"))
    commands = [_without_comment(line) for line in lines]
    return [c for c in commands if c.startswith("fdgbench ") and not re.search(r"[|\[<]", c)]


def _parse(command: str) -> tuple[click.Context, list[str]]:
    """Resolve the (sub)command chain and parse its arguments as click would
    before invoking it: an unknown option, a bad type or choice raises.
    Returns the command's context and the arguments given to it."""
    args = shlex.split(command)[1:]
    ctx = click.Context(cli, info_name="fdgbench")
    group: click.Command = cli
    while isinstance(group, click.Group):
        name = args.pop(0)
        sub = group.get_command(ctx, name)
        assert sub is not None, f"{command}: no command {name!r}"
        group = sub
        if isinstance(sub, click.Group):
            ctx = click.Context(sub, info_name=name, parent=ctx)
    return group.make_context(name, list(args), parent=ctx), args


@pytest.mark.parametrize("command", _fdgbench_commands())
def test_every_printed_command_parses(command):
    ctx, args = _parse(command)
    given = {k for k in ctx.params if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
    assert given or not args, f"{command}: parsed, but none of its arguments reached the command"


def test_the_commands_are_found_and_a_wrong_one_is_refused():
    """Not vacuous: the README's block has its five lines, and the parser
    refuses what the CLI would."""
    assert len(_fdgbench_commands()) >= 4
    with pytest.raises(click.NoSuchOption):
        _parse("fdgbench compare --methods bp --no-such-option 1")
    with pytest.raises(click.BadParameter):
        _parse("fdgbench run --method fdg --epochs many")


def _spec_name(table: str) -> str:
    """A make target's table as its spec is named (make's deep-k is deep_k.toml)."""
    return table.strip().replace("-", "_")


def _readme_make_presets() -> dict[str, set[str]]:
    """From the README's `make reproduce-table2 ...` line: table -> the
    presets it is said to have. ``PRESET=a|b|c`` names presets of every
    table the line names (table2 and those after "also"); ``name (t1, t2)``
    a preset of those tables only."""
    line = next(line for line in _code_block_after("README.md", "## Five commands")
                if line.startswith("make reproduce-table2 "))
    comment = line.split("#", 1)[1]
    every = re.search(r"PRESET=([\w|-]+)", comment).group(1).split("|")
    named = {_spec_name(t): set(every) for t in ["table2", *comment.split("also", 1)[1].split(",")]}
    for preset, tables in re.findall(r"([\w-]+) \(([\w, -]+)\)", comment):
        for table in tables.split(","):
            named[_spec_name(table)].add(preset)
    return named


def test_the_readme_make_line_names_only_presets_the_specs_have():
    named = _readme_make_presets()
    assert named["table2"] >= {"full", "converge"}, named  # the line's own example: PRESET=converge
    for table, presets in named.items():
        spec = load_spec(table)
        assert presets <= set(spec.presets), (table, presets - set(spec.presets))
