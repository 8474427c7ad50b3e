#!/usr/bin/env bash
# Batch runs of train_network.py over a grid of config overrides, with a side-by-side summary.
#   bash tools/sweep.sh BASE.toml network_dim=8,16 learning_rate=1e-4,5e-5 [--dry-run]
# Thin wrapper: the logic is tools/sweep.py (python tools/sweep.py --help).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -x "$REPO/.venv/bin/python" ]; then
    PY="$REPO/.venv/bin/python"
else
    PY="$(command -v python3 || command -v python)"
fi
# exec: the sweep receives Ctrl-C itself and forwards it to the running training.
exec "$PY" "$REPO/tools/sweep.py" "$@"
