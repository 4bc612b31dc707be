#!/usr/bin/env bash
# The one list of Debian packages ticketd's build, tests, demo and bench need.
# Installs only what is missing, so it is cheap to call from every script.
set -euo pipefail
pkgs=(build-essential cmake pkg-config clang
      libuv1-dev libpq-dev librdkafka-dev libjson-c-dev libcurl4-openssl-dev node-llhttp
      postgresql-15 postgresql-client-15 kcat wrk python3 python3-aiosmtpd python3-yaml procps)
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
