"""Writing results safely, and storing paths so that a committed artifact names no machine.

- `writable_dir`: create an output folder and prove it can be written before any work starts.
- `atomic_write`: write a file under a temporary name and rename it into place, so a reader (or a run
  killed half-way) never sees a partial file.
- `stored_path`: the string a result file records for a path — relative to the repository when the path is
  inside it (the shipped defaults, `runs/`, `figures/`), as given otherwise.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

REPOSITORY = Path(__file__).resolve().parent.parent  # the checkout the packages are imported from


def writable_dir(out_dir: str | Path) -> Path:
    """``out_dir`` created if needed and checked writable; an OSError names the folder otherwise."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise OSError(f"{out_dir}: output folder cannot be written ({error.strerror})") from None
    return out_dir


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp)`` on a temporary name beside ``path``, then rename it to ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    write(str(tmp))
    os.replace(tmp, path)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`atomic_write` of a text file (UTF-8)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def stored_path(path: str | Path | None) -> str | None:
    """``path`` as a result file should record it: relative to the repository when inside it."""
    if path is None:
        return None
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(REPOSITORY).as_posix()
    except ValueError:
        return str(path)
