"""The versions a run record stores beside its output (mergekit keeps what produced a merge)."""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version

import kobllla


def package_versions(*names: str) -> dict[str, str]:
    """``{name: version}`` read from the installed packages' metadata, without importing them.

    ``"kobllla"`` is this package's ``__version__`` (a checkout need not be installed) and
    ``"python"`` the interpreter's; a package that is not installed is ``"not installed"``.
    """
    return {name: _version(name) for name in names}


def _version(name: str) -> str:
    if name == "kobllla":
        return kobllla.__version__
    if name == "python":
        return sys.version.split()[0]
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"
