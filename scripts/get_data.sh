#!/usr/bin/env bash
# Installs Debian's dataset-fashion-mnist (the four original .gz files under
# /usr/share/datasets/fashion-mnist, where i2x.data finds them without configuration).
# Needs root or sudo; exits non-zero when it cannot install.
set -euo pipefail
if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "get_data: need root or sudo to apt-get install dataset-fashion-mnist" >&2; exit 1; }
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null \
  || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; }
echo "get_data: installed dataset-fashion-mnist under /usr/share/datasets/fashion-mnist"
