# Sourced by tools/test.sh and tools/course.sh: make (or reuse) the virtual environment .venv
# with the exact versions in constraints.txt. Re-installs only when the requirement files change.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${COURSE_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating virtual environment $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.course-installed"
WANT="$(cat "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" "$ROOT/constraints.txt" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  echo "installing the pinned stack into $VENV (a few minutes the first time)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -c "$ROOT/constraints.txt" -r "$ROOT/requirements-dev.txt"
  "$VENV/bin/python" -m pip install -q --no-deps -e "$ROOT"  # the course's utils, importable everywhere
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export COURSE_PROFILE="${COURSE_PROFILE:-tiny}"
export HF_HUB_DISABLE_TELEMETRY=1
# Offline by design: nothing in the tiny profile or the tests may reach the Hugging Face Hub.
if [ "$COURSE_PROFILE" = "tiny" ]; then
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
fi
cd "$ROOT"
