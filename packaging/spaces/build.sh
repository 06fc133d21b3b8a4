#!/usr/bin/env bash
# Assemble a Hugging Face Space folder: packaging/spaces/build.sh [OUT]
# Push OUT to a Space repository with git or `huggingface-cli upload`.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
out="${1:-$root/dist/space}"
rm -rf "$out"
mkdir -p "$out"
cp -r "$root/chatapp" "$out/chatapp"
find "$out/chatapp" -name __pycache__ -prune -exec rm -rf {} +
cp "$root/main.py" "$root/settings.toml" "$root/requirements.txt" "$out/"
cp "$root/packaging/spaces/app.py" "$root/packaging/spaces/README.md" "$out/"
echo "Space folder ready: $out"
