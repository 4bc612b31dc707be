#!/usr/bin/env bash
# The one list of Debian packages ticketd's build, tests, demo and bench need.
# Installs only what is missing, so it is cheap to call from every script.
#
#   deps/install-packages.sh            everything: build, tests, demo, bench (the default)
#   deps/install-packages.sh --build    only what compiling ticketd needs (Dockerfile build stage)
#   deps/install-packages.sh --runtime  only the shared libraries the ticketd binary loads
#                                       (Dockerfile final stage)
set -euo pipefail
build_pkgs=(build-essential cmake pkg-config
            libuv1-dev libpq-dev librdkafka-dev libjson-c-dev libcurl4-openssl-dev node-llhttp
            libssl-dev  # SHA-256 (libcrypto): report.c, idempotency fingerprints
            python3-minimal)  # test/CMakeLists.txt looks for python3 when configuring
runtime_pkgs=(libuv1 libpq5 librdkafka1 libjson-c5 libcurl4 libssl3 ca-certificates)
case "${1:-}" in
  "")        pkgs=(build-essential cmake pkg-config clang
                   libuv1-dev libpq-dev librdkafka-dev libjson-c-dev libcurl4-openssl-dev node-llhttp
                   libssl-dev chromium
                   python3-jsonschema  # test_contracts.py: the OpenAPI / event schemas
                   postgresql-15 postgresql-client-15 kcat wrk python3 python3-aiosmtpd python3-yaml procps) ;;
  --build)   pkgs=("${build_pkgs[@]}") ;;
  --runtime) pkgs=("${runtime_pkgs[@]}") ;;
  *) echo "usage: $0 [--build|--runtime]" >&2; exit 2 ;;
esac
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq || true
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
