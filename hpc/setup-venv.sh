#!/usr/bin/env bash
# Create or refresh the project's virtual environment in .venv (idempotent).
#
# Re-running is cheap: the install step is skipped while pyproject.toml is unchanged.
# On a cluster, run this once on a login node (it needs the package index), then
# point jobs at the same .venv on shared storage; see hpc/README.md.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${WBS_VENV:-$root/.venv}"
python="${PYTHON:-python3}"

if [[ ! -x "$venv/bin/python" ]]; then
    echo "[setup] creating $venv" >&2
    "$python" -m venv "$venv"
fi
stamp="$venv/.wbs-dist-installed"
want="$(cat "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && "$venv/bin/python" -c "import wbs_dist" 2>/dev/null; then
    echo "[setup] $venv is up to date" >&2
    exit 0
fi
echo "[setup] installing wbs-dist and its dependencies into $venv (first time: a few minutes)" >&2
"$venv/bin/python" -m pip install -q --upgrade pip
# torch and torchvision first, from the pinned pair known to import together (DESIGN section 4).
"$venv/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
"$venv/bin/python" -m pip install -q -e "$root[test]"
echo "$want" > "$stamp"
echo "[setup] done" >&2
