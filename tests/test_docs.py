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
