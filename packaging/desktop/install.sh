#!/usr/bin/env bash
# Installs SpecChat for this user: the app, its entry in the application menu, its icon.
#
#   packaging/desktop/install.sh               from a checkout: installs the package with pipx, then the entry
#   desktop/install.sh                         inside a frozen bundle: the entry for the bundle's executable
#   install.sh --exec /path/to/specchat        the entry for a specchat installed some other way
#
# The package goes in with `pipx install --system-site-packages`, so that the window can use the
# distribution's GTK/WebKit bindings (Debian/Ubuntu: sudo apt install pipx python3-gi gir1.2-webkit2-4.1).
# The entry and the icons are written straight into the XDG folders ($XDG_DATA_HOME/applications and
# icons/hicolor), which every freedesktop menu watches: xdg-desktop-menu and xdg-icon-resource split
# paths with spaces and add legacy files (~/.gnome/apps, a dummy .menu). Nothing runs in a terminal:
# the entry starts the window. packaging/desktop/uninstall.sh takes it all out again.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
data_home="${XDG_DATA_HOME:-$HOME/.local/share}"
exec_path=""

usage() { sed -n '2,/^set /s/^# \{0,1\}//p' "$0"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --exec) exec_path="${2:?--exec needs the path of a specchat executable}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

# The desktop entry spec's Exec quoting: inside double quotes \ " ` $ take a backslash, then the value's
# own string escaping doubles every backslash; % is doubled for the field codes.
quote_exec_arg() {
  local arg="$1" out="" char i
  case "$arg" in *[[:cntrl:]]*) echo "install.sh: the path has a control character: $arg" >&2; exit 2 ;; esac
  for ((i = 0; i < ${#arg}; i++)); do
    char="${arg:i:1}"
    case "$char" in
      '\') out+='\\\\' ;;
      '"' | '`' | '$') out+="\\\\$char" ;;
      '%') out+='%%' ;;
      *) out+="$char" ;;
    esac
  done
  printf '"%s"' "$out"
}

# Menus notice the new files by themselves; the caches are refreshed where their tools are installed.
refresh_caches() {
  if command -v update-desktop-database >/dev/null 2>&1; then update-desktop-database -q "$1/applications" || true; fi
  if command -v gtk-update-icon-cache >/dev/null 2>&1 && [ -f "$1/icons/hicolor/index.theme" ]; then
    gtk-update-icon-cache -q -t "$1/icons/hicolor" || true
  fi
}

install_package() {
  local repo
  repo="$(cd "$here/../.." && pwd)"
  if ! command -v pipx >/dev/null 2>&1; then
    echo "install.sh: pipx is needed to install the package (Debian/Ubuntu: sudo apt install pipx)," >&2
    echo "            or give --exec with the path of an installed specchat" >&2
    exit 1
  fi
  echo "installing the specchat package with pipx (torch and gradio: a large download, once)"
  pipx install --force --system-site-packages "$repo" >&2
  local bin_dir
  bin_dir="$(pipx environment --value PIPX_BIN_DIR 2>/dev/null || echo "$HOME/.local/bin")"
  exec_path="$bin_dir/specchat"
}

if [ -z "$exec_path" ]; then
  if [ -x "$here/../specchat" ] && [ -f "$here/../specchat" ]; then
    exec_path="$(cd "$here/.." && pwd)/specchat"  # inside a frozen bundle: desktop/ sits beside the executable
  else
    install_package
  fi
fi
case "$exec_path" in /*) ;; *) exec_path="$(pwd)/$exec_path" ;; esac
[ -x "$exec_path" ] || { echo "install.sh: $exec_path is not an executable" >&2; exit 1; }

icons="$here/icons"
[ -d "$icons" ] || icons="$here/../../chatapp/assets"  # a checkout: the icons the package carries
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

exec_field="$(quote_exec_arg "$exec_path")"
while IFS= read -r line || [ -n "$line" ]; do
  if [ "$line" = "Exec=@EXEC@" ]; then printf 'Exec=%s\n' "$exec_field"; else printf '%s\n' "$line"; fi
done < "$here/specchat.desktop.in" > "$work/specchat.desktop"

for size in 48 128 256; do
  mkdir -p "$data_home/icons/hicolor/${size}x${size}/apps"
  cp "$icons/specchat-$size.png" "$data_home/icons/hicolor/${size}x${size}/apps/specchat.png"
done
mkdir -p "$data_home/icons/hicolor/scalable/apps" "$data_home/applications"
cp "$icons/specchat.svg" "$data_home/icons/hicolor/scalable/apps/specchat.svg"
cp "$work/specchat.desktop" "$data_home/applications/specchat.desktop"
refresh_caches "$data_home"
echo "installed $data_home/applications/specchat.desktop (starts $exec_path); find SpecChat in the application menu"
