"""The examples in the docstrings run: a docstring that shows the API wrongly misleads its reader
(the RFPLearner example showed an update on the second tick after the default loss began waiting for
its whitenings, and nobody noticed, since nothing ran it)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import learner
import service


def _modules() -> list[str]:
    names = []
    for package in (learner, service):
        for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
            names.append(info.name)
    return sorted(names)


def _has_examples(name: str) -> bool:
    module = importlib.import_module(name)
    return any(t.examples for t in doctest.DocTestFinder().find(module))


MODULES = [name for name in _modules() if _has_examples(name)]


def test_some_modules_have_examples() -> None:
    assert {"learner.rfp", "learner.bptt"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_the_examples_in_the_docstrings_run(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (see above)"
