"""The host checks of scripts/compose_e2e.sh on their own (issue 25): the host-network snapshot
reports a link or an iptables rule left behind, and does not report iptables appearing with only
its default policies (what installing docker.io does on a fresh machine); the package sources come
from the host's own apt and pip configuration, never from a literal in the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NET_STATE = ROOT / "scripts" / "lib" / "net_state.sh"
PACKAGE_SOURCES = ROOT / "scripts" / "package_sources.py"
BASH = shutil.which("bash") or "/bin/bash"


def snapshot(path: str, netns: str | None = None) -> str:
    command = [BASH, "-c", f". {NET_STATE}; net_state"]
    if netns:
        command = ["ip", "netns", "exec", netns, *command]
    return subprocess.run(command, capture_output=True, text=True, check=True, env=dict(os.environ, PATH=path)).stdout


def changed(tmp_path: Path, before: str, after: str) -> tuple[bool, str]:
    (tmp_path / "before.txt").write_text(before)
    (tmp_path / "after.txt").write_text(after)
    done = subprocess.run(["bash", "-c", f'. {NET_STATE}; net_state_changed "$0" "$1"',
                           str(tmp_path / "before.txt"), str(tmp_path / "after.txt")], capture_output=True, text=True)
    return done.returncode == 0, done.stdout


def bin_dir(tmp_path: Path, name: str, iptables_prints: str | None) -> str:
    """A PATH holding only what net_state runs, plus a fake iptables printing `iptables_prints`."""
    folder = tmp_path / name
    folder.mkdir()
    for tool in ("sysctl", "ip", "awk", "sort", "sed", "grep", "cmp", "diff", "cat"):
        found = shutil.which(tool)
        if found:
            (folder / tool).symlink_to(found)
    if iptables_prints is not None:
        fake = folder / "iptables"
        fake.write_text(f"#!/bin/sh\n[ \"$2\" = filter ] && printf '%s' '{iptables_prints}'\nexit 0\n")
        fake.chmod(0o755)
    return str(folder)


DEFAULTS = "-P INPUT ACCEPT\n-P FORWARD ACCEPT\n-P OUTPUT ACCEPT\n"


def test_iptables_installed_with_its_defaults_is_no_change(tmp_path):
    absent = snapshot(bin_dir(tmp_path, "absent", None))
    defaults = snapshot(bin_dir(tmp_path, "defaults", DEFAULTS))
    assert absent == defaults
    assert changed(tmp_path, absent, defaults) == (False, "")


@pytest.mark.parametrize("left_behind", ["-P FORWARD DROP\n", "-N DOCKER\n", "-A FORWARD -j DOCKER-USER\n"])
def test_a_rule_or_policy_left_behind_is_reported(tmp_path, left_behind):
    before = snapshot(bin_dir(tmp_path, "before", None))
    after = snapshot(bin_dir(tmp_path, "after", DEFAULTS.replace("-P FORWARD ACCEPT\n", "") + left_behind))
    is_changed, diff = changed(tmp_path, before, after)
    assert is_changed and f"> filter: {left_behind.strip()}" in diff


def _netns_available() -> str | None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return "needs root and iproute2"
    return None


@pytest.mark.skipif(_netns_available() is not None, reason=f"{_netns_available()}")
def test_a_link_left_behind_is_reported_in_a_namespace_of_its_own(tmp_path):
    netns = f"tandem-netstate-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        path = os.environ["PATH"]
        before = snapshot(path, netns)
        subprocess.run(["ip", "netns", "exec", netns, "ip", "link", "add", "left0", "type", "veth",
                        "peer", "name", "left1"], check=True)
        after = snapshot(path, netns)
        is_changed, diff = changed(tmp_path, before, after)
        assert is_changed and "> left0" in diff
        subprocess.run(["ip", "netns", "exec", netns, "ip", "link", "del", "left0"], check=True)
        assert changed(tmp_path, before, snapshot(path, netns)) == (False, "")
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=True)
    assert netns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


# --- package sources ------------------------------------------------------------------------------

def sources(tmp_path: Path, what: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TANDEM_", "PIP_INDEX"))}
    return subprocess.run([sys.executable, str(PACKAGE_SOURCES), what], capture_output=True, text=True,
                          env=dict(clean, TANDEM_APT_ROOT=str(tmp_path / "apt"), **env))


def apt_root(tmp_path: Path, sources_list: str = "", **deb822: str) -> None:
    (tmp_path / "apt" / "sources.list.d").mkdir(parents=True)
    (tmp_path / "apt" / "sources.list").write_text(sources_list)
    for name, text in deb822.items():
        (tmp_path / "apt" / "sources.list.d" / f"{name}.sources").write_text(text)


def test_the_debian_mirror_is_apts_main_archive_not_security_nor_another_vendor(tmp_path):
    apt_root(tmp_path,
             "deb [arch=amd64] https://vendor.example/linux/debian bookworm stable\n",
             debian=("Types: deb\nURIs: http://security.mirror.example/debian-security\n"
                     "Suites: bookworm-security\nComponents: main\n\n"
                     "Types: deb\n# a comment\nURIs: http://mirror.example/debian\n"
                     "Suites: bookworm bookworm-updates\nComponents: main contrib\n"))
    done = sources(tmp_path, "debian-mirror")
    assert done.returncode == 0 and done.stdout.strip() == "http://mirror.example/debian"


def test_a_one_line_source_is_read_and_the_override_wins(tmp_path):
    apt_root(tmp_path, "# old style\ndeb http://old.mirror.example/debian bookworm main\n")
    assert sources(tmp_path, "debian-mirror").stdout.strip() == "http://old.mirror.example/debian"
    override = sources(tmp_path, "debian-mirror", TANDEM_DEBIAN_MIRROR="http://mine.example/debian")
    assert override.stdout.strip() == "http://mine.example/debian"


def test_no_debian_mirror_configured_says_what_to_set(tmp_path):
    apt_root(tmp_path)
    done = sources(tmp_path, "debian-mirror")
    assert done.returncode == 1 and "set TANDEM_DEBIAN_MIRROR" in done.stderr and done.stdout == ""


def test_the_pip_index_is_the_configured_one(tmp_path):
    config = tmp_path / "pip.conf"
    config.write_text("[global]\nindex-url = http://index.example/simple\n")
    assert sources(tmp_path, "pip-index", PIP_CONFIG_FILE=str(config)).stdout.strip() == "http://index.example/simple"
    assert sources(tmp_path, "pip-index", PIP_CONFIG_FILE=str(config),
                   TANDEM_PIP_INDEX="http://override.example/simple").stdout.strip() == "http://override.example/simple"
    default = sources(tmp_path, "pip-index", PIP_CONFIG_FILE=os.devnull).stdout.strip()
    from pip._internal.models.index import PyPI

    assert default == PyPI.simple_url


def test_no_debian_mirror_nor_python_index_is_written_into_the_repository():
    from pip._internal.models.index import PyPI

    hosts = [".".join(("deb", "debian", "org")), PyPI.netloc]  # spelt apart: this file is tracked too
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    found = [f"{name}: {host}" for name in tracked if (ROOT / name).is_file()
             for host in hosts if host in (ROOT / name).read_text(errors="replace")]
    assert found == []
