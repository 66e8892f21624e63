#!/usr/bin/env python
"""FAQD from the command line: `python train.py --config configs/quickstart.json` (see --help).

The same command as the installed `faqd-tf` (`faqd_tf.cli.main`), run from a checkout.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__":
    from faqd_tf.cli import main

    sys.exit(main())
