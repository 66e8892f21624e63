"""faqd_tf.stages: what a stage adds to training (kills, bad input and the CLI are in test_hostile/test_cli)."""

import keras
import numpy as np
import pytest

from faqd_tf import cli, data, models
from tests import helpers

HW, CLASSES = (12, 12), 4


@pytest.mark.parametrize("strategy", ["default", "mirrored"])
def test_distill_stage_recalibrates_the_students_batchnorm(tmp_path, rng, capsys, strategy):
    """With `student.recalibrate_bn`, every BatchNormalization layer of the saved student holds the
    mean and variance (float64 NumPy) of its own inputs when the student runs in inference mode on
    the first training images: the fixed point trained moving averages only approach. On two
    replicas too (mirrored variables are assigned outside any replica)."""
    source = tmp_path / "idx"
    helpers.make_idx(source, rng, n_train=48, n_test=8, hw=HW, classes=CLASSES)
    keras.utils.set_random_seed(int(rng.integers(2**31)))
    models.get("resnet8", num_classes=CLASSES, input_shape=(*HW, 1)).save(
        tmp_path / "teacher.keras"
    )
    config = helpers.write_config(
        tmp_path,
        {
            "dataset": {"source": f"idx:{source}", "limit": 40},
            "teacher": {"arch": None, "file": str(tmp_path / "teacher.keras")},
            "student": {
                "weight_bits": 2,
                "recalibrate_bn": 100,
            },  # more than the 40 images dataset.limit keeps
            "distill": {"fa": None},
            "train": {"epochs": 1, "batch_size": 16, "lr": 0.05},
            "strategy": strategy,
            "output_dir": str(tmp_path / "out"),
        },
    )
    assert cli.main(["--config", config, "--stage", "distill"]) == 0
    assert (
        "re-estimated the statistics of 7 BatchNormalization layers on 40 unlabeled training images in "
        in capsys.readouterr().out
    )

    student = keras.models.load_model(tmp_path / "out" / "student.keras", safe_mode=True)
    images = np.stack(
        list(
            data.load(
                f"idx:{source}",
                "train",
                labels=False,
                batch_size=None,
                shuffle=False,
                augment=False,
                limit=40,
            ).as_numpy_iterator()
        )
    )
    layers = [
        layer for layer in student.layers if isinstance(layer, keras.layers.BatchNormalization)
    ]
    inputs = keras.Model(student.input, [layer.input for layer in layers])(images, training=False)
    for layer, u in zip(layers, inputs):
        u = np.asarray(u, np.float64).reshape(-1, u.shape[-1])
        np.testing.assert_allclose(
            layer.moving_mean.numpy(), u.mean(0), rtol=1e-4, atol=1e-5, err_msg=layer.name
        )
        np.testing.assert_allclose(
            layer.moving_variance.numpy(), u.var(0), rtol=1e-4, atol=1e-5, err_msg=layer.name
        )
