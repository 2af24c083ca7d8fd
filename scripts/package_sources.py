"""Where this host takes its packages from, read from its own configuration (never written into
the repository), for the local image bases and builds of scripts/compose_e2e.sh:

    python scripts/package_sources.py debian-mirror   # apt's Debian mirror for `debootstrap`
    python scripts/package_sources.py pip-index       # the index pip installs from

Each honours an override first (TANDEM_DEBIAN_MIRROR, TANDEM_PIP_INDEX). The Debian mirror is the
first apt source (deb822 `*.sources` or one-line `sources.list`) that serves the main archive of a
Debian suite (not -security); the pip index is PIP_INDEX_URL, then `pip config`'s index-url, then
pip's own default. Exit status 1 and one line on stderr when nothing is configured.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

APT_ROOT = Path(os.environ.get("TANDEM_APT_ROOT", "/etc/apt"))


Source = tuple[list[str], list[str], list[str]]  # URIs, suites, components


def _deb822_sources(text: str) -> list[Source]:
    """(URIs, Suites, Components) of each enabled `Types: deb` stanza."""
    found = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes").lower() != "no":
            found.append((fields.get("uris", "").split(), fields.get("suites", "").split(),
                          fields.get("components", "").split()))
    return found


def _one_line_sources(text: str) -> list[Source]:
    found = []
    for line in text.splitlines():
        words = [w for w in line.split("#", 1)[0].split() if not w.startswith("[")]
        if len(words) >= 3 and words[0] == "deb":
            found.append(([words[1]], [words[2]], words[3:]))
    return found


def debian_mirror() -> str | None:
    if os.environ.get("TANDEM_DEBIAN_MIRROR"):
        return os.environ["TANDEM_DEBIAN_MIRROR"]
    sources: list[Source] = []
    one_line = APT_ROOT / "sources.list"
    if one_line.is_file():
        sources += _one_line_sources(one_line.read_text())
    for path in sorted((APT_ROOT / "sources.list.d").glob("*.sources")):
        sources += _deb822_sources(path.read_text())
    for path in sorted((APT_ROOT / "sources.list.d").glob("*.list")):
        sources += _one_line_sources(path.read_text())
    for uris, suites, components in sources:
        # the main archive: a Debian suite's `main` (other vendors' repositories name their suite
        # after Debian's too, but not their component `main`; -security is a separate archive)
        if uris and "main" in components and any(s in DEBIAN_SUITES for s in suites):
            return uris[0]
    return None


DEBIAN_SUITES = {"bookworm", "trixie", "bullseye", "stable", "testing", "sid", "unstable", "oldstable"}


def pip_index() -> str:
    for name in ("TANDEM_PIP_INDEX", "PIP_INDEX_URL"):
        if os.environ.get(name):
            return os.environ[name]
    # `pip config list` prints every configured key in the order pip loads the files (site, user,
    # PIP_CONFIG_FILE as ":env:"), a later one overriding an earlier one
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    index = None
    for line in listed.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.split(".")[0] in ("global", "install", "download", ":env:") and key.endswith(".index-url"):
            index = value.strip().strip("'\"")
    if index:
        return index
    from pip._internal.models.index import PyPI  # pip's own default index

    return PyPI.simple_url


def main(argv: list[str]) -> int:
    if argv == ["debian-mirror"]:
        mirror = debian_mirror()
        if mirror is None:
            print(f"no Debian mirror in {APT_ROOT}'s sources: set TANDEM_DEBIAN_MIRROR", file=sys.stderr)
            return 1
        print(mirror)
        return 0
    if argv == ["pip-index"]:
        print(pip_index())
        return 0
    print("usage: package_sources.py debian-mirror|pip-index", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
