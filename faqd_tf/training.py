"""Training pieces shared by the CLI, the benchmarks and user code: the optimizer of a config, a
model save that neither a kill nor a full disk leaves half-written."""

import sys
from typing import TYPE_CHECKING

from faqd_tf.atomic import PARTIAL, written_aside

if TYPE_CHECKING:
    import keras
    import tensorflow as tf


def make_optimizer(train: dict, steps_per_epoch: int) -> "keras.optimizers.Optimizer":
    """The optimizer of a resolved `train` config section (SGD or AdamW, cosine or constant lr).

    >>> from faqd_tf.config import resolve_section
    >>> opt = make_optimizer(resolve_section("train", {"optimizer": "adam", "lr": 3e-4, "epochs": 2}), 50)
    >>> type(opt).__name__, round(float(opt.learning_rate), 6)
    ('AdamW', 0.0003)
    """
    import keras

    total = max(1, train["epochs"] * steps_per_epoch)
    lr = train["lr"]
    if train["schedule"] == "cosine":
        warmup = train["warmup_epochs"] * steps_per_epoch
        lr = keras.optimizers.schedules.CosineDecay(
            0.0 if warmup else lr,
            decay_steps=max(1, total - warmup),
            warmup_target=lr if warmup else None,
            warmup_steps=warmup,
        )
    clip = train.get("global_clipnorm")
    clip = None if clip is None else float(clip)
    if train["optimizer"] == "adam":
        # AdamW takes a float (0.0 is plain Adam); SGD takes None for no decay.
        return keras.optimizers.AdamW(
            lr, weight_decay=float(train["weight_decay"]), global_clipnorm=clip
        )
    return keras.optimizers.SGD(
        lr,
        momentum=float(train["momentum"]),
        nesterov=train["nesterov"],
        weight_decay=train["weight_decay"] or None,
        global_clipnorm=clip,
    )


def progress_verbosity(stream=None) -> int:
    """Keras's `verbose` for `fit`/`evaluate` printing to `stream` (default stdout): the progress bar
    (1) in a terminal, one line per epoch (2) elsewhere. In a log file the bar's redraws are joined by
    carriage returns into one line of several kilobytes per epoch.

    >>> import io
    >>> progress_verbosity(io.StringIO())
    2
    """
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return 1 if callable(isatty) and isatty() else 2


def compile_classifier(
    model: "keras.Model", optimizer: "str | keras.optimizers.Optimizer" = "rmsprop"
) -> "keras.Model":
    """Compiles `model`, a classifier that outputs logits, with the project's loss and metric:
    sparse categorical cross-entropy from logits, and the accuracy named `accuracy`."""
    import keras

    model.compile(
        optimizer,
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    return model


def evaluate_classifier(model: "keras.Model", data: "tf.data.Dataset | tuple", **kwargs) -> dict:
    """`model`'s `loss` and `accuracy` on labeled `data` (as `evaluate` takes it), after `compile_classifier`.

    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> x = np.random.rand(8, 3).astype("float32")
    >>> y = np.argmax(model.predict(x, verbose=0), axis=1)  # the labels it predicts
    >>> evaluate_classifier(model, (x, y), verbose=0)["accuracy"]
    1.0
    """
    compile_classifier(model)
    if isinstance(data, tuple):
        return model.evaluate(*data, return_dict=True, **kwargs)
    return model.evaluate(data, return_dict=True, **kwargs)


def save_model(model: "keras.Model", path: str) -> None:
    """`model.save(path)` that never leaves half a file at `path`: written next to it, then renamed.

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "m.keras")
    >>> save_model(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]), path)
    >>> sorted(os.listdir(os.path.dirname(path)))
    ['m.keras']
    """
    # Keras saves a model only to a name ending in .keras.
    with written_aside(path, path[: -len(".keras")] + PARTIAL + ".keras") as partial:
        model.save(partial)
