#!/usr/bin/env bash
# Installs what faqd-tf needs on this machine: the Python packages (CUDA build where an NVIDIA
# driver is present, CPU build otherwise; FAQD_CUDA=1/0 forces the choice), the package itself
# (editable), and, where apt-get exists and the files are absent, the Fashion-MNIST IDX files
# used by the quickstart and the real-data tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ "${FAQD_CUDA:-}" = "1" ] || { [ -z "${FAQD_CUDA:-}" ] && command -v nvidia-smi >/dev/null 2>&1; }; then
    reqs=requirements.txt
else
    reqs=requirements-cpu.txt
fi
echo "[install] python packages from $reqs"
"$PY" -m pip install -q -r "$reqs"
"$PY" -m pip install -q --no-deps -e .

FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
        echo "[install] Debian package dataset-fashion-mnist"
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
    else
        echo "[install] Fashion-MNIST IDX files not found in $FMNIST and apt-get is not usable here;"
        echo "          install the Debian package dataset-fashion-mnist, or point the config at idx:<folder>."
    fi
fi
