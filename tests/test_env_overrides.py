"""TANDEM_* variables fail like the flags they stand for (issue 31, item 2): the flag's own
conversion and checks, its one-line message with the variable named in front, exit status 2, never
a traceback; a good value still takes effect and a flag on the command line still wins."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

from services.cli import generate as cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVERS = {  # the entry point's parse function, the prefix of its variables
    "edge": ("services.edge_server.server", "TANDEM_EDGE_"),
    "scheduler": ("services.scheduler.server", "TANDEM_SCHEDULER_"),
    "ue": ("services.ue_client.server", "TANDEM_UE_"),
}


@pytest.fixture(autouse=True)
def _no_tandem_variables(monkeypatch):
    """Only the variables a test sets (the autouse link-state file is harmless)."""
    for name in list(os.environ):
        if name.startswith("TANDEM_") and name != "TANDEM_LINK_STATE":
            monkeypatch.delenv(name)


def parse_args(service: str):
    return importlib.import_module(SERVERS[service][0]).parse_args


def variable(service: str, flag: str) -> str:
    return SERVERS[service][1] + flag[2:].upper().replace("-", "_")


def error_line(parse, argv: list[str], capsys) -> str:
    """The one message line of a usage error (exit status 2)."""
    with pytest.raises(SystemExit) as exited:
        parse(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert ": error: " in lines[-1] and not any(": error: " in line for line in lines[:-1]), err
    return lines[-1]


@pytest.mark.parametrize("service,flag,value,argv", [
    ("edge", "--port", "abc", []),
    ("edge", "--max-batch", "abc", []),
    ("edge", "--min-image-side", "abc", []),  # optional: no default of its own
    ("edge", "--drain-seconds", "abc", []),
    ("edge", "--coalesce-ms", "abc", []),
    ("edge", "--coalesce-ms", "nan", []),  # the flag refuses NaN after parsing; so does the variable
    ("edge", "--max-growth", "nan", []),
    ("edge", "--max-streams-per-user", "-1", []),
    ("edge", "--coalesce-max-ms", "5", ["--coalesce-ms", "20"]),  # checked against another flag
    ("scheduler", "--port", "abc", []),
    ("scheduler", "--max-pending-per-user", "abc", []),
    ("scheduler", "--frame-ms", "abc", []),
    ("scheduler", "--frame-ms", "nan", []),
    ("scheduler", "--edge-ttl", "nan", []),
    ("scheduler", "--bandwidth-hz", "nan", []),
    ("scheduler", "--budget-headroom", "1.5", []),
    ("scheduler", "--polish-visits", "0", []),
    ("ue", "--port", "abc", []),
    ("ue", "--metrics-port", "1.5", []),
])
def test_a_bad_variable_fails_like_its_flag(monkeypatch, capsys, service, flag, value, argv):
    parse, name = parse_args(service), variable(service, flag)
    flag_line = error_line(parse, [*argv, flag, value], capsys)
    assert flag in flag_line
    monkeypatch.setenv(name, value)
    env_line = error_line(parse, argv, capsys)
    assert env_line == flag_line.replace(": error: ", f": error: {name}={value}: ", 1)


@pytest.mark.parametrize("service,flag,text,value,given,wins", [
    ("edge", "--port", "6000", 6000, "7000", 7000),
    ("edge", "--min-image-side", "64", 64, "96", 96),
    ("edge", "--coalesce-ms", "2.5", 2.5, "4", 4.0),
    ("edge", "--host", "0.0.0.0", "0.0.0.0", "::", "::"),
    ("scheduler", "--frame-ms", "5", 5.0, "8", 8.0),
    ("scheduler", "--max-pending-per-user", "3", 3, "4", 4),
    ("scheduler", "--edge", "a:1,b:2", ["a:1", "b:2"], "c:3", ["c:3"]),  # lists: comma-separated
    ("ue", "--port", "6001", 6001, "6002", 6002),
    ("ue", "--edge", "a:1, b:2", ["a:1", "b:2"], "c:3", ["c:3"]),
])
def test_a_good_variable_takes_effect_and_the_flag_wins(monkeypatch, service, flag, text, value, given, wins):
    parse, dest = parse_args(service), flag[2:].replace("-", "_")
    monkeypatch.setenv(variable(service, flag), text)
    parsed = getattr(parse([]), dest)
    assert parsed == value and type(parsed) is type(value)  # converted by the flag's type, plain str for text
    assert getattr(parse([flag, given]), dest) == wins


def test_the_flag_wins_over_a_bad_variable(monkeypatch):
    """argparse converts a default only when the flag is absent: an overridden variable is never read."""
    monkeypatch.setenv("TANDEM_EDGE_PORT", "abc")
    assert parse_args("edge")(["--port", "7000"]).port == 7000


@pytest.mark.parametrize("service,flag,value,argv", [
    ("edge", "--max-batch", "abc", ["--pack", "/nonexistent/pack"]),
    ("scheduler", "--frame-ms", "nan", ["--policy", "/nonexistent/policy"]),
    ("ue", "--metrics-port", "abc", ["--pack", "/nonexistent/pack"]),
])
def test_the_server_process_reports_one_line(service, flag, value, argv):
    """The real entry point (python -m ...): the variable fails while parsing, before any model
    loads (were it accepted, the pack or policy that does not exist would fail instead)."""
    module, name = SERVERS[service][0].rpartition(".")[0], variable(service, flag)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
    done = subprocess.run([sys.executable, "-m", module, "--port", "0", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(env, OMP_NUM_THREADS="1", **{name: value}))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert f": error: {name}={value}: " in line and flag in line


# --- the CLI: TANDEM_THREADS is --threads' variable; TANDEM_TLS_*/TANDEM_TOKEN are text --------

@pytest.mark.parametrize("value", ["abc", "0"])
def test_a_bad_tandem_threads_fails_like_the_flag(monkeypatch, capsys, tmp_path, value):
    argv = ["generate", "a red circle", "--out", str(tmp_path / "x.png")]
    flag_line = error_line(cli.main, [*argv, "--threads", value], capsys)
    assert flag_line.startswith("tandem: error: --threads: ")
    monkeypatch.setenv("TANDEM_THREADS", value)
    env_line = error_line(cli.main, argv, capsys)
    assert env_line == flag_line.replace("tandem: error: ", f"tandem: error: TANDEM_THREADS={value}: ", 1)


def test_cli_variables_take_effect_and_flags_win(monkeypatch):
    def parse(*argv: str):
        return cli.build_parser().parse_args(["generate", "x", *argv])

    monkeypatch.setenv("TANDEM_THREADS", "")  # empty is unset, as for every other command
    assert parse().threads is None
    monkeypatch.setenv("TANDEM_THREADS", "3")
    monkeypatch.setenv("TANDEM_TOKEN", "tok")
    assert (parse().threads, parse().token) == (3, "tok") and type(parse().token) is str
    assert (parse("--threads", "2").threads, parse("--token", "mine").token) == (2, "mine")
