"""Runs the examples in the package's docstrings, so the documentation cannot drift from the code."""

import doctest
import importlib
import pkgutil

import keras
import numpy as np
import pytest
import tensorflow as tf

import faqd_tf

MODULES = sorted(
    name
    for _, name, _ in pkgutil.walk_packages(faqd_tf.__path__, prefix="faqd_tf.")
    if not name.endswith("__main__")
)


# Modules without a runnable example, and why; every other module must try at least one.
WITHOUT_EXAMPLES = {
    "faqd_tf._version": "the version string",
    "faqd_tf.cli": "runs a process; tests/test_cli.py drives it",
    "faqd_tf.data": "load() needs a dataset on disk or a download; tests/test_data.py builds them",
    "faqd_tf.data.files": "image folders; tests/test_data.py builds them",
    "faqd_tf.data.pipeline": "tf.data plumbing behind faqd_tf.data.load",
    "faqd_tf.data.tfds": "TFDS downloads (no internet here)",
    "faqd_tf.distribute": "needs TF_CONFIG and several processes; tests/test_multi_worker.py starts them",
}


def test_modules_without_examples_exist():
    assert set(WITHOUT_EXAMPLES) <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(
        module,
        extraglobs={"np": np, "tf": tf, "keras": keras},
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
        verbose=False,
    )
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
    if name in WITHOUT_EXAMPLES:
        assert result.attempted == 0, f"{name} has examples now: take it off WITHOUT_EXAMPLES"
    else:
        assert result.attempted > 0, (
            f"{name} has no docstring example; add one (or a reason to WITHOUT_EXAMPLES)"
        )


def test_readme_python_examples(tmp_path, monkeypatch):
    """The README's Python blocks run as written."""
    import os
    import re

    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    assert (tmp_path / "student.keras").exists()
