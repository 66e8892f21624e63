"""Shared test set-up.

Two logical CPU devices are configured before TensorFlow initializes, so any test can build
a two-replica `MirroredStrategy` (the `mirrored_strategy` fixture). Random data is fresh on every run; the
seed is printed with a failing test's report so the failure can be replayed with FAQD_TEST_SEED.
"""

import os

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
