#!/usr/bin/env bash
# Checks the deployment artifacts without a Docker engine or a Kubernetes cluster:
#   (a) deploy/kubernetes: every manifest against the Kubernetes API schemas (1.30 and 1.37,
#       strict), the kustomization's resource list against the files present, the rendered
#       kustomization (kubectl kustomize, when kubectl is installed), and the references
#       between manifests (Secret and ConfigMap keys, selectors, ports, $(VAR)s, grace periods);
#   (b) compose.yaml against the Compose Specification's schema, and its references;
#   (c) the Dockerfile as written: runs the builder stage's RUN commands (the cargo build)
#       from the repository root, checks every file the runtime stage copies, runs each
#       binary's --version, checks .dockerignore keeps every source file the build read, and
#       runs the HEALTHCHECK against a coordinator and a comm server started from those
#       binaries on 127.0.0.1 with the ConfigMap's and compose's config files.
#
#   bash scripts/deploy_check.sh              # everything (the release build is the slow part)
#   bash scripts/deploy_check.sh --no-build   # (c) with the binaries already built
#   bash scripts/deploy_check.sh --only kubernetes,compose
#
# Python tools come from PyPI, pinned in scripts/deploy_check_requirements.txt, into a venv
# under target/ (DEPLOY_CHECK_VENV overrides); later runs reuse it and need no network.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${DEPLOY_CHECK_VENV:-target/deploy-check-venv}
req=scripts/deploy_check_requirements.txt
if [[ ! -x $venv/bin/python ]] || ! cmp -s "$req" "$venv/requirements.txt"; then
  echo "deploy_check: installing $req into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-input -r "$req"
  cp "$req" "$venv/requirements.txt"
fi
exec "$venv/bin/python" scripts/deploy_check.py "$@"
