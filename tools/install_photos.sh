#!/usr/bin/env bash
# Install the Debian packages whose real photographs tools/make_photo_corpus.py cuts (root, Debian 12).
#
#   sudo bash tools/install_photos.sh              # every package below (about 1.4 GB installed)
#   sudo bash tools/install_photos.sh --list       # print the package names only
#
# Wallpaper and background packages (dozens of photographs among vector art and gradients, which
# tools/photo_finder.py drops), and three data packages with many more photographs: Stellarium's
# deep-sky images and landscape panoramas, OpenCV's sample pictures, Tux Paint's photo stamps.
# --no-install-recommends keeps desktops and their services out. Each package's licence is its
# /usr/share/doc/PACKAGE/copyright, which the finder records beside every photograph.
set -euo pipefail

PACKAGES=(
  gnome-backgrounds mate-backgrounds ukui-wallpapers
  lomiri-wallpapers lomiri-wallpapers-16.04 lomiri-wallpapers-20.04
  plasma-workspace-wallpapers sway-backgrounds desktop-base mypaint-data-extras
  stellarium-data opencv-doc tuxpaint-stamps-default
)

if [[ "${1:-}" == "--list" ]]; then
  printf '%s\n' "${PACKAGES[@]}"
  exit 0
fi
if [[ $EUID -ne 0 ]]; then
  echo "install_photos.sh: needs root (apt-get install)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"
echo "installed: ${PACKAGES[*]}"
