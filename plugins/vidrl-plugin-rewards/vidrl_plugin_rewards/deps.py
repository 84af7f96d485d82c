"""Optional dependencies: a missing one is a one-line error naming the extra that installs it."""

from __future__ import annotations

import importlib
from types import ModuleType

from trl_video.errors import TrlVideoError


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module`` or raise ``TrlVideoError`` naming ``pip install vidrl-plugin-rewards[extra]``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise TrlVideoError(f"{what} needs the '{module}' package: pip install 'vidrl-plugin-rewards[{extra}]' "
                            f"({type(exc).__name__}: {exc})") from None
