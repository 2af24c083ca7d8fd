#!/usr/bin/env bash
# Development certificates for Tandem's TLS/mTLS (never for production):
#   scripts/dev_certs.sh OUT_DIR
# writes ca.pem/ca.key (a throw-away CA), server.pem/server.key (for localhost and 127.0.0.1)
# and client.pem/client.key (a client certificate, CN "tandem-client"), all signed by the CA.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
out=$1
command -v openssl >/dev/null || { echo "dev_certs.sh: error: openssl is not installed" >&2; exit 1; }
mkdir -p "$out"
cd "$out"
days=825  # the longest validity some TLS clients accept for a leaf certificate

# EC P-256: as safe as RSA-3072 for a dev setup and generated instantly.
newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; chmod 600 "$1"; }

newkey ca.key
openssl req -x509 -new -key ca.key -sha256 -days "$days" -subj "/CN=Tandem development CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.pem

leaf() {  # leaf NAME CN EXTENSIONS
    newkey "$1.key"
    openssl req -new -key "$1.key" -subj "/CN=$2" -out "$1.csr"
    printf '%s\n' "$3" > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -sha256 -days "$days" \
        -extfile "$1.ext" -out "$1.pem" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
}

leaf server localhost "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1"
leaf client tandem-client "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
rm -f ca.srl
echo "wrote $(pwd)/{ca,server,client}.{pem,key}"
