"""benchmarks/_harness.py: resumable CSV rows, atomic tables, worker results, interleaved rounds."""

import os
import sys
import textwrap

import pytest

from benchmarks import _harness

FIELDS = ["cell", "seed", "accuracy", "note"]


def _rows(rng, n):
    return [
        dict(
            cell=f"c{int(rng.integers(1000))}",
            seed=int(rng.integers(10)),
            accuracy=round(float(rng.random()), 4),
            note=rng.choice(["", 'a, quoted "note"', "two\nlines"]),
        )
        for _ in range(n)
    ]


def _as_read(rows):
    return [{k: str(r.get(k, "")) for k in FIELDS} for r in rows]


def test_appended_rows_resume_under_one_header(tmp_path, rng):
    path = str(tmp_path / "new" / "cells.csv")  # the folder is made
    assert _harness.read_rows(path) == [] and _harness.read_rows(None) == []
    with pytest.raises(FileNotFoundError):
        _harness.read_rows(path, missing_ok=False)
    first, second = _rows(rng, int(rng.integers(1, 5))), _rows(rng, int(rng.integers(1, 5)))
    _harness.append_rows(path, FIELDS, first)
    # A rerun appends after the rows it read; a key the table lacks is dropped, a missing one left empty.
    _harness.append_rows(
        path, FIELDS, [dict(r, extra="x") for r in second[:-1]] + [{"cell": second[-1]["cell"]}]
    )
    want = _as_read(first + second[:-1] + [{"cell": second[-1]["cell"]}])
    assert _harness.read_rows(path) == want
    assert open(path, newline="").read().count("cell,seed,accuracy,note") == 1
    empty = str(tmp_path / "empty.csv")
    open(empty, "w").close()  # a file created but killed before its header gets one
    _harness.append_rows(empty, FIELDS, first)
    assert _harness.read_rows(empty) == _as_read(first)


def test_tables_are_replaced_whole(tmp_path, rng, monkeypatch):
    path = str(tmp_path / "table.csv")
    old = _rows(rng, 3)
    _harness.write_rows(path, FIELDS, old)
    assert _harness.read_rows(path) == _as_read(old)

    class Full(Exception):
        pass

    def fail(self, row):
        raise Full

    monkeypatch.setattr("csv.DictWriter.writerow", fail)
    with pytest.raises(Full):  # a failed rewrite leaves the old table, and nothing beside it
        _harness.write_rows(path, FIELDS, _rows(rng, 3))
    monkeypatch.undo()
    assert _harness.read_rows(path) == _as_read(old) and os.listdir(tmp_path) == ["table.csv"]
    _harness.write_rows(None, FIELDS, old)  # an optional output left out
    _harness.write_text(str(tmp_path / "r" / "report.md"), "| a |\n")
    assert open(tmp_path / "r" / "report.md").read() == "| a |\n"


def test_worker_results_are_read_from_its_prefixed_lines(tmp_path, rng):
    values = [
        dict(method=f"m{i}", ms=round(float(v), 3))
        for i, v in enumerate(rng.random(int(rng.integers(1, 4))))
    ]
    script = tmp_path / "worker.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {_harness.ROOT!r})
        from benchmarks import _harness
        spec = _harness.worker_spec()
        print("noise", flush=True)
        for value in spec["values"]:
            _harness.emit("ROW ", value)
        sys.exit(spec["code"])
    """)
    )
    proc, got = _harness.run_worker(str(script), {"values": values, "code": 3}, "ROW ")
    assert (
        proc.returncode == 3 and got == values
    )  # what a worker printed before it died still counts
    assert _harness.worker_spec(["--sizes", "7"]) is None  # the script run as itself


def test_rounds_interleave_the_calls():
    order = []
    calls = [lambda i=i: order.append(i) for i in range(3)]
    times = _harness.interleaved_times(calls, rounds=2, per_round=2)
    assert order == [0, 0, 1, 1, 2, 2] * 2 and [len(t) for t in times] == [4, 4, 4]
    order.clear()
    _harness.interleaved_times(
        calls, rounds=2, per_round=5, budget=0.0
    )  # over budget after one call a round
    assert order == [0, 1, 2, 0, 1, 2]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_peak_rss_is_read_and_reset():
    _harness.reset_peak_rss()
    assert 0 < _harness.status_kb("VmRSS") <= _harness.status_kb("VmHWM")
    with pytest.raises(KeyError):
        _harness.status_kb("NoSuchKey")


def test_intervals_format_as_the_reports_print_them():
    assert _harness.format_interval(None) == "-" and _harness.mean_std([]) == "-"
    assert _harness.format_interval(_harness.mean_interval([1.5])) == "+1.50 (one seed)"
    assert _harness.mean_std([91.0]) == "91.00" and _harness.mean_std([1.0, 3.0]) == "2.00 ± 1.41"
