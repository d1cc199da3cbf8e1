"""Where a build writes: a staging directory swapped in whole, never a user's data touched.

A build refuses an output path that holds anything but a leapc engine (or an empty
directory), replaces an engine only when told to (``force``), and writes into a hidden
sibling directory that replaces the target in one ``rename`` once it is complete. So a
failed, interrupted or killed build leaves the previous engine as it was, and the target
path is at every moment either the old engine, the new one, or (a first build) absent.
Two builds of one path exclude each other with a lock file beside it: the second is
refused, never interleaved.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from leapc.ir.errors import InputError
from leapc.runtime.manifest import MANIFEST_FILE

_STAGING = ".leapc-build-"  # <parent>/.<name>.leapc-build-XXXX: a build in progress
_LOCK = ".leapc-lock"  # <parent>/.<name>.leapc-lock: held while a build of <name> runs


@contextlib.contextmanager
def staged_output(target: str | Path, force: bool, inputs: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield an empty directory to build into; on a clean exit it becomes ``target``.

    ``inputs`` are the paths the build reads (model, tokenizer, corpora, ...): none may lie
    inside ``target``, which the swap would delete.
    """
    path = check_output(target, force, inputs)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # read-only filesystem, quota, ...
        raise InputError(f"cannot write the engine to {path}: {err.strerror}") from None
    with _exclusive(path):
        _remove_stale_staging(path)
        staging = _new_sibling(path, _STAGING)
        try:
            yield staging
            _recheck_target(path, force)  # it may have changed during the build's minutes
            _swap_in(staging, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def check_output(target: str | Path, force: bool, inputs: Iterable[Path] = ()) -> Path:
    """The absolute target path, or an `InputError` if a build may not write there."""
    if not str(target).strip():
        raise InputError("the output path is empty: name the engine directory to write")
    path = Path(target).expanduser().absolute()
    resolved = path.resolve()
    if resolved == Path(resolved.anchor) or Path.cwd().resolve().is_relative_to(resolved):
        raise InputError(f"refusing to write the engine to {target}: it is (or contains) the "
                         "current directory; name a new directory")
    for source in inputs:
        if Path(source).expanduser().resolve().is_relative_to(resolved):
            raise InputError(f"refusing to write the engine to {target}: it contains the "
                             f"build's input {source}")
    _recheck_target(path, force)
    _check_writable(path)
    return path


def _check_writable(path: Path) -> None:
    """The nearest existing ancestor of ``path`` is a directory this user may write in."""
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"cannot write the engine to {path}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"cannot write the engine to {path}: {ancestor} is not writable")


def _recheck_target(path: Path, force: bool) -> None:
    """Refuse a target that holds anything but an engine, or an engine without ``force``."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise InputError(f"refusing to write the engine to {path}: it exists and is not a "
                         "directory")
    if not path.is_dir() or not any(path.iterdir()):
        return
    foreign = _foreign_entries(path)
    if foreign is None:
        raise InputError(f"refusing to write the engine to {path}: it exists and is not a leapc "
                         "engine (nothing was changed; name a new or empty directory)")
    if foreign:
        raise InputError(f"refusing to replace the engine at {path}: it also holds "
                         f"{', '.join(sorted(foreign))}, which is not part of the engine")
    if not force:
        raise InputError(f"{path} holds an engine already; pass --force to replace it")


def _foreign_entries(path: Path) -> set[str] | None:
    """The top-level entries of ``path`` that its engine did not write (a user's files);
    None if ``path`` holds no leapc manifest (of any schema version) at all."""
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or "schema_version" not in manifest:
        return None
    return {entry.name for entry in path.iterdir()} - _engine_entries(manifest)


def _engine_entries(manifest: dict) -> set[str]:
    """Top-level names a build writes for ``manifest``: the manifest, the tokenizer, each
    program file (an ONNX external-data file beside it, and the files it lists as its data,
    such as an int8 program's compiled kernels), the add-on directories."""
    def field(*keys: str):
        value = manifest
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    programs = field("programs") if isinstance(field("programs"), dict) else {}
    files = [entry.get("file") for entry in programs.values() if isinstance(entry, dict)]
    names = {MANIFEST_FILE, field("tokenizer", "file") or "tokenizer.json"}
    names |= {f for f in files if isinstance(f, str)} | {f"{f}.data" for f in files
                                                          if isinstance(f, str)}
    names |= {name for entry in programs.values() if isinstance(entry, dict)
              and isinstance(entry.get("data_files"), dict) for name in entry["data_files"]}
    names |= {field(addon, "directory") for addon in ("datastore", "heads", "adapter")}
    return {name for name in names if isinstance(name, str)}


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold ``<parent>/.<name>.leapc-lock`` (flock); refuse if another build holds it."""
    lock = path.parent / f".{path.name}{_LOCK}"
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise InputError(f"cannot write the engine to {path}: {err.strerror} "
                             f"({path.parent})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InputError(f"another build is writing {path}; wait for it to finish") from None
        # The holder before us unlinks the file before releasing it: if we locked that
        # unlinked file, the lock guards nothing, so take the file that is there now.
        if _same_file(fd, lock):
            break
        os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        here = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (here.st_dev, here.st_ino)


def _new_sibling(path: Path, infix: str) -> Path:
    """A new directory ``<parent>/.<name><infix><random>`` with the umask's permissions
    (unlike ``tempfile.mkdtemp``'s 0700: it becomes the engine directory)."""
    while True:
        candidate = path.parent / f".{path.name}{infix}{secrets.token_hex(4)}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue


def _remove_stale_staging(path: Path) -> None:
    """Staging directories of builds that were killed (SIGKILL, power loss): with the lock
    held, no live build owns one."""
    prefix = f".{path.name}{_STAGING}"
    for entry in path.parent.iterdir():
        if entry.name.startswith(prefix) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)


def _swap_in(staging: Path, path: Path) -> None:
    """Make ``staging`` the directory at ``path``; the old one (if any) ends at ``staging``
    and is removed by the caller. With ``renameat2(RENAME_EXCHANGE)`` the swap is one
    atomic step; elsewhere the old directory is renamed aside first, so ``path`` is briefly
    absent, never half-written."""
    if not path.exists():
        os.rename(staging, path)
        return
    if _exchange(staging, path):
        return
    aside = path.parent / f".{path.name}{_STAGING}old-{secrets.token_hex(4)}"  # swept if killed
    os.rename(path, aside)
    os.rename(staging, path)
    os.rename(aside, staging)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux ``renameat2``); False where it is unavailable."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    status = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if status == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS):  # a kernel or filesystem without it
        return False
    raise OSError(code, os.strerror(code), str(b))
