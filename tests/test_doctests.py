"""Every docstring example in the package runs and prints what it shows (``doctest``)."""

import doctest
import importlib
import pkgutil

import pytest

import gradtx

MODULES = sorted(info.name for info in pkgutil.walk_packages(gradtx.__path__, "gradtx.") if not info.name.endswith("__main__"))


def test_the_package_has_examples():
    assert len(MODULES) > 20


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), verbose=False, report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (printed above)"
