"""Batch-1 latency of .tflite files by thread count, with and without LiteRT's XNNPACK delegate.

Separates the kernels a file runs in: XNNPACK (the default delegate) takes float and int8-hybrid
CONV_2D, but not INT4 filters, which run in LiteRT's builtin hybrid kernel. Every configuration
(file x threads x delegate) gets its own interpreter; all are timed interleaved in `--rounds`
rounds so that load on the shared machine hits them alike; the load average is printed.

    python benchmarks/tflite_threads.py /work/runs/deploy/resnet20_32x32x3_w4_{float,int8,int4}.tflite
"""

import argparse
import os
import sys

import numpy as np

if __name__ == "__main__":  # run as a script: this checkout's packages, not an installed copy
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import _harness  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=200, help="calls per configuration")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)

    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolvers = {
        "XNNPACK": OpResolverType.AUTO,
        "builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    }
    configs = []
    for path in args.files:
        for threads in args.threads:
            for name, resolver in resolvers.items():
                interpreter = Interpreter(
                    model_path=path, num_threads=threads, experimental_op_resolver_type=resolver
                )
                detail = interpreter.get_input_details()[0]
                interpreter.allocate_tensors()
                interpreter.set_tensor(
                    detail["index"], np.random.default_rng(0).random(detail["shape"], np.float32)
                )
                for _ in range(5):
                    interpreter.invoke()
                configs.append((os.path.basename(path), threads, name, interpreter))
    load = [os.getloadavg()[0]]
    timed = _harness.interleaved_times(
        [c[3].invoke for c in configs], args.rounds, -(-args.runs // args.rounds)
    )
    load.append(os.getloadavg()[0])
    command = "python benchmarks/tflite_threads.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    print(f"Command: `{command}`; load average {load[0]:.2f} before, {load[1]:.2f} after.\n")
    print("| file | threads | kernels | median ms | 90th percentile ms |")
    print("|---|---|---|---|---|")
    for (name, threads, resolver, _), times in zip(configs, timed):
        print(
            f"| {name} | {threads} | {resolver} | {1000 * np.median(times):.3f} "
            f"| {1000 * np.percentile(times, 90):.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
