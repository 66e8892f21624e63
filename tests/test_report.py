"""faqd_tf.report: the results table, results.json and the curves."""

import json
import os

from faqd_tf import report


def _results(rng):
    t_acc, s_acc = rng.uniform(0.5, 1.0, size=2)
    teacher = {
        "accuracy": t_acc,
        "parameters": 12345,
        "float32_bits": 32 * 12345,
        "packed_bits": 32 * 12345,
    }
    student = {
        "accuracy": s_acc,
        "parameters": 12345,
        "float32_bits": 32 * 12345,
        "packed_bits": 4 * 12345 + 64,
    }
    student["compression"] = teacher["float32_bits"] / student["packed_bits"]
    return {"teacher": teacher, "student": student, "accuracy_gap": t_acc - s_acc}


def test_table(rng, capsys):
    results = _results(rng)
    report.print_table(results)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "model",
        "test",
        "accuracy",
        "parameters",
        "size",
        "(float32)",
        "size",
        "(packed)",
    ]
    assert set(lines[1]) <= {"-", " "}
    teacher, student = lines[2].split(), lines[3].split()
    assert teacher[:3] == ["teacher", f"{100 * results['teacher']['accuracy']:.2f}%", "12,345"]
    # 12345 float32 weights: 48.2 KiB; packed at 4 bits plus 64 bits of scales: 6.0 KiB.
    assert teacher[3:] == ["48.2", "KiB", "48.2", "KiB"] and student[3:] == [
        "48.2",
        "KiB",
        "6.0",
        "KiB",
    ]
    assert f"{100 * results['accuracy_gap']:.2f} points" in lines[4]
    assert f"{results['student']['compression']:.1f}x smaller" in lines[4]


def test_write_json_replaces_whole(tmp_path, rng):
    path = str(tmp_path / "results.json")
    results = _results(rng)
    report.write_json(path, results)
    assert json.load(open(path)) == json.loads(json.dumps(results))
    assert os.listdir(tmp_path) == ["results.json"]


def test_curves_follow_the_stages_in_order(tmp_path, rng):
    assert report.plot_curves(str(tmp_path)) is None  # no history yet
    for name, epochs in (("teacher_history.csv", 3), ("history.csv", 2)):
        rows = ["epoch,loss,val_accuracy"] + [
            f"{e},{rng.uniform(0.1, 2)},{rng.uniform()}" for e in range(epochs)
        ]
        (tmp_path / name).write_text("\n".join(rows) + "\n")
    path = report.plot_curves(str(tmp_path))
    assert path == str(tmp_path / "curves.png") and os.path.getsize(path) > 1000


def test_curves_without_validation_scores(tmp_path, rng):
    """A run with dataset.validation_split null: Keras's CSVLogger writes val_accuracy as "NA"."""
    rows = ["epoch,accuracy,loss,val_accuracy,val_loss"] + [
        f"{e},{rng.uniform()},{rng.uniform(0.1, 2)},NA,NA" for e in range(2)
    ]
    (tmp_path / "history.csv").write_text("\n".join(rows) + "\n")
    assert report.plot_curves(str(tmp_path)) == str(tmp_path / "curves.png")
