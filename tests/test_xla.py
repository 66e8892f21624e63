"""`jit_compile=True`: every loss term compiles once (the batch is an input of the compiled step, not
a constant folded into it) and trains as the graph step does, on one and two replicas (issue 34)."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from faqd_tf import losses
from faqd_tf.distiller import Distiller
from faqd_tf.quantize import quantize_model
from tests.test_distiller import random_weights, tiny_net, weights_of

FORMS = {
    "gram": lambda t, s: losses.feature_affinity_per_sample(t, s, method="gram"),
    "pairwise": lambda t, s: losses.feature_affinity_per_sample(t, s, method="pairwise"),
    "tiled": lambda t, s: losses.feature_affinity_per_sample(t, s, method="pairwise", tile_rows=16),
    "l1": lambda t, s: losses.feature_affinity_per_sample(t, s, fa_norm="l1"),
    "fast": lambda t, s: losses.fast_feature_affinity_per_sample(t, s, k=3, seed=7),
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_the_maps_stay_inputs_of_the_compiled_gradient(rng, form):
    """A map that XLA asks for as a compile-time constant is folded into the program, which is then
    compiled anew for every batch: the step seems to hang (the gram form's fallback did this)."""
    t, s = (
        tf.constant(np.maximum(rng.normal(size=(4, 8, 8, 6)), 0).astype("float32"))
        for _ in range(2)
    )

    @tf.function(jit_compile=True)
    def loss_and_grad(t, s):
        with tf.GradientTape() as tape:
            tape.watch(s)
            loss = tf.reduce_sum(FORMS[form](t, s))
        return loss, tape.gradient(loss, s)

    hlo = loss_and_grad.experimental_get_compiler_ir(t, s)(stage="hlo")
    entry = hlo[hlo.index("ENTRY") :]
    assert sorted(set(re.findall(r"parameter\((\d+)\)", entry))) == ["0", "1"], entry[:2000]

    with tf.GradientTape() as tape:
        tape.watch(s)
        want = tf.reduce_sum(FORMS[form](t, s))
    got_loss, got_grad = loss_and_grad(t, s)
    np.testing.assert_allclose(got_loss.numpy(), want.numpy(), rtol=1e-4)
    np.testing.assert_allclose(
        got_grad.numpy(), tape.gradient(want, s).numpy(), rtol=1e-3, atol=1e-6
    )


def test_gaussian_probes_are_the_same_numbers_under_xla_and_standard_normal(seed):
    """The FFA probes of a seed do not depend on jit_compile (tf.random.stateless_normal's do), and
    they are standard normal: mean, variance and the two tails of 200,000 draws against N(0, 1)."""
    stateless = tf.constant([seed, 3], tf.int64)
    eager = losses.gaussian_probes([1, 200_000, 1], stateless).numpy().ravel()
    compiled = tf.function(lambda s: losses.gaussian_probes([1, 200_000, 1], s), jit_compile=True)(
        stateless
    )
    np.testing.assert_allclose(compiled.numpy().ravel(), eager, rtol=1e-5, atol=1e-5)
    n = eager.size
    assert abs(eager.mean()) < 5 / np.sqrt(n) and abs(eager.var() - 1) < 5 * np.sqrt(2 / n)
    # P(|z| > 2) = 0.0455 and P(|z| > 3) = 0.0027 for N(0, 1): within five binomial standard errors.
    for bound, p in ((2.0, 0.0455), (3.0, 0.0027)):
        assert abs(np.mean(np.abs(eager) > bound) - p) < 5 * np.sqrt(p * (1 - p) / n)


def _fit_twice(setup, replicas, mirrored_strategy, seed):
    """Two steps of the same Distiller (same weights, data order) without and with XLA."""
    rng = np.random.default_rng(seed)
    teacher = tiny_net(name="teacher")
    random_weights(teacher, rng)
    start = quantize_model(teacher, weight_bits=2, activation_bits=4)
    x = rng.normal(size=(16, 12, 12, 3)).astype(np.float32)
    y = rng.integers(0, 5, size=(16,))
    w = rng.uniform(0.5, 2.0, size=(16,)).astype(np.float32)
    strategy = mirrored_strategy if replicas == 2 else tf.distribute.get_strategy()
    results = []
    for jit in (False, True):
        with strategy.scope():
            t = tiny_net(name="teacher")
            t.set_weights(teacher.get_weights())
            student = quantize_model(t, weight_bits=2, activation_bits=4)
            student.set_weights(start.get_weights())
            distiller = Distiller(student, t, kd="kl", temperature=2.0, seed=3, **setup)
            if jit and replicas > 1:
                with pytest.warns(
                    UserWarning,
                    match="jit_compile=True is turned off under a strategy of 2 replicas",
                ):
                    distiller.compile(keras.optimizers.SGD(0.05, momentum=0.9), jit_compile=jit)
            else:
                distiller.compile(keras.optimizers.SGD(0.05, momentum=0.9), jit_compile=jit)
            assert distiller.jit_compile == (jit and replicas == 1)
        labeled = setup.get("gamma", 0) > 0
        history = distiller.fit(
            x,
            y if labeled else None,
            sample_weight=w if labeled else None,
            batch_size=8,
            epochs=1,
            verbose=0,
            shuffle=False,
        )
        results.append(({k: v[-1] for k, v in history.history.items()}, weights_of(student)))
    return results, start


SETUPS = {
    "exact+ce+weights": dict(fa="exact", beta=0.5, gamma=0.3),
    "gram": dict(fa="exact", fa_method="gram", beta=0.5),
    "fast": dict(fa="fast", ffa_k=4, beta=0.5),
    "l1+ce": dict(fa="exact", fa_norm="l1", beta=0.5, gamma=0.3),
}
FAST_CASES = [("exact+ce+weights", 2), ("fast", 1)]


@pytest.mark.parametrize(
    "setup, replicas",
    [
        *FAST_CASES,
        *(
            pytest.param(s, r, marks=pytest.mark.slow)
            for s in SETUPS
            for r in (1, 2)
            if (s, r) not in FAST_CASES
        ),
    ],
)
def test_jit_compiled_fit_trains_as_the_graph_step(setup, replicas, mirrored_strategy, seed):
    ((graph_logs, graph_weights), (xla_logs, xla_weights)), start = _fit_twice(
        SETUPS[setup], replicas, mirrored_strategy, seed
    )
    assert graph_logs.keys() == xla_logs.keys() and "fa" in graph_logs
    for name in graph_logs:
        np.testing.assert_allclose(
            xla_logs[name], graph_logs[name], rtol=1e-4, atol=1e-6, err_msg=name
        )
    for path in graph_weights:
        np.testing.assert_allclose(
            xla_weights[path], graph_weights[path], rtol=1e-4, atol=1e-5, err_msg=path
        )
    assert any(not np.allclose(graph_weights[v.path], v.numpy()) for v in start.weights), (
        "the steps changed nothing"
    )
