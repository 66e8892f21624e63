"""Keras callbacks of FAQD."""

import keras


def relaxed_layers(model):
    """Every layer under `model` (nested models and a Distiller's student included) with a
    BinaryRelax factor."""
    # `_flatten_layers` walks nested models and layers tracked as attributes (e.g. a Distiller's
    # student), which `model.layers` does not.
    return [
        layer
        for layer in model._flatten_layers(include_self=True, recursive=True)
        if getattr(layer, "relax_lambda", None) is not None
    ]


class BinaryRelaxScheduler(keras.callbacks.Callback):
    """Grows the BinaryRelax lambda of eq. (2) by `eta` after every epoch: lam <- eta * lam.

    Layers built with `relax=lam0` train on `(w + lam*Q(w)) / (1 + lam)`; as lam grows the
    blend approaches the quantized weights Q(w), which inference always uses.

    >>> from faqd_tf.layers import QuantDense
    >>> model = keras.Sequential([keras.Input((4,)), QuantDense(2, weight_bits=1, relax=1.0)])
    >>> model.compile("sgd", "mse")
    >>> _ = model.fit(np.random.rand(8, 4), np.random.rand(8, 2), epochs=2, verbose=0,
    ...               callbacks=[BinaryRelaxScheduler(eta=2.0)])
    >>> float(model.layers[0].relax_lambda.numpy())
    4.0
    """

    def __init__(self, eta=1.02):
        super().__init__()
        if not eta > 1:
            raise ValueError(f"eta={eta!r} must be greater than 1 (lambda grows each epoch).")
        self.eta = float(eta)

    def on_epoch_end(self, epoch, logs=None):
        layers = relaxed_layers(self.model)
        for layer in layers:
            layer.relax_lambda.assign(layer.relax_lambda * self.eta)
        if logs is not None and layers:
            logs["relax_lambda"] = float(layers[0].relax_lambda.numpy())
