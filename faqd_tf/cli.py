"""The command line behind `train.py`: teacher -> (activation step) -> FAQD distillation -> evaluation.

    python train.py --config configs/cifar10.json                    # every stage still missing
    python train.py --config configs/cifar10.json --stage distill    # one stage
    python train.py --config configs/cifar10.json --set train.epochs=5 --overwrite
    python train.py --config configs/cifar10.json --tune --trials 20 # keras-tuner over the loss weights

A run killed at any moment resumes from its last finished epoch when started again with the same
command (`keras.callbacks.BackupAndRestore`). Finished outputs are not replaced without
`--overwrite`. Bad input ends with one line on stderr and exit code 2.
"""

import argparse
import os
import sys

from faqd_tf.report import write_json
from faqd_tf.runner import STAGES, Run, UsageError, _say

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see train.py --help)")


def build_parser():
    parser = _Parser(prog="train.py", description="FAQD: label-free quantization by feature-affinity distillation.")
    parser.add_argument("--config", required=True, help="JSON config file, e.g. configs/quickstart.json")
    parser.add_argument("--stage", choices=STAGES, default="all", help="stage to run (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.epochs=5 (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="replace finished outputs")
    parser.add_argument("--tune", action="store_true", help="search alpha, beta, gamma, temperature with keras-tuner")
    parser.add_argument("--trials", type=int, default=None, help="number of tuning trials (default: tune.trials)")
    parser.add_argument("--export", choices=["tflite", "packed"], action="append", default=[],
                        help="also export the student after evaluation (repeatable)")
    return parser


def run(argv=None):
    args = build_parser().parse_args(argv)
    from faqd_tf import config as config_module

    cfg = config_module.load(args.config, args.set)
    if args.tune and cfg["strategy"] == "multi_worker":
        raise UsageError('--tune runs its trials in one process; set strategy to "default" or "mirrored" for tuning.')
    runner = Run(cfg, overwrite=args.overwrite)
    if args.trials is not None and args.trials < 1:
        raise UsageError(f"--trials={args.trials} must be >= 1.")
    if args.tune:
        runner.preflight(["tune"])
        os.makedirs(runner.out, exist_ok=True)
        runner.tune(args.trials or cfg["tune"]["trials"])
        return 0
    stages = runner.plan(args.stage)
    runner.preflight(stages)

    if not stages:
        raise UsageError(f"every output of this run is in {runner.out} already; pass --overwrite to run it again.")
    import keras

    keras.utils.set_random_seed(cfg["seed"])
    os.makedirs(runner.out, exist_ok=True)
    write_json(os.path.join(runner.out, "config.json"), cfg)
    _say(f"output directory {runner.out}; stages: {', '.join(stages)}")
    for stage in stages:
        if stage == "teacher":
            runner.train_teacher()
        elif stage == "distill":
            runner.distill()
        elif runner.chief:
            runner.evaluate(args.export)
        else:
            _say("stage evaluate: left to the chief (worker 0), which writes results.json")
    return 0


def _peer_errors():
    if "tensorflow" not in sys.modules:  # nothing distributed ran
        return ()
    import tensorflow as tf

    return (tf.errors.UnavailableError, tf.errors.DeadlineExceededError)


def main(argv=None):
    from faqd_tf.callbacks import NonFiniteLossError
    from faqd_tf.config import ConfigError

    try:
        return run(argv)
    except _peer_errors() as e:
        # A worker died or stopped answering; the others' collectives fail with this.
        cause = str(getattr(e, "message", e)).split("aborted by: ")[-1].strip().splitlines()[0][:200]
        print(f"train.py: error: the multi-worker job lost a worker ({cause}); start every worker again with the same "
              "command to resume from the last backup.", file=sys.stderr)
        return 1
    except NonFiniteLossError as e:
        print(f"train.py: error: {e}; lower train.lr (or check the data), then run the same command to resume.",
              file=sys.stderr)
        return 1
    except (UsageError, ConfigError, FileNotFoundError, ValueError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"train.py: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("train.py: interrupted; run the same command again to resume from the last finished epoch.", file=sys.stderr)
        return 130
