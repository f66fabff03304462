"""The parameter registry and what is derived from it (no server needed)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from prefork_smtpd import settings as S
from prefork_smtpd import stats
from prefork_smtpd.cli.server import build_parser, settings_from_args
from prefork_smtpd.config_file import ConfigFileError, load_config_file

README = Path(__file__).resolve().parent.parent / "README.md"


def test_settings_has_one_field_per_setting_with_its_default():
    d = S.Settings()
    for setting in S.REGISTRY:
        if setting.default_factory is None:
            assert getattr(d, setting.name) == setting.default, setting.name
    assert d.workers == (os.cpu_count() or 1) and d.domains == ["smtpd.com"]
    assert S.Settings(domains=["A.Example"]).domains == ["a.example"]  # lowercased, as always


def test_every_setting_has_its_flags_and_each_flag_sets_it():
    parser = build_parser()
    by_dest = {a.dest: a for a in parser._actions}
    for setting in S.REGISTRY:
        action = by_dest[setting.name]
        negated = tuple("--no-" + f[2:] for f in setting.long_flags) if setting.type is bool else ()
        assert tuple(action.option_strings) == setting.cli_flags + negated
        if setting.type is bool:  # a switch: --x turns it on, --no-x off
            assert vars(parser.parse_args([setting.cli_flags[-1]])) == {setting.name: True}
            off = "--no-" + setting.cli_flags[-1][2:]
            assert vars(parser.parse_args([off])) == {setting.name: False}
            continue
        value = {int: str((setting.range or (0, 0))[0]), str: "x", list: "x.example"}[setting.type]
        args = vars(parser.parse_args([setting.cli_flags[-1], value]))
        assert args == {setting.name: [value] if setting.type is list else type(args[setting.name])(value)}


def test_short_aliases_and_old_flag_spellings_still_work():
    args = vars(build_parser().parse_args(["-P", "25", "-l", "::1", "-c", "99", "-C", "0.0.0.0", "--domain", "a.org"]))
    assert args == {"port": 25, "listen": "::1", "config_port": 99, "config_address": "0.0.0.0", "domains": ["a.org"]}


def test_an_int_flag_out_of_range_names_the_range(capsys):
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(["--max-recipients", "0"])
    assert exit.value.code == 2
    assert capsys.readouterr().err == (
        "prefork-smtpd: error: argument --max-recipients: max_recipients must be between 1 and 100000\n"
    )


@pytest.mark.parametrize("hostname", ["mx.test\r\n250 injected", "", "mx test", "mx.example(192.0.2.1)"])
def test_a_hostname_that_is_no_domain_name_is_refused(hostname, tmp_path, capsys):
    # It goes into the greeting, the EHLO reply and every Received header:
    # a CR LF in it broke the replies and the stored headers.
    conf = tmp_path / "s.toml"
    conf.write_text(f"hostname = {json.dumps(hostname)}\n")
    for args in (["--hostname", hostname], ["--config", str(conf)]):
        with pytest.raises(SystemExit) as exit:
            settings_from_args([*args, "--mail-dir", str(tmp_path / "m")])
        assert exit.value.code == 2
        assert "--hostname must be a domain name or an address literal" in capsys.readouterr().err
    for good in ("mx.example.org", "mail_1.example", "[192.0.2.1]", "localhost"):
        settings, _ = settings_from_args(["--hostname", good, "--mail-dir", str(tmp_path / "m")])
        assert settings.hostname == good


@pytest.mark.parametrize("flag", ["--mail-dir", "--log-file", "--queue-dir", "--domain", "--users"])
def test_a_nul_byte_in_any_setting_is_one_line_and_exit_2(flag, tmp_path, capsys):
    # A NUL in --mail-dir was a ValueError traceback (exit 1); in --log-file
    # the server ran with no log at all, every process printing a traceback.
    args = [flag, "a\0b"] + (["--mail-dir", str(tmp_path / "m")] if flag != "--mail-dir" else [])
    with pytest.raises(SystemExit) as exit:
        settings_from_args(args)
    assert exit.value.code == 2
    assert f"prefork-smtpd: error: {flag}: a NUL byte in " in capsys.readouterr().err


@pytest.mark.parametrize("setting", S.REGISTRY, ids=lambda s: s.name)
def test_every_setting_has_toml_keys_checked_by_its_type(setting, tmp_path):
    good = {int: (setting.range or (0, 0))[1], str: "x", list: ["x.example"], bool: True}[setting.type]
    for key in setting.toml_keys:
        for spelling in (key, key.replace("_", "-")):
            conf = tmp_path / "s.toml"
            conf.write_text(f'"{spelling}" = {good!r}\n'.replace("'", '"').replace("True", "true"))
            assert load_config_file(str(conf)) == {setting.name: good}
    conf.write_text(f"{setting.name} = {'1' if setting.type is bool else 'true'}\n")
    with pytest.raises(ConfigFileError, match=rf"s\.toml:1: {setting.name} must be "):
        load_config_file(str(conf))


def test_a_setting_given_under_both_spellings_is_refused_with_its_line(tmp_path):
    conf = tmp_path / "s.toml"
    conf.write_text("workers = 2\nmax-recipients = 5\n\nmax_recipients = 7\n")
    with pytest.raises(ConfigFileError, match=r"s\.toml:4: max_recipients given twice "
                       r"\(as 'max-recipients' and 'max_recipients'\)"):
        load_config_file(str(conf))


@pytest.mark.parametrize("body, line", [
    ("workers = 2\n\n[max_recipients]\nx = 1\n", 3),
    ("workers = 2\nmax_recipients.x = 1\n", 2),
    ("workers = 2\n\n\n[[tls_cert]]\nx = 1\n", 4),
    ("workers = 2\n[ unknown . x ]\ny = 1\n", 2),
])
def test_a_table_or_dotted_key_is_reported_at_its_own_line(body, line, tmp_path):
    conf = tmp_path / "s.toml"
    conf.write_text(body)
    with pytest.raises(ConfigFileError, match=rf"s\.toml:{line}: "):
        load_config_file(str(conf))


def test_the_example_config_file_is_accepted():
    example = README.parent / "systemd" / "prefork-smtpd.toml"
    assert load_config_file(str(example))["workers"] == 4


@pytest.mark.parametrize("key", ["config_file", "mailbox_list", "sources", "colour"])
def test_bookkeeping_fields_are_no_keys(key, tmp_path):
    conf = tmp_path / "s.toml"
    conf.write_text(f'{key} = "x"\n')
    with pytest.raises(ConfigFileError, match=f"unknown setting '{key}'"):
        load_config_file(str(conf))


def test_the_control_block_holds_the_shared_settings_and_every_live_one():
    assert stats.CONTROL == S.SHARED and len(stats.CONTROL) <= stats.CONTROL_WORDS
    assert set(S.PARAMETERS) <= set(stats.CONTROL)
    assert {"max_command_line", "max_text_line"} <= set(stats.CONTROL) - set(S.PARAMETERS)


def test_config_port_parameters_keep_their_names_and_show_order():
    assert S.PARAMETERS == (
        "logging", "workers", "max_connections", "max_connections_per_ip", "min_free_space",
        "max_message_size", "max_data_memory", "max_recipients", "timeout", "data_timeout", "max_errors",
    )
    assert S.PORT_ALIASES == {"logger": "logging"}
    assert set(S.PORT_HELP) == set(S.PARAMETERS) and all(S.PORT_HELP.values())


def test_restart_only_settings_are_the_sockets():
    assert set(S.NEEDS_RESTART) == {
        "listen", "port", "submission_port", "smtps_port", "backlog", "config_address", "config_port", "metrics_address", "metrics_port",
    }


def test_the_readme_table_is_the_generated_one():
    text = README.read_text()
    match = re.search(r"<!-- settings table:[^\n]*-->\n(.*?)<!-- end of settings table -->", text, re.DOTALL)
    assert match, "README.md lost its settings table markers"
    assert match.group(1) == S.markdown_table(), "run: python -m prefork_smtpd.settings, and paste the table"


def test_the_readme_names_every_setting_and_every_config_port_parameter():
    text = README.read_text()
    # The config port's table: from its header to the first line that is no row.
    port_table = re.search(r"^\| parameter \| range \| effect \|\n((?:\|.*\n)+)", text, re.MULTILINE)
    assert port_table, "the config port's table is missing from README.md"
    port_rows = re.findall(r"^\| `([a-z_]+)`", port_table.group(1), re.MULTILINE)
    assert [r for r in port_rows if r not in ("show", "reload", "token")] == list(S.PARAMETERS)
    for setting in S.REGISTRY:
        assert setting.long_flags[0] in text, setting.name


# A setting added to the table, and nothing else, as a new limit would be.
_NEW_SETTING = '''
    Setting(
        "max_widgets", int, 7, metavar="N", range=(1, 99), help="widgets (default {default})",
        change=LIVE, shared=True, port_help="widgets per session",
    ),
'''
# Its field in Settings: the type, for type checkers.
_NEW_FIELD = """    max_widgets: int = REGISTERED
"""
_LOAD = textwrap.dedent('''
    import sys, types, tempfile
    source = open(sys.argv[1]).read()
    at = source.index("    # ---") + 0  # before the first section of REGISTRY
    source = source[:at] + sys.argv[2] + source[at:]
    if len(sys.argv) > 3:
        at = source.index("    # Bookkeeping")  # after the last setting's field
        source = source[:at] + sys.argv[3] + source[at:]
    module = types.ModuleType("prefork_smtpd.settings")
    module.__file__ = sys.argv[1]
    sys.modules["prefork_smtpd.settings"] = module
    exec(compile(source, sys.argv[1], "exec"), module.__dict__)
''')
_PROBE = _LOAD + textwrap.dedent('''

    from prefork_smtpd import control, controlplane, stats
    from prefork_smtpd.cli.server import build_parser
    from prefork_smtpd.config_file import load_config_file

    assert vars(build_parser().parse_args(["--max-widgets", "9"])) == {"max_widgets": 9}
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write("max-widgets = 8\\n"); f.flush()
        assert load_config_file(f.name) == {"max_widgets": 8}
    assert module.Settings().max_widgets == 7
    assert "max_widgets" in stats.CONTROL and stats.LiveSettings.max_widgets
    assert "max_widgets" in module.markdown_table()

    block = stats.SharedStats()
    plane = controlplane.ControlPlane(module.Settings(workers=1, hostname="h"), log=lambda m: None)
    plane.attach(block)
    session = control.ConfigSession(plane.apply, plane.live_values)
    assert session.feed(b"max_widgets=100\\r\\n") == b"ERR max_widgets must be between 1 and 99\\r\\n"
    assert session.feed(b"max_widgets=5\\r\\n") == b"OK\\r\\n" and block.get("max_widgets") == 5
    assert b"max_widgets=5 (live)" in session.feed(b"show=1\\r\\n")
    print("one place")
''')


def test_a_setting_added_to_the_registry_with_its_field_reaches_flags_file_port_and_shared_memory():
    probe = subprocess.run(
        [sys.executable, "-c", _PROBE, S.__file__, _NEW_SETTING, _NEW_FIELD],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert probe.stdout.strip() == "one place", probe.stderr


def test_a_setting_added_without_its_field_stops_the_import_and_says_what_to_add():
    probe = subprocess.run(
        [sys.executable, "-c", _LOAD, S.__file__, _NEW_SETTING],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert probe.returncode != 0
    assert "max_widgets has no field in Settings: add `max_widgets: int = REGISTERED`" in probe.stderr


def test_settings_fields_declare_the_type_of_each_setting():
    # What mypy sees is what the registry says: one field per setting, its type from the entry.
    hints = {f.name: f.type for f in dataclasses.fields(S.Settings)}
    for setting in S.REGISTRY:
        assert hints[setting.name] == S.annotation(setting), setting.name
    assert [s.name for s in S.REGISTRY] == list(hints)[: len(S.REGISTRY)]  # in table order, bookkeeping last


def test_registry_mismatches_names_each_disagreement():
    class Declared:
        port: str = S.REGISTERED  # the setting is an int
        colour: str = S.REGISTERED  # no setting
        listen: str | None = S.REGISTERED
        plain: int = 3  # not from the registry: bookkeeping

    registry = (S.BY_NAME["port"], S.BY_NAME["listen"], S.BY_NAME["max_recipients"])
    assert S.registry_mismatches(Declared, registry) == [
        "Declared.port is declared 'str', its setting makes it 'int'",
        "max_recipients has no field in Declared: add `max_recipients: int = REGISTERED`",
        "Declared.colour has no entry in REGISTRY",
    ]
    assert S.annotation(S.BY_NAME["domains"]) == "list[str]"
    assert S.annotation(S.BY_NAME["submission_port"]) == "int | None"
    assert S.annotation(S.BY_NAME["workers"]) == "int"  # computed at start, never None
