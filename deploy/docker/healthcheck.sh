#!/bin/bash
# relaymesh-healthcheck [PORT [PATH]]: exits 0 when http://127.0.0.1:PORT/PATH answers 200.
#
# The image's HEALTHCHECK. The image has no curl, and neither coordinator nor commserver nor
# meshctl has a command that asks a comm server's /healthz, so this uses bash's /dev/tcp, which
# speaks enough HTTP/1.1 for a GET.
#   PORT: default $RELAYMESH_HEALTH_PORT, which the image sets to 7400 (the coordinator's
#         port); set RELAYMESH_HEALTH_PORT=7500 in a comm server's container.
#   PATH: default /healthz (the process serves); /readyz asks whether it should get traffic.
# Plain HTTP only: a listener with TLS (--tls-cert) needs another check (see deploy/README).
set -u
port=${1:-${RELAYMESH_HEALTH_PORT:-7400}}
path=${2:-/healthz}
if ! { exec 3<>"/dev/tcp/127.0.0.1/$port"; } 2>/dev/null; then
  echo "relaymesh-healthcheck: nothing listens on 127.0.0.1:$port" >&2
  exit 1
fi
printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1:%s\r\nConnection: close\r\n\r\n' "$path" "$port" >&3
if ! IFS= read -r -t 5 status <&3; then
  echo "relaymesh-healthcheck: no answer from 127.0.0.1:$port$path within 5 s" >&2
  exit 1
fi
status=${status%$'\r'}
case $status in
  "HTTP/1."?" 200 "*) exit 0 ;;
  *)
    echo "relaymesh-healthcheck: 127.0.0.1:$port$path answered \"$status\"" >&2
    exit 1
    ;;
esac
