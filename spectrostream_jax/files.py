"""Outputs that appear whole or not at all, and one-line error messages.

Everything this package writes for a person to keep (models, corpora,
datasets, bitstreams, audio, reports, plots) is built under a hidden temp
name beside its final path and renamed over it once complete, so a crash,
a full disk or Ctrl-C never leaves a partial file or clobbers an older
one. Temp files and directories get the usual umask permissions, as a
plain `open` would give them, not the owner-only ones of `tempfile`.
"""

from collections.abc import Iterator
import contextlib
import os
import pathlib
import secrets
import shutil
import tempfile
import threading
import time

PathLike = str | os.PathLike

# Temp files and directories not yet renamed or removed, so that an
# interrupt that ends the process at once can still take them away.
_pending: set[pathlib.Path] = set()
# Set once the process is ending: no new temp path is handed out after.
_ending = threading.Event()
# Time for a temp path named just before the end to be created.
_CREATE_SECONDS = 0.05


def _sweep(paths) -> None:
  for path in paths:
    if path.is_dir() and not path.is_symlink():
      shutil.rmtree(path, ignore_errors=True)
    else:
      path.unlink(missing_ok=True)


def remove_pending(*, ending: bool = False) -> None:
  """Removes every temp file and directory this process has not finished.

  `ending` is for a thread that ends the process right after, while the
  main thread still runs: from then on a thread asking for a temp name
  waits for the end, and a name handed out just before is swept again
  once its file had time to appear.
  """
  if ending:
    _ending.set()
  paths = set(_pending)
  _sweep(paths)
  if ending:
    time.sleep(_CREATE_SECONDS)
    paths |= _pending
    _sweep(paths)
  _pending.difference_update(paths)


def _hold_if_ending() -> None:
  if _ending.is_set():
    threading.Event().wait()  # The process ends from another thread.


def first_line(error: BaseException) -> str:
  """The first line of `error`'s message, or its type when it has none."""
  lines = str(error).strip().splitlines()
  return lines[0] if lines else type(error).__name__


def temp_name(path: PathLike) -> pathlib.Path:
  """A fresh hidden name beside `path` with the same extension, or none.

  Writers that pick the format from the extension (soundfile, savefig)
  then write the right format, and tools that list a directory skip it.
  """
  _hold_if_ending()
  path = pathlib.Path(path)
  token = f'{os.getpid()}-{secrets.token_hex(4)}'
  tmp = path.with_name(f'.{path.name}-tmp-{token}{path.suffix}')
  _pending.add(tmp)
  return tmp


def fsync_dir(path: PathLike) -> None:
  """Makes a rename in `path` durable; some platforms refuse to open it."""
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


def _umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def publish(tmp: PathLike, path: PathLike, *, durable: bool = False) -> None:
  """Renames a finished temp file onto `path` with the usual permissions.

  For writers that hold their temp file open across calls (bitstream's
  `Writer`); everything else uses `atomic_path`, which ends here too.
  `durable` fsyncs the file before and its directory after the rename.
  """
  os.chmod(tmp, 0o666 & ~_umask())
  if durable:
    fd = os.open(tmp, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)
  os.replace(tmp, path)
  _pending.discard(pathlib.Path(tmp))
  if durable:
    fsync_dir(pathlib.Path(path).parent)


@contextlib.contextmanager
def atomic_path(
  path: PathLike, *, durable: bool = False
) -> Iterator[pathlib.Path]:
  """Yields a temp path to write; renamed onto `path` if the body succeeds.

  On an exception the temp file is removed and `path` is left as it was.
  `durable` fsyncs the file and its directory, for outputs that must
  survive a power cut once this returns.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = temp_name(path)
  try:
    yield tmp
    if not tmp.is_file():
      raise FileNotFoundError(f'{path}: nothing was written to {tmp.name}')
    publish(tmp, path, durable=durable)
  except BaseException:
    tmp.unlink(missing_ok=True)
    _pending.discard(tmp)
    raise


def write_atomic(
  path: PathLike, data: bytes | str, *, durable: bool = False
) -> None:
  """Writes `data` (str as UTF-8) to `path` through a temp file."""
  if isinstance(data, str):
    data = data.encode()
  with atomic_path(path, durable=durable) as tmp, open(tmp, 'xb') as f:
    f.write(data)


def _share(directory: pathlib.Path) -> None:
  """Gives a built tree the permissions a plain mkdir and open would."""
  mask = _umask()
  for root, dirs, names in os.walk(directory):
    for mode, entries in ((0o777, dirs), (0o666, names)):
      for entry in entries:
        entry = os.path.join(root, entry)
        if not os.path.islink(entry):
          os.chmod(entry, mode & ~mask)


def _swap_in(tmp: pathlib.Path, out: pathlib.Path, overwrite: bool) -> None:
  """Renames `tmp` to `out`; an older `out` is only removed afterwards.

  A reader sees the old tree or the new one, and `out` is missing only
  between two renames, never while a tree is being deleted.
  """
  if not os.path.lexists(out):
    os.rename(tmp, out)
    return
  if out.is_symlink() or not out.is_dir():
    raise FileExistsError(f'{out} exists and is not a directory')
  if not any(out.iterdir()):
    os.replace(tmp, out)  # An empty directory holds nothing to keep.
    return
  if not overwrite:
    raise FileExistsError(f'{out} exists and is not empty')
  aside = pathlib.Path(
    tempfile.mkdtemp(prefix=f'.{out.name}-old-', dir=out.parent)
  )
  os.rename(out, aside / out.name)
  try:
    os.rename(tmp, out)
  except BaseException:
    os.rename(aside / out.name, out)
    aside.rmdir()
    raise
  shutil.rmtree(aside)


@contextlib.contextmanager
def atomic_dir(out: PathLike, *, overwrite: bool) -> Iterator[pathlib.Path]:
  """Yields a fresh temp directory; it becomes `out` if the body succeeds.

  An existing non-empty `out` raises FileExistsError unless `overwrite`.
  On an exception the temp directory is removed and `out` is untouched.
  """
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  _hold_if_ending()
  tmp = pathlib.Path(
    tempfile.mkdtemp(prefix=f'.{out.name}-tmp-', dir=out.parent)
  )
  _pending.add(tmp)
  try:
    tmp.chmod(0o777 & ~_umask())
    yield tmp
    _share(tmp)
    _swap_in(tmp, out, overwrite)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  finally:
    _pending.discard(tmp)
