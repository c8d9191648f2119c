#!/usr/bin/env bash
# All set-up on a fresh machine: the Fashion-MNIST and Chromium apt packages, a virtualenv in .venv,
# the pinned torch/torchvision pair (the only pair that installs from this machine's
# local disk; an unpinned torch pulls a multi-GB CUDA build from the network), and qcalib
# itself with its test extras. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_PINS="torch==2.14.1 torchvision==0.29.1"

# Debian packages: the Fashion-MNIST IDX files, and headless Chromium for the report's
# render test (tests/test_report.py).
apt_missing=""
[ -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || apt_missing="dataset-fashion-mnist"
command -v chromium >/dev/null 2>&1 || apt_missing="$apt_missing chromium"
if [ -n "$apt_missing" ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $apt_missing
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=".venv/.qcalib-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/pip install -q --disable-pip-version-check $TORCH_PINS 2>&1 | grep -v '^WARNING: Location' || true
    .venv/bin/pip install -q --disable-pip-version-check -e '.[vision,test]' 2>&1 | grep -v '^WARNING: Location' || true
    .venv/bin/python -c "import torch, torchvision, qcalib" # fail loudly if the install did not take
    echo "$want" > "$stamp"
fi
