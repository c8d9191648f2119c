#!/usr/bin/env bash
# README's picture (docs/report-screenshot.png), from the repository root:
#   bash examples/report-demo/make.sh
# Four experiment files x 3 seeds (the reference ResNet-20, about 10 minutes on 2 CPU
# cores), one report, and a screenshot of the report's top by headless Chromium.
set -euo pipefail
for f in examples/report-demo/*.yaml; do .venv/bin/qcalib run "$f"; done
.venv/bin/qcalib report runs/report-demo/w* --out runs/report-demo/report.html
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --no-first-run \
    --user-data-dir="$(mktemp -d)" --window-size=1280,2400 \
    --screenshot="$PWD/docs/report-screenshot.png" "file://$PWD/runs/report-demo/report.html"
