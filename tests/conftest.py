"""Shared test set-up.

Two logical CPU devices are configured before TensorFlow initializes, so any test can build
`tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])`. Random data is fresh on every run; the
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
    # One strategy for the whole session: separately created MirroredStrategy objects in one
    # process can reuse collective instance keys, and synchronized BatchNormalization's
    # all-reduce then fails with "Shape mismatch in the collective instance".
    return tf.distribute.MirroredStrategy(CPU_DEVICES)
