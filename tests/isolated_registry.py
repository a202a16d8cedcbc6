"""A pytest fixture for tests that register methods from temporary folders (tests/test_methods_plugins.py,
tests/test_adding_a_method.py): the registry, its entry-point flag and sys.path are restored after the test, and
the modules imported from the test's tmp_path are forgotten, so that no other test sees those methods."""

import sys

import pytest

from methods import registry


@pytest.fixture
def isolated(tmp_path):
    saved = (dict(registry._REGISTRY), registry._entry_points_loaded, list(sys.path))
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved[0])
    registry._entry_points_loaded = saved[1]
    sys.path[:] = saved[2]
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]
