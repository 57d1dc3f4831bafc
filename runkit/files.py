"""Files a run writes and reads: atomic writes with the modes of a plain ``open``, failed writes named and reported as
one line (:func:`writing`, :func:`write_failures`), temporary files a killed writer left, regular-file checks, content
fingerprints, and the checks of output locations before any work starts."""
from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from runkit.errors import UserError, WriteError, is_write_failure, write_failure


def process_umask() -> int:
    """This process's umask, read without changing it (``/proc/self/status``), else by setting and restoring it."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp's names: prefix, 8 characters of this alphabet, suffix (tempfile._RandomNameSequence)
_TEMPORARY_NAME = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp")


@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike, mode: str, **open_kwargs: Any) -> Iterator[Any]:
    """Open a temporary file ``.<name>.XXXXXXXX.tmp`` beside ``path`` (see :func:`remove_stale_temporary_files`); on
    success fsync it and rename it onto ``path``, on failure remove it.

    The file gets the mode a plain ``open`` would give it: an existing ``path``'s mode, else 0666 less the umask
    (``mkstemp`` alone creates 0600, unreadable to the colleagues the umask admits).
    """
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            try:
                file_mode = path.stat().st_mode & 0o7777
            except FileNotFoundError:
                file_mode = 0o666 & ~process_umask()
            os.fchmod(fd, file_mode)
            with os.fdopen(fd, mode, **open_kwargs) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """An ``OSError`` raised inside the block, which writes ``path``, becomes a
    :class:`~runkit.errors.WriteError` naming ``path`` (what :func:`write_failures` reports).

    Args:
        path: the output written inside the block.
    """
    try:
        yield
    except WriteError:
        raise
    except OSError as err:
        raise WriteError(err.errno, err.strerror or str(err), os.fspath(path)) from err


@contextlib.contextmanager
def write_failures(advice: str) -> Iterator[None]:
    """A failed write inside the block (:func:`runkit.errors.is_write_failure`: a full disk, an unwritable file)
    becomes one :class:`UserError`, ``cannot write <file>: <why>; the files written before it are complete: free
    space, then <advice>`` (:func:`runkit.errors.write_failure`). Every writer of a run writes atomically or
    appends whole rows, so what was written before the failure is complete.

    Args:
        advice: what to run once the cause is gone, e.g. ``"rerun the same command with --resume"``.
    """
    try:
        yield
    except OSError as err:
        if not is_write_failure(err):
            raise
        raise write_failure(err, advice) from None


def remove_stale_temporary_files(folder: str | os.PathLike, names: Sequence[str]) -> list[Path]:
    """Remove the temporary files that atomic writes of ``folder/<name>`` (each of ``names``) left when their process
    was killed (call only while holding the folder's (or the files') run lock: a live writer's temporary file looks
    the same).

    Only the exact names :func:`_atomic_file` gives its temporary files, ``.<name>.XXXXXXXX.tmp``, match: those of
    other outputs beside ours (``a.tsv2``, ``a.tsv_backup`` beside ``a.tsv``) are left alone.

    Args:
        folder: the folder.
        names: the file names (globs, e.g. ``checkpoint-*.pth.tar``) whose temporary files to remove.
    """
    folder = Path(folder)
    stale = []
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = _TEMPORARY_NAME.fullmatch(p.name)
        if match and any(fnmatch.fnmatchcase(match["name"], n) for n in names) and p.is_file() and not p.is_symlink():
            stale.append(p)
    for p in stale:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return stale


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: never a half-written file; beside it
    ``<path>.sha256`` (:func:`content_hash_path`) records the SHA-256 of its bytes, which
    :func:`runkit.checkpoints.load` verifies (torch's zip reader checks no CRC: flipped bytes load as other weights).

    The old record goes first: a kill between the two writes leaves a file without a record (loaded with a
    warning), never a record of other bytes (refused as damaged).

    Args:
        obj: what to save.
        path: the file.
    """
    import torch

    path = Path(path)
    record = content_hash_path(path)
    with writing(record):
        record.unlink(missing_ok=True)
    with _atomic_file(path, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as err:  # torch reports a failed write as "unexpected pos" (inline_container.cc)
            cause = _os_error_in(err)
            if cause is None:
                raise
            raise cause from None
    atomic_write_text(record, f"{sha256_of(path)}  {path.name}\n")  # the format of sha256sum (-c checks it)


def _os_error_in(err: BaseException) -> Optional[OSError]:
    """The ``OSError`` that caused ``err`` (its ``__cause__`` or ``__context__`` chain), None when there is none."""
    seen = err
    while seen is not None and not isinstance(seen, OSError):
        seen = seen.__cause__ or seen.__context__
    return seen


def content_hash_path(path: str | os.PathLike) -> Path:
    """``<path>.sha256``: the SHA-256 of a file this project wrote (:func:`atomic_torch_save`)."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def sha256_of(path: str | os.PathLike) -> str:
    """The SHA-256 (hex) of a file's whole content."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def recorded_content_hash(path: str | os.PathLike) -> Optional[str]:
    """The SHA-256 recorded beside ``path`` (:func:`content_hash_path`): None without a record, ``""`` for a record
    that holds none (it matches no file)."""
    try:
        text = content_hash_path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    match = re.match(r"\s*([0-9a-fA-F]{64})\b", text)
    return match[1].lower() if match else ""


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to a temporary file beside ``path``, fsync, rename: never a half-written file."""
    with _atomic_file(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_save_figure(fig: Any, path: str | os.PathLike, **savefig_kwargs: Any) -> None:
    """``fig.savefig`` (matplotlib; the format from the suffix) to a temporary file beside ``path``, then rename: a
    failed write leaves the previous figure whole."""
    with _atomic_file(path, "wb") as f:
        fig.savefig(f, format=Path(path).suffix.lstrip(".").lower() or None, **savefig_kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Regular files
# ---------------------------------------------------------------------------------------------------------------

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def check_regular_file(path: str | os.PathLike, flag: str = "", folder_ok: bool = False) -> bool:
    """Refuse at once an existing ``path`` that is no regular file (links followed): reading a FIFO waits for a
    writer forever, writing one for a reader, and ``/dev/zero`` never ends. Every file a run reads whole or writes
    is checked here first (fingerprints, checkpoints, logs, outputs).

    Args:
        path: the path.
        flag: the flag that gave it, named first in the error (empty: the path alone).
        folder_ok: a folder passes too.

    Returns:
        whether ``path`` exists.
    Raises:
        UserError: ``<flag> <path>: is a FIFO, not a regular file`` (a folder, a character device, ...).
    """
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # (a path under a file: it does not exist)
        return False
    except OSError as err:
        raise UserError(f"{flag + ' ' if flag else ''}{path}: cannot be read ({err.strerror})") from None
    if stat.S_ISREG(mode) or (folder_ok and stat.S_ISDIR(mode)):
        return True
    kind = next((name for test, name in _KINDS if test(mode)), "a special file")
    raise UserError(f"{flag + ' ' if flag else ''}{path}: is {kind}, not a regular file")


# ---------------------------------------------------------------------------------------------------------------
# Content fingerprints
# ---------------------------------------------------------------------------------------------------------------

FINGERPRINT_FULL_BYTES = 64 << 20  # files up to this size are hashed whole
FINGERPRINT_CHUNK = 64 << 10
FINGERPRINT_CHUNKS = 256  # larger files: this many chunks, evenly spaced, first and last included


def file_fingerprint(path: str | os.PathLike, flag: str = "") -> str:
    """``"<size>:<sha256 hex>"`` of a file's content (of a folder's files), cheap even for multi-GB checkpoints.

    Up to 64 MiB the whole file is hashed; above, 256 chunks of 64 KiB evenly spaced from the first byte to the last
    (16 MiB read, well under a second for a 2 GB file). Two checkpoints of one architecture differ in every
    floating-point chunk, so a sample tells them apart; the size is part of the fingerprint.

    Args:
        path: the file (or folder).
        flag: the flag that gave it (named in the error when it is a FIFO or a device: :func:`check_regular_file`).
    """
    path = Path(path)
    check_regular_file(path, flag, folder_ok=True)
    if path.is_dir():  # a Hugging Face folder: the fingerprints of its files
        files = sorted(q for q in path.rglob("*") if q.is_file() and not q.name.startswith("."))
        digest = hashlib.sha256("".join(f"{q.relative_to(path)}={file_fingerprint(q)};" for q in files).encode())
        return f"{sum(q.stat().st_size for q in files)}:{digest.hexdigest()}"
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FINGERPRINT_FULL_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        else:
            last = size - FINGERPRINT_CHUNK
            for i in range(FINGERPRINT_CHUNKS):
                f.seek(last * i // (FINGERPRINT_CHUNKS - 1))
                digest.update(f.read(FINGERPRINT_CHUNK))
    return f"{size}:{digest.hexdigest()}"


def check_fingerprint(path: str | os.PathLike, recorded: Optional[str], flag: str, where: str) -> None:
    """Refuse ``path`` when its content differs from the fingerprint ``recorded`` for it (None: nothing recorded).

    Args:
        path: the file given now.
        recorded: its :func:`file_fingerprint` at the time of ``where``.
        flag: the flag that names the file (for the message).
        where: what recorded it, e.g. ``"the log runs/a.tsv"``.
    """
    if recorded is not None and file_fingerprint(path, flag) != recorded:
        raise UserError(f"{flag} {path}: not the file {where} was written with (same name, other content); "
                        "resume with that very file, or start a new output")



# ---------------------------------------------------------------------------------------------------------------
# Validation of output locations (before any work starts)
# ---------------------------------------------------------------------------------------------------------------


def _first_existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_creatable_under(path: Path, flag: str, shown: str | os.PathLike) -> None:
    """The nearest existing ancestor of ``path`` must be a folder we may write into."""
    base = _first_existing(path)
    if not base.is_dir():
        raise UserError(f"{flag} {shown}: {base} is a file, not a folder; choose another {flag}")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {shown}: cannot create files in {base} (permission denied); choose another {flag}")


def check_output(path: str | os.PathLike, flag: str, folder: bool = False) -> Path:
    """Check, before any work starts, that ``path`` can be written: an existing writable file (or folder when
    ``folder``), or creatable (its nearest existing ancestor is a folder we may write into). Creates nothing.

    Args:
        path: the output file, or folder when ``folder``.
        flag: the flag that names it (every error names it).
        folder: whether ``path`` is an output folder.

    Returns:
        ``path`` as a Path.
    """
    p = Path(path)
    if folder and p.exists() and not p.is_dir():
        raise UserError(f"{flag} {path}: exists and is not a folder; choose another {flag}")
    if not folder and p.is_dir():
        raise UserError(f"{flag} {path}: is a folder; name a file")
    if not folder:
        check_regular_file(p, flag)
    if not folder:
        check_changeable(p, f"{flag} ")
    if not folder and p.exists() and not os.access(p, os.W_OK):
        raise UserError(f"{flag} {path}: not writable (permission denied); choose another {flag}")
    _check_creatable_under(p if folder else p.parent, flag, path)
    return p


def check_changeable(path: str | os.PathLike, what: str = "") -> None:
    """Refuse, before any work, an existing output a run will change (append to, cut back, replace, remove) that no
    write may change: append-only or immutable (``chattr +a`` / ``+i``, which even root cannot write through), or
    read-only. Checked by opening it for reading and writing, which changes nothing; a missing ``path`` passes.

    Args:
        path: the file (a regular one: :func:`check_regular_file` first).
        what: the start of the error, e.g. ``"--outfile "`` (the path follows).
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as err:
        raise UserError(f"{what}{path}: cannot be written ({err.strerror}): a file that is append-only or immutable "
                        "(chattr +a / +i; lsattr shows it) or read-only cannot be continued; make it writable "
                        "(chattr -a -i), or write elsewhere") from None
    os.close(fd)


@contextlib.contextmanager
def output_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Create ``folder`` (and missing parents) for a run; if the run then fails, remove the folders this created
    that are still empty, so that a refused run leaves nothing behind.

    Args:
        folder: the folder a run writes into.
    """
    folder = Path(folder)
    missing, p = [], Path(os.path.abspath(folder))
    while not p.exists():
        missing.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    except BaseException:
        for d in missing:  # the deepest first
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
