"""Training pieces shared by the CLI, the benchmarks and user code: the optimizer of a config, a
model save that neither a kill nor a full disk leaves half-written."""

import contextlib
import os
import stat
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

PARTIAL = ".partial"
"""The suffix of a file being written aside (`written_aside`): never a whole file; a run removes what a kill left."""


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
            0.0 if warmup else lr, decay_steps=max(1, total - warmup),
            warmup_target=lr if warmup else None, warmup_steps=warmup,
        )
    clip = train.get("global_clipnorm")
    clip = None if clip is None else float(clip)
    if train["optimizer"] == "adam":
        # AdamW takes a float (0.0 is plain Adam); SGD takes None for no decay.
        return keras.optimizers.AdamW(lr, weight_decay=float(train["weight_decay"]), global_clipnorm=clip)
    return keras.optimizers.SGD(
        lr, momentum=float(train["momentum"]), nesterov=train["nesterov"], weight_decay=train["weight_decay"] or None,
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


def compile_classifier(model: "keras.Model",
                       optimizer: "str | keras.optimizers.Optimizer" = "rmsprop") -> "keras.Model":
    """Compiles `model`, a classifier that outputs logits, with the project's loss and metric:
    sparse categorical cross-entropy from logits, and the accuracy named `accuracy`."""
    import keras

    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
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


@contextlib.contextmanager
def written_aside(path: str, partial: str | None = None) -> Iterator[str]:
    """Yields a file name next to `path` (default `path + PARTIAL`) to write; when the block ends
    it is renamed to `path`, when the block fails (a full disk, an interrupt) the file the block
    wrote there is removed. So `path` is never half a file, and a failed write leaves nothing behind.

    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "notes.txt")
    >>> with written_aside(path) as partial, open(partial, "w") as f:
    ...     _ = f.write("whole")
    >>> open(path).read(), os.listdir(os.path.dirname(path))
    ('whole', ['notes.txt'])
    """
    partial = partial or path + PARTIAL
    before = _identity(partial)
    try:
        yield partial
        os.replace(partial, path)
    except BaseException as err:
        # Only a regular file the block created or changed is removed: never a folder in the way,
        # nor a file the block failed to open.
        now = _identity(partial)
        if now is not None and now[0] and now != before:
            with contextlib.suppress(OSError):
                os.remove(partial)
        if isinstance(err, OSError) and err.filename is None:
            err.filename = path  # some writers (Keras's zip of a .keras file) name no file
        raise
    # A rename onto a hard link of the same file does nothing and leaves `partial` (POSIX rename).
    with contextlib.suppress(FileNotFoundError):
        os.remove(partial)


def _identity(path: str) -> tuple | None:
    """(is a regular file, inode, size, modification time) of `path`, or None if nothing is there."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return stat.S_ISREG(st.st_mode), st.st_ino, st.st_size, st.st_mtime_ns


def save_model(model: "keras.Model", path: str) -> None:
    """`model.save(path)` that never leaves half a file at `path`: written next to it, then renamed.

    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "m.keras")
    >>> save_model(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]), path)
    >>> sorted(os.listdir(os.path.dirname(path)))
    ['m.keras']
    """
    # Keras saves a model only to a name ending in .keras.
    with written_aside(path, path[: -len(".keras")] + PARTIAL + ".keras") as partial:
        model.save(partial)
