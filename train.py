#!/usr/bin/env python
"""FAQD from the command line: `python train.py --config configs/quickstart.json` (see --help)."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _import_tensorflow_quietly():
    # TensorFlow's C++ runtime prints start-up notices ("Could not find cuda drivers", absl not
    # initialized) straight to file descriptor 2 while it loads, whatever TF_CPP_MIN_LOG_LEVEL says;
    # they would bury the one-line errors of this CLI. Python exceptions still surface.
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import keras  # noqa: F401
        import tensorflow as tf

        # The runtime's first device notices come with the first operation; a multi-worker run
        # (TF_CONFIG) must configure its collectives before any, so it skips this.
        if not os.environ.get("TF_CONFIG"):
            tf.constant(0.0)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


if __name__ == "__main__":
    _import_tensorflow_quietly()
    from faqd_tf.cli import main

    sys.exit(main())
