"""Shared test set-up.

Two logical CPU devices are configured before TensorFlow initializes, so any test can build
a two-replica `MirroredStrategy` (the `mirrored_strategy` fixture). Random data is fresh on every run; the
seed is printed with a failing test's report so the failure can be replayed with FAQD_TEST_SEED.
"""

import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np
import pytest
import tensorflow as tf

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)

CPU_DEVICES = ["/cpu:0", "/cpu:1"]


@pytest.fixture
def seed(request):
    value = int(os.environ.get("FAQD_TEST_SEED", np.random.SeedSequence().entropy % (2**31)))
    request.node.user_properties.append(("seed", value))
    return value


@pytest.fixture
def rng(seed):
    return np.random.default_rng(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for key, value in item.user_properties:
            if key == "seed":
                report.sections.append(("random seed", f"FAQD_TEST_SEED={value}"))


@pytest.fixture(scope="session")
def mirrored_strategy():
    # The process's one mirrored strategy, as the CLI gets it: separately created MirroredStrategy
    # objects in one process reuse collective instance keys, and an all-reduce then fails with
    # "Shape mismatch in the collective instance" (faqd_tf.distribute.get_strategy).
    from faqd_tf import distribute

    strategy = distribute.get_strategy("mirrored")
    assert strategy.num_replicas_in_sync == len(CPU_DEVICES), strategy.extended.worker_devices
    return strategy


_BFLOAT16_PROBE = """
import tensorflow as tf
x, k = tf.ones((1, 8, 8, 3), tf.bfloat16), tf.ones((3, 3, 3, 4), tf.bfloat16)
tf.nn.conv2d(x, k, 1, "SAME")
tf.function(lambda a, b: tf.matmul(a, b))(tf.ones((2, 6), tf.bfloat16), tf.ones((6, 4), tf.bfloat16))
"""


@pytest.fixture(scope="session")
def bfloat16_kernels():
    """Skips a test unless this CPU's kernels run bfloat16 convolutions and matmuls.

    Capped below AVX-512 (`ONEDNN_MAX_CPU_ISA=AVX2`, the kernels of a CPU without it), oneDNN has
    no bfloat16 convolution ("could not create a primitive descriptor") and its bfloat16 matmul
    crashes the process, while TensorFlow, reading the CPU's own features, still sends bfloat16 to
    oneDNN. The probe runs in a subprocess so that a crash costs only the probe.
    """
    proc = subprocess.run(
        [sys.executable, "-c", _BFLOAT16_PROBE], capture_output=True, text=True, timeout=120
    )
    if proc.returncode != 0:
        isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "the CPU's default")
        pytest.skip(
            f"this CPU's kernels ({isa}) do not run bfloat16 (probe exit code {proc.returncode})"
        )
