"""Atomic writes (files, text, safetensors) and checked reads of the safetensors files the pipeline
passes between stages: the one place for atomicity, and for the lock that keeps two writers off one
output.

Everything written on the way to an output OUT lives beside it, hidden, and names the process that
owns it: `.OUT.partial-PID-XXXXXXXX` (a folder being built), `.OUT.old-PID-XXXXXXXX` (the folder
being replaced), `.OUT.src-PID-XXXXXXXX` (a fold's scratch), `.OUT.PID-XXXXXXXX.tmp` or `.partial`
(a file being written). A writer holds `.OUT.lock` (flock) while it works; the next writer that
takes the lock removes what a process that no longer runs (a SIGKILL, a power loss) left behind.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


log = logging.getLogger("unlock_export")


# -- who owns what: the output lock and stale leftovers -------------------------------------------

def owned_prefix(out: str | Path, kind: str = "") -> str:
    """The name prefix of a hidden working file or folder beside `out` that this process owns
    (`kind` partial, old, src; none for a temporary file); a random part follows it."""
    name = Path(out).name
    return f".{name}.{kind}-{os.getpid()}-" if kind else f".{name}.{os.getpid()}-"


def _leftover_pattern(name: str) -> re.Pattern:
    """What `owned_prefix` names look like once tempfile added its 8 random characters."""
    n = re.escape(name)
    return re.compile(rf"^\.{n}\.(?:(?:partial|old|src)-(\d+)-[a-z0-9_]{{8}}|(\d+)-[a-z0-9_]{{8}}\.(?:tmp|partial))$")


def _boot_time() -> float | None:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def process_running(pid: int, since: float | None = None) -> bool:
    """Whether process `pid` runs. A zombie does not; nor does one that started after `since` (a
    time stamp of something the owner wrote): that pid was reused by another process."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it runs
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return True  # no /proc: kill's answer is all there is
    if fields[0] in ("Z", "X"):
        return False
    boot = _boot_time()
    if since is not None and boot is not None:
        try:
            started = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
        except (IndexError, ValueError, OSError):
            return True
        if started > since + 2:
            return False
    return True


def clear_stale(out: str | Path) -> list[Path]:
    """Remove what writers of `out` that no longer run left beside it (see the module docstring),
    saying so, and return the paths removed. The progress folder `.OUT.partial` is never touched."""
    out = Path(out)
    pattern = _leftover_pattern(out.name)
    removed = []
    try:
        entries = sorted(out.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if not m:
            continue
        pid = int(m.group(1) or m.group(2))
        try:
            since = entry.lstat().st_mtime
        except OSError:
            continue
        if pid == os.getpid() or process_running(pid, since):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        if not entry.exists():
            removed.append(entry)
            log.warning("removed %s, left by an unlock-export that stopped without cleaning up (pid %d, no "
                        "longer running)", entry, pid)
    return removed


_HELD: dict[str, int] = {}  # lock file -> how many nested output_lock blocks of this process hold it


def _missing_parents(folder: Path) -> list[Path]:
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _lock_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return f" (pid {text})" if text.isdigit() else ""


def _take_lock(lock: Path, out: Path) -> int | None:
    """An open, flock-ed descriptor of `lock`, or None where the file system has no locks."""
    import fcntl

    for _ in range(20):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileNotFoundError:  # a parent removed under us: make it again
            lock.parent.mkdir(parents=True, exist_ok=True)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise UserError(f"another unlock-export{holder} is writing '{out}': wait for it to finish, "
                            "or choose another output") from None
        except OSError:  # ENOLCK, EOPNOTSUPP: a file system without locks
            os.close(fd)
            log.debug("no lock for %s: the file system does not support flock", out)
            return None
        try:  # the holder before us removes the file as it finishes: make sure ours is the live one
            current = os.stat(lock)
            mine = os.fstat(fd)
            same = (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino)
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)
    raise UserError(f"cannot take the lock '{lock}': other unlock-export processes keep replacing it; "
                    "wait for them to finish")


@contextmanager
def output_lock(out: str | Path):
    """Hold `out`'s lock, `.NAME.lock` in its parent, for the block: a second writer of the same output
    (another process) is refused in one line naming this one's pid, instead of both writing. Taking
    it clears what dead writers left beside `out` (`clear_stale`). Nested blocks of one process on the
    same output share the lock. A parent folder made for the lock is removed again if left empty."""
    out = Path(out)
    lock = out.parent / f".{out.name}.lock"
    key = os.path.join(os.path.realpath(out.parent), lock.name)
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    made = _missing_parents(out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = _take_lock(lock, out)
    except BaseException:
        _remove_empty(made)
        raise
    _HELD[key] = 1
    try:
        clear_stale(out)
        yield
    finally:
        del _HELD[key]
        if fd is not None:
            lock.unlink(missing_ok=True)
            os.close(fd)
        _remove_empty(made)


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            break


def note_progress(exc: BaseException, where: str | Path) -> None:
    """Record on an interrupt (Ctrl-C, SIGTERM) where its resumable progress was kept: the command
    line says so in its one line."""
    try:
        exc.progress_kept = str(where)
    except AttributeError:
        pass


# -- atomic writes ----------------------------------------------------------------------------------

@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp"):
    """Yield a temporary path beside `path`; it is renamed onto `path` only when the block succeeds,
    and removed when it fails or is interrupted. The file gets the permissions a plain `open` would
    give it (mkstemp's are owner-only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=owned_prefix(path), suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def refuse_symlink(out: Path) -> None:
    """A folder output must not be a symbolic link: the finished folder would replace the link (or,
    for a link to nothing, fail after all the work), never land where the link points."""
    if out.is_symlink():
        raise UserError(f"output '{out}' is a symbolic link (to '{os.readlink(out)}'): name the folder itself, "
                        "or remove the link")


def follow_umask(folder: Path) -> None:
    """Give every file and folder under `folder` the permissions a plain `open` or `mkdir` would: some
    writers (safetensors' save_file, mkstemp) make files owner-only, and a server running as another user
    could not read them. Hard links (a shard linked from the source or the dequantized cache) are
    someone else's file too, and keep their modes."""
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            info = os.lstat(path)
            if not os.path.islink(path) and info.st_nlink == 1:
                os.chmod(path, 0o666 & ~mask)


@contextmanager
def staging_dir(out: str | Path, overwrite: bool = False):
    """Yield a temporary folder beside `out`; on success it replaces `out`, on any failure (an
    exception, Ctrl-C, SIGTERM) it is removed and `out` is left as it was. `out`'s lock is held
    throughout (`output_lock`). The folder gets the permissions a plain `mkdir` would give it."""
    out = Path(out)
    refuse_symlink(out)
    with output_lock(out):
        work = Path(tempfile.mkdtemp(prefix=owned_prefix(out, "partial"), dir=out.parent))
        os.chmod(work, 0o777 & ~_umask())
        try:
            yield work
            follow_umask(work)
            if out.exists():
                if not overwrite:
                    raise UserError(f"output '{out}' appeared while writing: choose another folder or pass "
                                    "--overwrite")
                trash = Path(tempfile.mkdtemp(prefix=owned_prefix(out, "old"), dir=out.parent))
                os.replace(out, trash / "old")
                os.replace(work, out)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(work, out)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_save(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """Write a safetensors file to a temporary name beside `path`, then rename it into place."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={k: str(v) for k, v in metadata.items()})
    return Path(path)


def read_safetensors(path: str | Path, kind: str, format_tag: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load every tensor and the metadata, checking the file is the expected kind of artifact."""
    import torch
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{kind} file '{path}' not found")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{kind} file '{path}' is not a readable safetensors file ({exc}); write it again")
    if metadata.get("format") != format_tag:
        raise UserError(
            f"'{path}' is not a {kind} file (format '{metadata.get('format', 'missing')}', expected '{format_tag}')"
        )
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"{kind} file '{path}': tensor '{name}' contains NaN or inf; recompute it")
    return tensors, metadata


def json_meta(value) -> str:
    return json.dumps(value, sort_keys=True)


@contextmanager
def progress_folder(output: str | Path, resume: bool, start_over: bool):
    """A folder beside `output` (`.NAME.partial`) where long steps keep their progress.

    It is removed when the block finishes; kept, with a hint to resume, when the block is
    interrupted or fails after saving something. Found from an earlier run, it is used only with
    `resume` and removed with `start_over`; otherwise the caller is told to choose. `output`'s
    lock is held throughout, so no other process uses the folder meanwhile."""
    output = Path(output)
    folder = output.parent / f".{output.name}.partial"
    with output_lock(output):
        if folder.exists() and not resume:
            if not start_over:
                raise UserError(f"an interrupted run left its progress in '{folder}': pass --resume to continue "
                                "it, or --overwrite to start over")
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            yield folder
        except BaseException as exc:
            if not any(folder.iterdir()):
                folder.rmdir()
            elif isinstance(exc, KeyboardInterrupt):  # the command line's one line says where
                note_progress(exc, folder)
            else:
                log.warning("progress kept in %s: rerun the same command with --resume to continue", folder)
            raise
        shutil.rmtree(folder, ignore_errors=True)


def refuse_existing(path: str | Path, overwrite: bool, resume: bool = False) -> None:
    """The one refusal of an output that exists (never overwrite what is there unless asked)."""
    if Path(path).exists() and not (overwrite or resume):
        raise UserError(f"output '{path}' exists: choose another or pass --overwrite")
