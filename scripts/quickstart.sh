#!/usr/bin/env bash
# The quickstart: installs what is missing, then trains a full-precision ResNet8 teacher on
# Fashion-MNIST, quantizes a copy to 4 bits, distills it label-free and evaluates both. At 4 bits from
# the teacher's weights FA does not pay (docs/results.md, issue 24), so the quickstart distils with KD
# only; --set distill.fa=exact runs FAQD (KD + FA).
# Outputs land in saved_models/quickstart/. Extra arguments go to train.py (e.g. --overwrite).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" train.py --config configs/quickstart.json "$@"
