#!/usr/bin/env bash
# Create .venv and install the project into it. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
.venv/bin/python -c "import pmd_pipeline, ray, img2dataset, torch" || { echo "setup.sh: install failed" >&2; exit 1; }
