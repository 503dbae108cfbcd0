#!/usr/bin/env bash
# The GPU study in one command (benchmarks/gpu_study.py; how to run it: benchmarks/README.md).
#
#   benchmarks/gpu_study.sh OUT [--data DIR] [--budget SECONDS] [--work DIR] [--wheels DIR]
#   benchmarks/gpu_study.sh OUT --dry-run [--data DIR]      # every part, tiny, on the CPU
#
# Runs from the source tree (PYTHONPATH), without installing the project. Wheels found in
# --wheels (default: .whl/ in the checkout) are installed first into a folder of their own,
# for a machine that lacks some of the project's dependencies and cannot download them.
# PYTHON names the interpreter (default: python3).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
wheels="$root/.whl"
args=()
while (($#)); do
  case "$1" in
    --wheels) wheels="$2"; shift 2 ;;
    --wheels=*) wheels="${1#--wheels=}"; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
if [[ ${#args[@]} -eq 0 || "${args[0]}" == -* && "${args[0]}" != "-h" && "${args[0]}" != "--help" ]]; then
  echo "usage: benchmarks/gpu_study.sh OUT [--dry-run] [--data DIR] [--budget SECONDS] [--work DIR] [--wheels DIR]" >&2
  exit 2
fi

pythonpath="$root"
if compgen -G "$wheels/*.whl" >/dev/null; then
  site="${TMPDIR:-/tmp}/scse_gpu_study_site"
  rm -rf "$site"
  echo "[gpu_study.sh] installing $(ls "$wheels"/*.whl | wc -l) wheels from $wheels into $site"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl
  pythonpath="$site:$root"
fi
export PYTHONPATH="$pythonpath${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

missing="$("$python" -c '
import importlib.util

def present(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False

names = ("jax", "flax", "optax", "orbax.checkpoint", "numpy", "scipy", "PIL", "matplotlib", "absl",
         "pydicom", "ml_collections", "tensorboardX", "nibabel")
print(" ".join(name for name in names if not present(name)))
')"
if [[ -n "$missing" ]]; then
  echo "gpu_study.sh: $python lacks: $missing. Bring their wheels in $wheels (benchmarks/README.md)." >&2
  exit 2
fi

exec "$python" "$root/benchmarks/gpu_study.py" --python "$python" "${args[@]}"
