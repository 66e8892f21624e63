"""faqd_tf.runner: the plan of stages and the output folder's lock (the stages run in test_cli/test_hostile)."""

import os
import signal
import subprocess
import sys

import pytest

from faqd_tf import cli, config, runner

FMNIST = "/usr/share/datasets/fashion-mnist"


def _run(tmp_path, overwrite=False, **teacher):
    cfg = config.resolve(
        {"dataset": {"source": "idx:x"}, "teacher": teacher, "output_dir": str(tmp_path)}
    )
    return runner.Run(cfg, overwrite=overwrite)


def _touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w").close()


@pytest.mark.parametrize(
    "present, overwrite, expected",
    [
        ([], False, ["teacher", "distill", "evaluate"]),
        (["teacher.keras"], False, ["distill", "evaluate"]),
        (
            ["teacher.keras", "backup/teacher/x"],
            False,
            ["teacher", "distill", "evaluate"],
        ),  # killed after its save
        (["teacher.keras", "student.keras"], False, ["evaluate"]),
        (["teacher.keras", "student.keras", "backup/distill/x"], False, ["distill", "evaluate"]),
        (["teacher.keras", "student.keras", "results.json"], False, []),
        (
            ["teacher.keras", "student.keras", "results.json"],
            True,
            ["teacher", "distill", "evaluate"],
        ),
    ],
)
def test_plan_runs_what_is_missing_or_was_interrupted(tmp_path, present, overwrite, expected):
    for name in present:
        _touch(os.path.join(tmp_path, name))
    run = _run(tmp_path, overwrite)
    assert run.plan("all") == expected
    assert run.plan("distill") == ["distill"]


def test_a_given_teacher_file_is_never_trained(tmp_path):
    _touch(str(tmp_path / "given.keras"))
    run = _run(tmp_path, overwrite=True, file=str(tmp_path / "given.keras"))
    assert run.plan("all") == ["distill", "evaluate"]


def test_folder_lock_is_exclusive_and_dies_with_its_holder(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(
            runner.UsageError, match=f"output_dir {tmp_path} is in use by another run"
        ):
            runner.FolderLock(str(tmp_path)).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: no cleanup of its own
        holder.wait()
    lock = runner.FolderLock(str(tmp_path))
    lock.acquire()
    lock.acquire()  # held: a no-op
    with pytest.raises(runner.UsageError):
        runner.FolderLock(str(tmp_path)).acquire()
    lock.release()
    again = runner.FolderLock(str(tmp_path))
    again.acquire()
    again.release()
    assert os.listdir(tmp_path) == []  # nothing written for the lock


@pytest.mark.skipif(
    not os.path.isdir(FMNIST), reason="needs the Debian package dataset-fashion-mnist"
)
def test_distill_stage_reports_each_terms_gradient_share(tmp_path, capsys):
    """A user sees FA's share of the gradient when distillation starts, and a warning when it is inert."""
    import json

    import keras

    from faqd_tf import models

    keras.utils.set_random_seed(0)
    models.get("resnet8", input_shape=(28, 28, 1)).save(tmp_path / "teacher.keras")
    cfg = {
        "dataset": {"source": f"idx:{FMNIST}", "limit": 64, "eval_limit": 32},
        "teacher": {"arch": None, "file": str(tmp_path / "teacher.keras")},
        "distill": {"beta": 1e-7, "kd": "kl", "temperature": 4.0},
        "train": {"epochs": 1, "batch_size": 32},
        "output_dir": str(tmp_path / "out"),
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert cli.main(["--config", str(tmp_path / "config.json"), "--stage", "distill"]) == 0
    out = capsys.readouterr().out
    assert "loss 1.0*KD(kl) + 1e-07*FA(exact, fro2), label-free" in out
    assert "[faqd] gradient norms at the start: kd " in out
    assert (
        "[faqd] warning: the weighted fa term (weight 1e-07) has 0.0% of the gradient norm of kd"
        in out
    )
