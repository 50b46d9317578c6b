"""Where wsss_fast keeps what it derives from data, and how it writes files safely."""

import os
import uuid
from pathlib import Path

CACHE_ENV_VAR = "WSSS_FAST_CACHE"


def cache_root() -> Path:
    """The cache directory: ``$WSSS_FAST_CACHE``, else ``$XDG_CACHE_HOME/wsss_fast``
    (``~/.cache/wsss_fast`` when XDG_CACHE_HOME is unset). Not created here."""
    configured = os.environ.get(CACHE_ENV_VAR)
    if configured:
        return Path(configured).expanduser()
    xdg_cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg_cache).expanduser() if xdg_cache else Path.home() / ".cache"
    return base / "wsss_fast"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file in the same folder and a
    rename, so a reader never sees a half-written file, even after a crash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name (not mkstemp, whose 0600 mode would stick to the result) in the same
    # folder, so the rename stays on one file system and is atomic.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "xb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``atomic_write_bytes`` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))
