"""train.py: configs, one-line errors with exit code 2 and nothing written, and a resumed run."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from faqd_tf import cli, config
from tests import helpers
from tests.helpers import assert_one_line_exit_2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = "/usr/share/datasets/fashion-mnist"


def write_config(tmp_path, **sections):
    base = {
        "dataset": {"source": f"idx:{FMNIST}", "limit": 64, "eval_limit": 64},
        "teacher": {"arch": "resnet8", "train": {"epochs": 1, "batch_size": 32}},
        "train": {"epochs": 1, "batch_size": 32},
        "output_dir": str(tmp_path / "out"),
    }
    return helpers.write_config(tmp_path, base, **sections)


def _inputs(tmp_path):
    """Files the bad cases point at."""
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    not_a_model = tmp_path / "teacher.keras"
    not_a_model.write_text("this is not a model")
    not_json = tmp_path / "bad.json"
    not_json.write_text("{'dataset': ")
    return {"empty": empty, "not_a_model": not_a_model, "not_json": not_json}


def _fp_teacher(tmp_path):
    from faqd_tf import models

    path = tmp_path / "fp_teacher.keras"
    models.get("resnet8", input_shape=(28, 28, 1), num_classes=10).save(path)
    return path


BAD_CASES = {
    "missing config": (
        lambda t, f: ["--config", str(t / "missing.json")],
        # a long path is shortened, never its file name
        r"config file .*missing\.json( \([\d,]+ characters\))? does not exist",
    ),
    "not JSON": (lambda t, f: ["--config", str(f["not_json"])], r"is not valid JSON"),
    "unknown key": (
        lambda t, f: ["--config", write_config(t, colour="red")],
        r"unknown key 'colour'",
    ),
    "unknown train key": (
        lambda t, f: ["--config", write_config(t, train={"epoch": 3})],
        r"unknown key 'train.epoch'; keys of 'train' are",
    ),
    "wrong type": (
        lambda t, f: ["--config", write_config(t, train={"epochs": "ten"})],
        r"train.epochs=\"ten\" is not valid; use an integer >= 1",
    ),
    "bits": (
        lambda t, f: ["--config", write_config(t, student={"weight_bits": 3})],
        r"student.weight_bits=3 is not valid; use one of 1, 2, 4, 8",
    ),
    "negative weight": (
        lambda t, f: ["--config", write_config(t, distill={"beta": -0.1})],
        r"distill.beta=-0.1 is not valid; use null \(the default of distill.fa_norm\) or a number >= 0",
    ),
    "kd": (
        lambda t, f: ["--config", write_config(t, distill={"kd": "l1"})],
        r"distill.kd=\"l1\" is not valid; use one of \"mse\", \"kl\"",
    ),
    "fa_norm": (
        lambda t, f: ["--config", write_config(t, distill={"fa_norm": "l2"})],
        r"distill.fa_norm=\"l2\" is not valid; use one of \"fro2\", \"l1\"",
    ),
    "gram for l1": (
        lambda t, f: ["--config", write_config(t, distill={"fa_norm": "l1", "fa_method": "gram"})],
        r"distill.fa_method=\"gram\" evaluates fa_norm \"fro2\" only",
    ),
    "layer_bits width": (
        lambda t, f: ["--config", write_config(t, student={"layer_bits": {"stem_conv": 3}})],
        r"student.layer_bits=\{\"stem_conv\": 3\} is not valid; use null or",
    ),
    "layer_bits name": (
        lambda t, f: [
            "--config",
            write_config(t, student={"layer_bits": {"stem": 8}}),
            "--stage",
            "distill",
            "--set",
            f'teacher.file="{_fp_teacher(t)}"',
        ],
        r"student: layer_bits key 'stem' matches no layer with a kernel; such layers are: stem_conv",
    ),
    "size budget below 1 bit": (
        lambda t, f: [
            "--config",
            write_config(t, student={"weight_bits": 2, "size_budget_kb": 10}),
            "--stage",
            "distill",
            "--set",
            f'teacher.file="{_fp_teacher(t)}"',
        ],
        r"student.size_budget_kb=10 is below the smallest packed size of this student, 15.34 kB "
        r"\(every quantized layer at 1 bit, the classifier float\); set it to at least 15.34\.$",
    ),
    "size budget and layer_bits": (
        lambda t, f: [
            "--config",
            write_config(t, student={"size_budget_kb": 20, "layer_bits": {"stem_conv": 8}}),
        ],
        r"student.size_budget_kb chooses every layer's width itself; remove student.layer_bits",
    ),
    "size budget of FP weights": (
        lambda t, f: [
            "--config",
            write_config(t, student={"size_budget_kb": 20, "weight_bits": None}),
        ],
        r"student.size_budget_kb quantizes the weights; set student.weight_bits",
    ),
    "alpha_rate": (
        lambda t, f: ["--config", write_config(t, student={"alpha_rate": 0})],
        r"student.alpha_rate=0 is not valid",
    ),
    "freeze_alpha_in_step2 without two steps": (
        lambda t, f: [
            "--config",
            write_config(t, student={"weight_bits": 2, "freeze_alpha_in_step2": True}),
        ],
        r"student.freeze_alpha_in_step2 acts in the second of two steps only",
    ),
    "teacher_cache with FA": (
        lambda t, f: [
            "--config",
            write_config(t, distill={"fa": "exact"}, train={"teacher_cache": True}),
        ],
        r"train.teacher_cache=true cannot keep the teacher's logits: distill.fa='exact' needs",
    ),
    "global_clipnorm": (
        lambda t, f: ["--config", write_config(t, train={"global_clipnorm": 0})],
        r"train.global_clipnorm=0 is not valid; use null or a number > 0",
    ),
    "--export": (
        lambda t, f: ["--config", write_config(t), "--export", "tflite-int2"],
        r"invalid choice: 'tflite-int2'",
    ),
    "gamma without labels": (
        lambda t, f: ["--config", write_config(t, distill={"gamma": 0.3})],
        r"gamma > 0 needs labels",
    ),
    "init file": (
        lambda t, f: ["--config", write_config(t, student={"init": "file"})],
        r"student.init='file' needs student.file",
    ),
    "--set without =": (
        lambda t, f: ["--config", write_config(t), "--set", "train.epochs"],
        r"write KEY=VALUE",
    ),
    "--set unknown": (
        lambda t, f: ["--config", write_config(t), "--set", "train.speed=3"],
        r"unknown key 'train.speed'",
    ),
    "--stage": (
        lambda t, f: ["--config", write_config(t), "--stage", "bogus"],
        r"invalid choice: 'bogus'",
    ),
    "--trials": (
        lambda t, f: ["--config", write_config(t), "--tune", "--trials", "0"],
        r"--trials=0 must be >= 1",
    ),
    "source kind": (
        lambda t, f: ["--config", write_config(t, dataset={"source": "s3:bucket"})],
        r"s3:bucket",
    ),
    "empty folder": (
        lambda t, f: ["--config", write_config(t, dataset={"source": f"folder:{f['empty']}"})],
        r"has no images",
    ),
    "missing folder": (
        lambda t, f: ["--config", write_config(t, dataset={"source": f"idx:{t / 'nowhere'}"})],
        r"nowhere",
    ),
    "architecture": (
        lambda t, f: ["--config", write_config(t, teacher={"arch": "resnet7"})],
        r"teacher.arch='resnet7' is not a known architecture",
    ),
    "teacher not a model": (
        lambda t, f: [
            "--config",
            write_config(t, teacher={"arch": None, "file": str(f["not_a_model"])}),
        ],
        r"is not a loadable Keras model",
    ),
    "no teacher yet": (
        lambda t, f: ["--config", write_config(t), "--stage", "distill"],
        r"teacher file .*teacher.keras does not exist; run --stage teacher first",
    ),
    "evaluate a non-model": (
        lambda t, f: [
            "--config",
            write_config(t),
            "--stage",
            "evaluate",
            "--set",
            f'teacher.file="{f["not_a_model"]}"',
        ],
        r"is not a loadable Keras model",
    ),
}


@pytest.mark.skipif(
    not os.path.isdir(FMNIST), reason="needs the Debian package dataset-fashion-mnist"
)
@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, case):
    argv, pattern = BAD_CASES[case]
    assert_one_line_exit_2(argv(tmp_path, _inputs(tmp_path)), pattern, capsys, tmp_path / "out")


def test_subprocess_exit_code_and_existing_outputs(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "teacher.keras").write_text("x")
    cfg = write_config(tmp_path)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), "--config", cfg, "--stage", "teacher"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"train.py: error: the teacher output {out / 'teacher.keras'} exists; pass --overwrite to replace it."
    ]


def _epochs_in(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


@pytest.mark.skipif(
    not os.path.isdir(FMNIST), reason="needs the Debian package dataset-fashion-mnist"
)
def test_sigkill_then_same_command_resumes(tmp_path):
    cfg = write_config(
        tmp_path,
        dataset={"limit": 96, "eval_limit": 32},
        teacher={"arch": "resnet8", "train": {"epochs": 4, "batch_size": 32, "lr": 0.05}},
    )
    command = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "--config",
        cfg,
        "--stage",
        "teacher",
    ]
    history = str(tmp_path / "out" / "teacher_history.csv")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 240
    while len(_epochs_in(history)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _epochs_in(history)
    assert 2 <= len(done) < 4, f"killed too late or too early: epochs {done}"
    assert not os.path.exists(tmp_path / "out" / "teacher.keras")  # never half a model
    assert os.path.isdir(tmp_path / "out" / "backup" / "teacher")

    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    # Not a terminal: one line per epoch, no progress bar redrawn with carriage returns.
    assert "\r" not in again.stdout and max(map(len, again.stdout.splitlines())) < 400, (
        again.stdout[-2000:]
    )
    assert "Epoch 3/4" in again.stdout and "Epoch 4/4" in again.stdout
    epochs = _epochs_in(history)
    assert epochs == [0, 1, 2, 3], epochs  # nothing lost, nothing trained twice
    assert os.path.exists(tmp_path / "out" / "teacher.keras")
    assert not os.path.isdir(tmp_path / "out" / "backup" / "teacher")


@pytest.mark.skipif(
    not os.path.isdir(FMNIST), reason="needs the Debian package dataset-fashion-mnist"
)
def test_two_steps_keep_the_first_steps_alphas_when_asked(tmp_path, capsys):
    import keras
    import numpy as np

    from faqd_tf.quantize import quantized_relus

    cfg = write_config(
        tmp_path,
        teacher={"arch": None, "file": str(_fp_teacher(tmp_path))},
        student={
            "weight_bits": 1,
            "activation_bits": 1,
            "two_step": True,
            "freeze_alpha_in_step2": True,
        },
        train={"epochs": 1, "batch_size": 32, "lr": 0.1},  # large enough to move a learned alpha
    )
    assert cli.main(["--config", cfg, "--stage", "distill"]) == 0
    assert "alphas kept from step 1" in capsys.readouterr().out
    out = tmp_path / "out"

    def alphas(name):
        model = keras.models.load_model(out / name, safe_mode=True)
        return np.array([float(layer.alpha.numpy()) for layer in quantized_relus(model)])

    step1, step2 = alphas("student_act.keras"), alphas("student.keras")
    assert len(step1) == 7  # ResNet8: the stem and two a block
    np.testing.assert_array_equal(step2, step1)
    for history in ("distill_act_history.csv", "history.csv"):
        with open(out / history) as f:
            (row,) = list(csv.DictReader(f))
        assert float(row["alpha_min"]) == pytest.approx(step1.min(), rel=1e-6)
        assert float(row["alpha_max"]) == pytest.approx(step1.max(), rel=1e-6)


@pytest.mark.skipif(
    not os.path.isdir(FMNIST), reason="needs the Debian package dataset-fashion-mnist"
)
def test_tune_writes_best_config(tmp_path, capsys):
    from faqd_tf import models

    teacher = models.get("resnet8", input_shape=(28, 28, 1))
    teacher_file = tmp_path / "teacher.keras"
    teacher.save(teacher_file)
    cfg = write_config(
        tmp_path,
        dataset={"limit": 64, "eval_limit": 64},
        teacher={"arch": None, "file": str(teacher_file)},
        student={
            "weight_bits": None,
            "activation_bits": 4,  # activation-only keeps tracing short
            "recalibrate_bn": 32,
        },  # the trials score the student the distill stage would save
        tune={"trials": 2, "epochs": 1, "tuner": "random"},
    )
    assert cli.main(["--config", cfg, "--tune"]) == 0
    assert "objective val_accuracy after BN recalibration" in capsys.readouterr().out
    best = json.loads((tmp_path / "out" / "best_config.json").read_text())
    config.resolve(best)  # the written config is itself a valid config
    assert best["distill"]["gamma"] == 0.0  # label-free
    assert 0.1 <= best["distill"]["alpha"] <= 2.0
    assert best["distill"]["fa"] in ("exact", None)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.path.isdir(FMNIST), reason="needs the Debian package dataset-fashion-mnist"
)
def test_tune_under_a_size_budget_trains_the_chosen_widths(tmp_path, capsys):
    import keras

    from faqd_tf import models

    keras.utils.set_random_seed(0)
    teacher_file = tmp_path / "teacher.keras"
    models.get("resnet8", input_shape=(28, 28, 1), num_classes=10).save(teacher_file)
    cfg = write_config(
        tmp_path,
        dataset={"limit": 64, "eval_limit": 64},
        teacher={"arch": None, "file": str(teacher_file)},
        student={"weight_bits": 2, "size_budget_kb": 20, "sensitivity_samples": 32},
        tune={"trials": 1, "epochs": 1, "tuner": "random"},
    )
    assert cli.main(["--config", cfg, "--tune"]) == 0
    assert "student widths: layers" in capsys.readouterr().out
    chosen = json.loads((tmp_path / "out" / "layer_bits.json").read_text())
    assert chosen["packed_kb"] <= 20 and len(chosen["layer_bits"]) == 7
