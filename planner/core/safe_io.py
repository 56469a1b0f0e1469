"""Small checks every stage uses before it touches a path the user (or a file the user gave) named.

* `check_name`: a recipe or artifact name becomes part of a file path, so it must be a plain name: a safe
  character set, no separators, no `..`.
* `path_inside`: every path built from a name is proven to stay inside its root (after resolving symlinks)
  before anything is written or removed there.
* `check_regular_file`: inputs are regular files of bounded size. A FIFO would block forever, /dev/zero would
  read until memory runs out, and a directory or socket can't be read at all.

Each failure is a one-line `PlannerError` naming what was wrong and what to do.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from planner.core.errors import PlannerError

# Letters, digits and . _ + - ; starts with a letter or digit; at most 64 characters. No '/', '\\', ':', spaces,
# no rich markup brackets, and (checked apart) no '..'.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
MAX_PATH_CHARS = 4096


def check_name(name: str, what: str = "recipe name") -> str:
    """`name` if it is safe as one path component, else a PlannerError."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        shown = repr(name)[:80]
        raise PlannerError(f"{what} {shown} is not allowed: use 1-64 letters, digits and . _ + - "
                           "(starting with a letter or digit, no '..'); rename it")
    return name


def path_inside(root: Path, *parts: str) -> Path:
    """root/parts..., resolved, after proving it lies inside root (symlinks followed on both sides)."""
    base = Path(root).resolve()
    target = base.joinpath(*parts).resolve()
    if target == base or not target.is_relative_to(base):
        raise PlannerError(f"{'/'.join(parts)!r} would leave {root}; use a plain name without '/' or '..'")
    return target


def check_regular_file(path: str | os.PathLike[str], what: str, max_bytes: int | None = None) -> Path:
    """A readable regular file (symlinks to one are fine), not empty, at most max_bytes; else a PlannerError."""
    text = os.fspath(path)
    if len(text) > MAX_PATH_CHARS:
        raise PlannerError(f"{what} path is {len(text):,} characters long; give a shorter path")
    p = Path(text)
    try:
        info = p.stat()
    except FileNotFoundError:
        raise PlannerError(f"{what} {text}: no such file; check the path") from None
    except OSError as exc:
        raise PlannerError(f"{what} {text} cannot be read ({exc.strerror or exc}); check the path") from None
    if stat.S_ISDIR(info.st_mode):
        raise PlannerError(f"{what} {text} is a directory, not a file; name the file inside it")
    if not stat.S_ISREG(info.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a device or socket"
        raise PlannerError(f"{what} {text} is {kind}, not a regular file; save it to a file and pass that")
    if info.st_size == 0:
        raise PlannerError(f"{what} {text} is empty (0 bytes); re-save or re-download it")
    if max_bytes is not None and info.st_size > max_bytes:
        raise PlannerError(f"{what} {text} is {info.st_size:,} bytes, more than the {max_bytes:,} allowed; "
                           "is it the right file?")
    try:
        with p.open("rb"):
            pass
    except OSError as exc:
        raise PlannerError(f"{what} {text} cannot be read ({exc.strerror or exc}); check its permissions") from None
    return p


def read_text_capped(path: str | os.PathLike[str], what: str, max_bytes: int) -> str:
    """The text of a small regular file (a recipe or config file), read only after check_regular_file."""
    p = check_regular_file(path, what, max_bytes)
    try:
        return p.read_bytes()[: max_bytes + 1].decode("utf-8")
    except UnicodeDecodeError:
        raise PlannerError(f"{what} {os.fspath(path)} is not UTF-8 text; is it the right file?") from None


__all__ = ["MAX_PATH_CHARS", "NAME_PATTERN", "check_name", "check_regular_file", "path_inside", "read_text_capped"]
