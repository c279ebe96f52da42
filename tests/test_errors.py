"""Every exception xrdpipe defines lives in errors.py, derives from XrdpipeError and is drawn in
its docstring tree."""

import importlib
import inspect
import pkgutil

import pytest

import xrdpipe
from xrdpipe import errors
from xrdpipe.errors import ConfigError, WindowSetupError, XrdpipeError


def _modules():
    for info in pkgutil.walk_packages(xrdpipe.__path__, "xrdpipe."):
        if info.name.rsplit(".", 1)[-1] != "__main__":
            yield importlib.import_module(info.name)


def test_every_exception_is_in_the_tree_of_errors_py():
    """Every module, subpackages included; warnings (integrator_cache.CacheWarning) are not errors."""
    defined = {}
    for module in _modules():
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, Exception) and not issubclass(obj, Warning)
                    and obj.__module__.startswith("xrdpipe")):
                defined[f"{obj.__module__}.{obj.__qualname__}"] = obj
    outside = sorted(k for k in defined if not k.startswith("xrdpipe.errors."))
    assert outside == []
    for cls in defined.values():
        assert issubclass(cls, XrdpipeError)
        assert f" {cls.__name__} " in errors.__doc__ or cls is XrdpipeError
    assert sorted(errors.__all__) == sorted(cls.__name__ for cls in defined.values())


def test_window_setup_error_names_each_window():
    exc = WindowSetupError([(0, "window 'a': no O3 110 in range"), (2, "window 'c': unknown phase 'P9'")])
    assert str(exc) == "window 0: window 'a': no O3 110 in range; window 2: window 'c': unknown phase 'P9'"
    assert exc.problems[1] == (2, "window 'c': unknown phase 'P9'")
    assert not isinstance(exc, ValueError) and not isinstance(exc, ConfigError)
    with pytest.raises(XrdpipeError):
        raise exc
