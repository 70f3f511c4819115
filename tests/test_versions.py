"""Run records' versions: the installed packages' own version strings, read without importing them."""

from __future__ import annotations

import sys

import numpy
import torch

import kobllla
from kobllla.versions import package_versions


def test_versions_are_what_the_packages_report_and_a_missing_one_is_named():
    got = package_versions("torch", "numpy", "kobllla", "python", "no-such-package-kobllla")
    assert got == {"torch": torch.__version__, "numpy": numpy.__version__, "kobllla": kobllla.__version__,
                   "python": sys.version.split()[0], "no-such-package-kobllla": "not installed"}
    assert list(got) == ["torch", "numpy", "kobllla", "python", "no-such-package-kobllla"]  # in the order asked
