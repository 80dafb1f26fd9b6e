#!/usr/bin/env bash
# Debian packages some tests use (a real Prometheus Alertmanager, headless Chromium for the
# dashboard). Installed when missing and we are root with apt-get; otherwise say what is missing
# and carry on (the tests then report it clearly).
set -euo pipefail
missing=()
command -v prometheus-alertmanager >/dev/null 2>&1 || missing+=(prometheus-alertmanager)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${missing[*]} (Debian packages)..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "warning: ${missing[*]} missing and cannot be installed here (needs root and apt-get)" >&2
fi
