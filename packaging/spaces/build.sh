#!/usr/bin/env bash
# Assemble a Hugging Face Space folder: packaging/spaces/build.sh [--cpu-only] [OUT]   (OUT: dist/space)
# Then push OUT to a Gradio Space (the folder's README.md says how): hf upload USER/SPACE OUT . --repo-type space
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
# Any Python 3.11+ builds it (standard library only); the project's own when there is one.
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$root/.venv/bin/python" ]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
exec "$python" "$root/packaging/spaces/build_space.py" "$@"
