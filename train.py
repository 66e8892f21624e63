#!/usr/bin/env python
"""FAQD from the command line: `python train.py --config configs/quickstart.json` (see --help)."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from faqd_tf.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
