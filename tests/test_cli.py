"""train.py: configs, one-line errors with exit code 2 and nothing written, and a resumed run."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from faqd_tf import cli, config, training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = "/usr/share/datasets/fashion-mnist"


def write_config(tmp_path, **sections):
    base = {
        "dataset": {"source": f"idx:{FMNIST}", "limit": 64, "eval_limit": 64},
        "teacher": {"arch": "resnet8", "train": {"epochs": 1, "batch_size": 32}},
        "train": {"epochs": 1, "batch_size": 32},
        "output_dir": str(tmp_path / "out"),
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            base.setdefault(key, {}).update(value)
        else:
            base[key] = value
    path = tmp_path / f"config{len(list(tmp_path.glob('config*.json')))}.json"
    path.write_text(json.dumps(base))
    return str(path)


def test_all_shipped_configs_resolve():
    folder = os.path.join(ROOT, "configs")
    names = sorted(f for f in os.listdir(folder) if f.endswith(".json"))
    assert {"cifar10.json", "cifar100.json", "tiny_imagenet.json", "fashion_mnist.json", "quickstart.json"} <= set(names)
    for name in names:
        resolved = config.load(os.path.join(folder, name))
        assert resolved["dataset"]["source"]


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("weight_decay", [0, 0.0, 5e-4])
def test_make_optimizer_every_optimizer_and_weight_decay(kind, weight_decay):
    # JSON integers (0) are valid numbers in the config; Keras wants floats.
    train = config.resolve_section("train", {"optimizer": kind, "lr": 0.05, "epochs": 2, "weight_decay": weight_decay,
                                             "momentum": 0})
    opt = training.make_optimizer(train, steps_per_epoch=10)
    assert type(opt).__name__ == {"sgd": "SGD", "adam": "AdamW"}[kind]
    # Cosine from lr to 0 over epochs * steps: 0.05 * (1 + cos(pi * t / 20)) / 2.
    schedule = opt._learning_rate
    assert [float(schedule(t)) for t in (0, 10, 20)] == pytest.approx([0.05, 0.025, 0.0], abs=1e-7)
    assert (opt.weight_decay or 0.0) == pytest.approx(weight_decay)


def test_overrides_parse_json_and_strings():
    raw = {"dataset": {"source": "idx:x"}}
    out = config.resolve(config.apply_overrides(raw, ["train.epochs=5", "distill.fa=null", "dataset.source=tfds:cifar10"]))
    assert out["train"]["epochs"] == 5 and out["distill"]["fa"] is None and out["dataset"]["source"] == "tfds:cifar10"


def _bad_cases(tmp_path):
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    not_a_model = tmp_path / "teacher.keras"
    not_a_model.write_text("this is not a model")
    not_json = tmp_path / "bad.json"
    not_json.write_text("{'dataset': ")
    return [
        (["--config", str(tmp_path / "missing.json")], r"config file .*missing.json does not exist"),
        (["--config", str(not_json)], r"is not valid JSON"),
        (["--config", write_config(tmp_path, colour="red")], r"unknown key 'colour'"),
        (["--config", write_config(tmp_path, train={"epoch": 3})], r"unknown key 'train.epoch'; keys of 'train' are"),
        (["--config", write_config(tmp_path, train={"epochs": "ten"})], r"train.epochs=\"ten\" is not valid; use an integer >= 1"),
        (["--config", write_config(tmp_path, student={"weight_bits": 3})], r"student.weight_bits=3 is not valid; use one of 1, 2, 4, 8"),
        (["--config", write_config(tmp_path, distill={"beta": -0.1})], r"distill.beta=-0.1 is not valid; use a number >= 0"),
        (["--config", write_config(tmp_path, distill={"kd": "l1"})], r"distill.kd=\"l1\" is not valid; use one of \"mse\", \"kl\""),
        (["--config", write_config(tmp_path, distill={"gamma": 0.3})], r"gamma > 0 needs labels"),
        (["--config", write_config(tmp_path, student={"init": "file"})], r"student.init='file' needs student.file"),
        (["--config", write_config(tmp_path), "--set", "train.epochs"], r"write KEY=VALUE"),
        (["--config", write_config(tmp_path), "--set", "train.speed=3"], r"unknown key 'train.speed'"),
        (["--config", write_config(tmp_path), "--stage", "bogus"], r"invalid choice: 'bogus'"),
        (["--config", write_config(tmp_path), "--tune", "--trials", "0"], r"--trials=0 must be >= 1"),
        (["--config", write_config(tmp_path, dataset={"source": "s3:bucket"})], r"s3:bucket"),
        (["--config", write_config(tmp_path, dataset={"source": f"folder:{empty}"})], r"has no images"),
        (["--config", write_config(tmp_path, dataset={"source": f"idx:{tmp_path / 'nowhere'}"})], r"nowhere"),
        (["--config", write_config(tmp_path, teacher={"arch": "resnet7"})], r"teacher.arch='resnet7' is not a known architecture"),
        (["--config", write_config(tmp_path, teacher={"arch": None, "file": str(not_a_model)})], r"is not a loadable Keras model"),
        (["--config", write_config(tmp_path), "--stage", "distill"], r"teacher file .*teacher.keras does not exist; run --stage teacher first"),
        (["--config", write_config(tmp_path), "--stage", "evaluate", "--set", f"teacher.file=\"{not_a_model}\""], r"is not a loadable Keras model"),
    ]


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="needs the Debian package dataset-fashion-mnist")
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    cases = _bad_cases(tmp_path)
    assert len(cases) >= 15
    for argv, pattern in cases:
        code = cli.main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2, (argv, err)
        assert len(err.splitlines()) == 1 and "Traceback" not in err, (argv, err)
        assert err.startswith("train.py: error: ")
        import re

        assert re.search(pattern, err), (argv, err)
        assert not (tmp_path / "out").exists(), f"{argv} wrote output"


def test_subprocess_exit_code_and_existing_outputs(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "teacher.keras").write_text("x")
    cfg = write_config(tmp_path)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config", cfg, "--stage", "teacher"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"train.py: error: the teacher output {out / 'teacher.keras'} exists; pass --overwrite to replace it."
    ]


def _epochs_in(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="needs the Debian package dataset-fashion-mnist")
def test_sigkill_then_same_command_resumes(tmp_path):
    cfg = write_config(
        tmp_path,
        dataset={"limit": 96, "eval_limit": 32},
        teacher={"arch": "resnet8", "train": {"epochs": 4, "batch_size": 32, "lr": 0.05}},
    )
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--config", cfg, "--stage", "teacher"]
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
    epochs = _epochs_in(history)
    assert epochs == [0, 1, 2, 3], epochs  # nothing lost, nothing trained twice
    assert os.path.exists(tmp_path / "out" / "teacher.keras")
    assert not os.path.isdir(tmp_path / "out" / "backup" / "teacher")


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="needs the Debian package dataset-fashion-mnist")
def test_tune_writes_best_config(tmp_path):
    from faqd_tf import models

    teacher = models.get("resnet8", input_shape=(28, 28, 1))
    teacher_file = tmp_path / "teacher.keras"
    teacher.save(teacher_file)
    cfg = write_config(
        tmp_path,
        dataset={"limit": 64, "eval_limit": 64},
        teacher={"arch": None, "file": str(teacher_file)},
        student={"weight_bits": None, "activation_bits": 4},  # activation-only keeps tracing short
        tune={"trials": 2, "epochs": 1, "tuner": "random"},
    )
    assert cli.main(["--config", cfg, "--tune"]) == 0
    best = json.loads((tmp_path / "out" / "best_config.json").read_text())
    config.resolve(best)  # the written config is itself a valid config
    assert best["distill"]["gamma"] == 0.0  # label-free
    assert 0.1 <= best["distill"]["alpha"] <= 2.0
    assert best["distill"]["fa"] in ("exact", None)
