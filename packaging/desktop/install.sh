#!/usr/bin/env bash
# Adds "Speculative Chat" to the desktop's application menu (Linux, freedesktop).
# Usage: packaging/desktop/install.sh [APPLICATIONS_DIR]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
apps="${1:-${XDG_DATA_HOME:-$HOME/.local/share}/applications}"
mkdir -p "$apps"
sed "s|@LAUNCHER@|$here/specchat-launcher.sh|" "$here/specchat.desktop.in" > "$apps/specchat.desktop"
chmod +x "$apps/specchat.desktop"
echo "installed $apps/specchat.desktop"
