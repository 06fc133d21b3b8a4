#!/usr/bin/env bash
# Takes out what install.sh put in for this user: the menu entry and the icons, and with --package the
# pipx-installed package too. Conversations and settings stay (see the end of the output).
#
#   packaging/desktop/uninstall.sh [--package]
set -euo pipefail

data_home="${XDG_DATA_HOME:-$HOME/.local/share}"
package=false
case "${1:-}" in
  --package) package=true ;;
  "") ;;
  -h|--help) sed -n '2,/^set /s/^# \{0,1\}//p' "$0"; exit 0 ;;
  *) echo "uninstall.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
esac

rm -f "$data_home/applications/specchat.desktop" "$data_home/icons/hicolor/scalable/apps/specchat.svg"
for size in 48 128 256; do
  rm -f "$data_home/icons/hicolor/${size}x${size}/apps/specchat.png"
done
if command -v update-desktop-database >/dev/null 2>&1 && [ -d "$data_home/applications" ]; then
  update-desktop-database -q "$data_home/applications" || true
fi

if $package && command -v pipx >/dev/null 2>&1; then
  pipx uninstall specchat || true
fi
echo "removed SpecChat's menu entry and icons"
echo "kept your conversations in ${XDG_DATA_HOME:-$HOME/.local/share}/specchat and settings in" \
     "${XDG_CONFIG_HOME:-$HOME/.config}/specchat (delete those folders to remove them)"
