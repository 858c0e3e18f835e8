"""The public API: every name in gradtx.__all__ is importable, documented once, with an update rule and a reference."""

from __future__ import annotations

import inspect

import pytest

import gradtx

PUBLIC = sorted(gradtx.__all__)


def test_all_has_no_duplicates_and_no_private_names():
    assert len(PUBLIC) == len(set(PUBLIC))
    assert not [name for name in PUBLIC if name.startswith("_")]


def test_every_public_callable_is_exported():
    exported = set(PUBLIC)
    missing = [
        name
        for name, value in vars(gradtx).items()
        if not name.startswith("_") and not inspect.ismodule(value) and name not in exported
    ]
    assert not missing, f"public names missing from __all__: {missing}"


@pytest.mark.parametrize("name", PUBLIC)
def test_documented_with_a_reference(name):
    obj = getattr(gradtx, name)
    doc = inspect.getdoc(obj) or ""
    assert doc.strip(), f"{name} has no docstring"
    if inspect.isfunction(obj):
        assert "References:" in doc, f"{name}'s docstring lacks a References section"
        assert "Returns:" in doc or name.endswith("_schedule") or "Example" in doc, f"{name}'s docstring lacks Returns"
