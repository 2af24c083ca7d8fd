#!/usr/bin/env bash
# Puts promtool (for the static check of deploy/prometheus/prometheus.yml) into .venv/bin, taken
# from Debian's `prometheus` package without installing it (no daemon, no users created).
# Best effort: if it cannot, it says why and the test that needs promtool skips, naming this script.
set -uo pipefail
cd "$(dirname "$0")/.."
if command -v promtool >/dev/null 2>&1 || [ -x .venv/bin/promtool ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
  echo "deploy_tools: no apt-get/dpkg-deb here; promtool checks will skip" >&2
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
fetch() { (cd "$work" && apt-get download prometheus >/dev/null 2>&1); }
if ! fetch && [ "$(id -u)" = 0 ]; then
  apt-get update >/dev/null 2>&1 || true
  fetch || true
fi
deb="$(ls "$work"/prometheus_*.deb 2>/dev/null | head -1)"
if [ -z "$deb" ]; then
  echo "deploy_tools: could not download Debian's prometheus package; promtool checks will skip" >&2
  exit 0
fi
dpkg-deb -x "$deb" "$work/x" && mkdir -p .venv/bin && cp "$work/x/usr/bin/promtool" .venv/bin/promtool \
  && echo "deploy_tools: installed $(.venv/bin/promtool --version 2>&1 | head -1) into .venv/bin" >&2
exit 0
