"""The distribution's name and version: the one place both are written.

``pyproject.toml`` reads the version from here (``[tool.setuptools.dynamic]``), so the package metadata,
the wheel's file name and every ``--version`` agree. The distribution is ``warlock-fleet`` (``warlock`` on
PyPI is an unrelated project); import packages (``shared``, ``services``) and console scripts keep their
names. Reading these constants costs the agent nothing: no ``importlib.metadata`` at run time.
"""

from __future__ import annotations

import re

DISTRIBUTION = "warlock-fleet"
__version__ = "0.1.0"


def wheel_name(distribution: str = DISTRIBUTION, version: str = __version__) -> str:
    """The file name of the pure-Python wheel of `distribution` at `version` (PEP 427 / 491 escaping)."""
    escaped = re.sub(r"[-_.]+", "_", distribution).lower()
    return f"{escaped}-{version.replace('-', '_')}-py3-none-any.whl"
