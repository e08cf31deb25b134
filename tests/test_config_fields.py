"""One source of truth for run fields (issue 18, item 3): the command line's
options, the keys a table spec may set and the hash's "added later" defaults
are all made from RunConfig's field metadata (config.run_field), so a new
field declared there reaches each of them."""
from dataclasses import fields

import click

from fdgbench.cli import cli
from fdgbench.config import ADDED_LATER, RunConfig, field_kind, flag_name
from fdgbench.report.specs import FLAG_FIELDS, RUN_FIELDS, TEXT_FIELDS

RUN_FIELDS_OF_A_CONFIG = [f for f in fields(RunConfig) if f.name not in ("method", "method_options")]


def test_every_field_is_an_option_of_run_and_compare_with_its_default_and_help():
    for command in ("run", "compare"):
        params = {p.name: p for p in cli.commands[command].params}
        for f in RUN_FIELDS_OF_A_CONFIG:
            option = params[f.name]
            assert flag_name(f.name) in option.opts + option.secondary_opts, (command, f.name)
            if f.metadata["help"]:
                assert f.metadata["help"] in (option.help or ""), (command, f.name)
            if field_kind(f.name) is bool:  # a flag (off unless given) or a --x/--no-x switch
                assert option.is_flag and (f.default is False or f.metadata["negatable"]), f.name
                continue
            cli_default = f.metadata["cli_default"]
            assert option.default == (f.default if cli_default is None else cli_default), (command, f.name)


def test_spec_keys_and_added_later_defaults_come_from_the_metadata():
    assert set(RUN_FIELDS) == {f.name for f in RUN_FIELDS_OF_A_CONFIG if f.metadata["spec"]}
    assert set(TEXT_FIELDS) == {f for f in RUN_FIELDS if field_kind(f) is str}
    assert set(FLAG_FIELDS) == {f for f in RUN_FIELDS if field_kind(f) is bool}
    assert ADDED_LATER == {f.name: f.default for f in RUN_FIELDS_OF_A_CONFIG if f.metadata["added_later"]}
    written = RunConfig().to_dict()  # at their defaults, the added-later fields are left out of the hash
    assert not set(ADDED_LATER) & set(written)
    assert set(written) == {f.name for f in fields(RunConfig)} - set(ADDED_LATER)


def test_a_choice_field_is_refused_by_the_command_line_or_listed_in_its_help():
    params = {p.name: p for p in cli.commands["run"].params}
    for f in RUN_FIELDS_OF_A_CONFIG:
        if f.metadata["choices"] is None:
            continue
        values = f.metadata["choices"]()
        option = params[f.name]
        if f.metadata["check_choices"]:
            assert isinstance(option.type, click.Choice) and set(values) <= set(option.type.choices), f.name
        else:
            assert "|".join(values) in option.help, f.name
