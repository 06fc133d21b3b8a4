#!/usr/bin/env bash
# Renders SpecChat's icon (chatapp/assets/specchat.svg) to the PNG sizes the desktop entry installs.
# The PNGs are committed; run this after editing the SVG. Needs rsvg-convert (Debian: librsvg2-bin).
set -euo pipefail
assets="$(cd "$(dirname "$0")/../../chatapp/assets" && pwd)"
out="${1:-$assets}"
for size in 48 128 256; do
  rsvg-convert --width "$size" --height "$size" "$assets/specchat.svg" --output "$out/specchat-$size.png"
done
echo "rendered $out/specchat-{48,128,256}.png"
