#!/usr/bin/env bash
# The quickstart: installs what is missing, then trains a full-precision ResNet8 teacher on
# Fashion-MNIST, quantizes a copy to 4 bits, distills it label-free (KD + FA), and evaluates both.
# Outputs land in saved_models/quickstart/. Extra arguments go to train.py (e.g. --overwrite).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" train.py --config configs/quickstart.json "$@"
