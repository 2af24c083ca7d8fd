#!/bin/sh
# Build-stage installer shared by deploy/*.Dockerfile: puts torch and the project's dependencies
# into the virtualenv /opt/venv, which the final stage copies (the project runs from its sources in
# /app). Two steps, so each is its own cached layer:
#   pip_install.sh torch          torch from TORCH_SOURCE
#   pip_install.sh deps EXTRA     the dependencies of ".[EXTRA]", keyed on pyproject.toml alone
# Build args read from the environment:
#   TORCH_SOURCE   base       torch is in the base image already (the CUDA edge image)
#                  wheelhouse torch==$TORCH_VERSION from /build/wheelhouse (air-gapped hosts)
#                  URL        a package index holding torch==$TORCH_VERSION (the CPU index)
#   EXTRA_CA_CERT  PEM text of CAs to trust besides the system ones (a TLS-intercepting proxy);
#                  used for this build stage only: it never reaches the final image.
#   PIP_INDEX      the package index to install from (the build host's, as compose_e2e.sh
#                  reads it); empty: pip's default
set -eu
VENV=/opt/venv
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
    # system site-packages: a base image's own torch (the CUDA base) satisfies the project's range
    python3 -m venv --system-site-packages "$VENV"
fi
pip() { "$VENV/bin/python" -m pip "$@"; }
if [ -n "${PIP_INDEX:-}" ]; then export PIP_INDEX_URL="$PIP_INDEX"; fi

if [ -n "${EXTRA_CA_CERT:-}" ]; then
    bundle=/tmp/ca-bundle.pem
    # the CAs pip trusts already (its certifi, else the system's), then the extra ones
    system_cas="$("$VENV/bin/python" -c 'import pip._vendor.certifi as c; print(c.where())' 2>/dev/null \
        || echo /etc/ssl/certs/ca-certificates.crt)"
    cat "$system_cas" > "$bundle" 2>/dev/null || : > "$bundle"
    printf '%s\n' "$EXTRA_CA_CERT" >> "$bundle"
    export PIP_CERT="$bundle"
fi

case "${1:-}" in
    torch)
        case "${TORCH_SOURCE:?TORCH_SOURCE is unset: base, wheelhouse or an index URL}" in
            base)
                "$VENV/bin/python" -c "import torch" \
                    || { echo "TORCH_SOURCE=base but the base image has no torch" >&2; exit 1; } ;;
            wheelhouse)
                ls /build/wheelhouse/torch-"$TORCH_VERSION"*.whl >/dev/null 2>&1 || {
                    echo "TORCH_SOURCE=wheelhouse but wheelhouse/ holds no torch-$TORCH_VERSION wheel:" \
                         "run 'pip download torch==$TORCH_VERSION --no-deps -d wheelhouse/' first" >&2
                    exit 1; }
                # the wheel from disk, its own small dependencies from the index
                pip install --no-deps --no-index --find-links /build/wheelhouse "torch==$TORCH_VERSION"
                pip install "torch==$TORCH_VERSION" --find-links /build/wheelhouse ;;
            *)
                pip install --index-url "$TORCH_SOURCE" "torch==$TORCH_VERSION" ;;
        esac ;;
    deps)
        # an empty README: the layer depends on pyproject.toml alone, not on the docs
        touch /src/README.md
        pip install "/src[${2:?which extra}]"
        pip uninstall -y tandem ;;
    *)
        echo "usage: pip_install.sh torch|deps EXTRA" >&2
        exit 2 ;;
esac
rm -f /tmp/ca-bundle.pem
