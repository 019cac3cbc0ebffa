"""Where visor writes: output directories it owns, files and directories replaced atomically.

Every command that writes takes an ``--out`` directory and claims it first (``claim``):

- a new or empty directory becomes ours: a marker file (``.visor-output``) records the command
  and the entries (top-level names) it writes there;
- a directory with our marker holds an earlier output of ours: ``overwrite`` replaces it (only if
  it holds nothing we did not write), ``resume`` continues it (training), neither is an error;
- anything else is refused: a file, a directory holding a user's files, an --out that is or
  contains one of the command's inputs.

Files are written under a temporary name beside their target and renamed over it
(``atomic_write``); whole directories (a checkpoint, a data set) are built beside their target
and swapped in (``write_dir``). A kill or a full disk at any moment leaves the previous good
output where it was, and no half-written file where a good one was.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError

MARKER = ".visor-output"


def read_marker(path: Path) -> dict | None:
    """The marker of an output directory of ours, or None."""
    try:
        marker = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("entries"), list) else None


def _write_marker(path: Path, command: str, entries: Iterable[str]) -> None:
    atomic_write(path / MARKER, json.dumps({"command": command, "entries": sorted(set(entries))}) + "\n")


TEMPORARY = re.compile(r"\..+\.visor-tmp-(\d+)")  # .NAME.visor-tmp-PID: a file or directory being written
SWAPPED_OUT = re.compile(r"\..+\.visor-old-(\d+)")  # .NAME.visor-old-PID: a previous output between two renames
SET_ASIDE = re.compile(r"\.visor-old-[a-z0-9_]{8}")  # OUT/.visor-old-XXXXXXXX: an earlier run, kept


def _is_scratch(name: str) -> bool:
    """The marker and the temporary names of ours; anything else in a directory is content."""
    return name == MARKER or any(p.fullmatch(name) for p in (TEMPORARY, SWAPPED_OUT, SET_ASIDE))


def claim(
    out: str | Path,
    command: str,
    entries: Iterable[str] = (),
    inputs: Iterable[str | Path | None] = (),
    overwrite: bool = False,
    resume: bool = False,
    mark: bool = True,
) -> Path:
    """Check that ``command`` may write ``entries`` into ``out`` and (``mark``) mark it ours; with
    ``mark=False`` only check, changing nothing. ``resume``: an earlier output of the same command
    is continued, not an error."""
    out = _plain(out)
    check_not_input(out, inputs)
    with writing(out):
        present = sorted(p.name for p in out.iterdir() if not _is_scratch(p.name)) if out.is_dir() else []
    marker = read_marker(out)
    if marker is None and present:
        shown = ", ".join(present[:3]) + (f" and {len(present) - 3} more" if len(present) > 3 else "")
        raise OutputError(
            f"--out {out} is not empty and visor did not write it (it holds {shown}); choose a new or empty directory"
        )
    if marker is not None:
        mine, theirs = set(marker["entries"]), marker.get("command")
        if present and theirs != command:
            raise OutputError(f"--out {out} holds {_what(theirs)}, not {_what(command)}; choose another directory")
        if present and not (overwrite or resume):
            how = "--resume to continue it or --overwrite to start again" if command == "train" else "--overwrite"
            earlier = _what(command, "an earlier")
            raise OutputError(f"--out {out} holds {earlier}; pass {how}, or choose another directory")
        foreign = [name for name in present if name not in mine]
        if foreign and overwrite:
            raise OutputError(
                f"--out {out} holds files visor did not write ({', '.join(foreign[:3])}); "
                "move them away before --overwrite, or choose another directory"
            )
    if not mark:
        return out
    with writing(out):
        _clean_scratch(out)
        out.mkdir(parents=True, exist_ok=True)
        kept = set(marker["entries"]) if marker and resume else set()
        _write_marker(out, command, kept | set(entries))
    return out


def _plain(out: str | Path) -> Path:
    """--out as an absolute path; a link or a file there is refused (we replace directories)."""
    given = Path(out)
    if given.is_symlink():
        raise OutputError(f"--out {out} is a symbolic link; give the directory itself ({given.resolve()})")
    if given.exists() and not given.is_dir():
        raise OutputError(f"--out {out} is a file; give a directory")
    return Path(os.path.abspath(given))


def _what(command: str, which: str = "the") -> str:
    if command == "checkpoint":  # convert, tiny-model, save
        return "a checkpoint written by visor" if which == "an earlier" else "a checkpoint"
    return f"{which} output of `visor {command}`"


def check_not_input(out: Path, inputs: Iterable[str | Path | None]) -> None:
    """Refuse an --out that is, or contains, one of the inputs (writing it could destroy them)."""
    target = Path(out).resolve()
    for given in inputs:
        if given is None or str(given) == "":
            continue
        source = Path(given).resolve()
        if target == source or target in source.parents:
            what = "is" if target == source else "contains"
            raise OutputError(f"--out {out} {what} the input {given}; choose another directory")


def write_dir(
    out: str | Path,
    command: str,
    build: Callable[[Path], object],
    inputs: Iterable[str | Path | None] = (),
    overwrite: bool = False,
) -> Path:
    """Build a whole directory (a checkpoint, a data set) with ``build(tmp)`` beside ``out``, then
    swap it in: until the swap ``out`` holds its previous content, after it the complete new one."""
    out = _plain(out)
    with writing(out):
        _clean_scratch(out)  # first: a previous output a kill left between two renames is put back
    claim(out, command, (), inputs, overwrite, mark=False)
    tmp = out.parent / f".{out.name}.visor-tmp-{os.getpid()}"
    try:
        with writing(out):
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            _write_marker(tmp, command, ())  # a leftover of a killed run is recognisably ours
            build(tmp)
            _write_marker(tmp, command, [p.name for p in tmp.iterdir() if p.name != MARKER])
            _fsync_dir(tmp)
            _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _swap_in(new: Path, out: Path) -> None:
    """Put ``new`` at ``out``; past the swap nothing can fail (tidying is best effort)."""
    if not out.exists():
        os.rename(new, out)
    else:
        if not _exchange(new, out):  # no atomic exchange here: two renames, the old copy kept meanwhile
            old = out.parent / f".{out.name}.visor-old-{os.getpid()}"
            os.rename(out, old)
            os.rename(new, out)
            new = old
        shutil.rmtree(new, ignore_errors=True)  # the previous content
    _fsync_dir(out.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def atomic_write(path: str | Path, data: str | bytes | Callable[[Path], object]) -> Path:
    """Write a file under a temporary name and rename it over ``path``. ``data``: text, bytes,
    or a function that writes the file it is given (a plot, a torch.save)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.visor-tmp-{os.getpid()}")
    try:
        with writing(path):
            if callable(data):
                data(tmp)
            else:
                with open(tmp, "w" if isinstance(data, str) else "wb") as f:
                    f.write(data)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
FULL_TEXT = tuple(os.strerror(code) for code in FULL)  # how writers without an errno (safetensors, torch) say it


@contextmanager
def writing(target: Path):
    """A write that fails (full disk, file too large, no permission) becomes one OutputError
    naming the target; failures of the Rust/C++ writers (safetensors, torch.save) are told by their text."""
    try:
        yield
    except OSError as e:
        reason = "the disk is full" if e.errno in FULL else e.strerror or str(e)
        raise OutputError(f"cannot write {target}: {reason}; the previous content is unchanged") from None
    except Exception as e:
        if not any(text in str(e) for text in FULL_TEXT):
            raise
        raise OutputError(f"cannot write {target}: the disk is full; the previous content is unchanged") from None


def set_aside(out: Path, command: str, names: Iterable[str]) -> Path | None:
    """Move earlier entries of ours into OUT/.visor-old-XXXXXXXX (deleted by ``drop_aside`` once the new
    output is complete): starting again never destroys the previous good output first."""
    names = [n for n in names if (out / n).exists()]
    if not names:
        return None
    with writing(out):
        aside = Path(tempfile.mkdtemp(prefix=".visor-old-", dir=out))
        _write_marker(aside, command, names)
        for name in names:
            os.rename(out / name, aside / name)
    return aside


def drop_aside(out: Path) -> None:
    """Delete what ``set_aside`` kept (only directories of that name holding our marker)."""
    for path in Path(out).iterdir():
        if SET_ASIDE.fullmatch(path.name) and path.is_dir() and read_marker(path) is not None:
            shutil.rmtree(path, ignore_errors=True)


def _clean_scratch(out: Path) -> None:
    """Tidy what killed runs of ours left beside ``out`` (temporary directories; a previous
    output caught between the two renames of a swap is put back) and inside it (temporary files)."""
    if not out.parent.is_dir():
        return
    stale = []
    for path in sorted(out.parent.iterdir()):
        left = SWAPPED_OUT.fullmatch(path.name) or TEMPORARY.fullmatch(path.name)
        if not left or path.name.rsplit(".", 1)[0] != f".{out.name}" or _alive(left[1]):
            continue
        if path.is_dir() and read_marker(path) is not None:
            if SWAPPED_OUT.fullmatch(path.name) and not out.exists():
                os.rename(path, out)
            else:
                stale.append(path)
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    if out.is_dir() and read_marker(out) is not None:
        remove_stale(out)


def remove_stale(directory: Path) -> None:
    """Delete the temporaries (``.NAME.visor-tmp-PID``) that killed runs left in a directory of ours."""
    for path in Path(directory).iterdir():
        left = TEMPORARY.fullmatch(path.name)
        if left and not _alive(left[1]):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _alive(pid: str) -> bool:
    pid = int(pid)
    if pid == os.getpid():
        return False  # our own leftovers (an earlier call in this process) are stale too
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
