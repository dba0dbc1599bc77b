"""Crash-safe writes: a file or a whole directory appears complete or not at all.

Everything is written under a temporary name in the destination's own directory (so the final
``rename`` never crosses a file system), flushed to disk with ``fsync``, then renamed into place,
and the parent directory is fsynced so the rename itself survives a power cut. A hard crash can
leave a hidden ``.NAME.tmp-*`` entry behind, never a half-written ``NAME``.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    """Flush a directory entry table (makes renames and creations durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Fsync every regular file and directory under ``root`` (callers may write with plain open)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            file_path = Path(dirpath) / name
            if file_path.is_symlink():
                continue
            fd = os.open(file_path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _remove(path: Path) -> None:
    """Remove a file or directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def refuse_replacing_input(outputs: Iterable[Path], inputs: Iterable[Path]) -> None:
    """Stop before an output path would replace one of the command's input files (the same
    file, also through a link): `predict --data x.csv --out x.csv` must not destroy the data;
    or is a directory."""
    sources = [p for p in inputs if p.is_file()]
    for out in outputs:
        if out.is_dir():  # found before the work, not when the result is moved there
            raise ValueError(f"{out} is a directory where a file is written; give a file path")
        if not out.is_file():
            continue
        for src in sources:
            if os.path.samefile(out, src):
                what = "an input file" if out == src else f"the input file {src}"
                raise FileExistsError(f"{out} is {what}: writing there would replace it; "
                                      "choose another output path")


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically, replacing any existing file.

    Parameters
    ----------
    path:
        Destination file; its parent directory is created if missing.
    data:
        The complete new content.
    mode:
        Permission bits of the new file. They are set before any byte is written, so a
        ``0o600`` secret is never readable by others, not even briefly.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp creates the file 0600 in the same directory, so os.replace stays atomic.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str, mode: int = 0o644) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(Path(path), text.encode("utf-8"), mode=mode)


def _exists_error(final: Path) -> FileExistsError:
    return FileExistsError(
        errno.EEXIST,
        f"{final} already exists; expected a new path (pass replace=True to overwrite it)",
        str(final),
    )


@contextmanager
def atomic_dir(final: Path, *, replace: bool = False, mode: int = 0o755) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it to ``final`` on success.

    Parameters
    ----------
    final:
        Path the finished directory should have. Its parent is created if missing.
    replace:
        If ``final`` already exists: ``False`` raises :class:`FileExistsError` (checked both
        before and after the body runs); ``True`` moves the old entry aside, renames the new
        directory in and then deletes the old one.
    mode:
        Permission bits of the finished directory.

    Yields
    ------
    Path
        An empty temporary directory next to ``final``; write the contents there.

    Notes
    -----
    If the body raises, the temporary directory is removed and ``final`` is untouched. With
    ``replace=True`` there is a window of two renames in which ``final`` is absent; readers
    see either the old or the new complete directory, or none.

    Examples
    --------
    >>> with atomic_dir(Path("out/v3")) as tmp:  # doctest: +SKIP
    ...     (tmp / "a.txt").write_text("hello")
    """
    final = Path(final)
    if final.exists() and not replace:
        raise _exists_error(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, mode)
        _fsync_tree(tmp)
        _commit(tmp, final, replace)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(final.parent)


def _commit(tmp: Path, final: Path, replace: bool) -> None:
    """Rename the finished temporary directory ``tmp`` to ``final``."""
    if not (final.exists() or final.is_symlink()):
        # os.rename onto a non-empty directory fails (ENOTEMPTY), so a racing writer
        # cannot be silently overwritten.
        os.rename(tmp, final)
        return
    if not replace:
        raise _exists_error(final)
    aside = final.parent / f".{final.name}.old-{secrets.token_hex(4)}"
    os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(aside, final)  # put the old version back so `final` is never lost
        raise
    _remove(aside)
