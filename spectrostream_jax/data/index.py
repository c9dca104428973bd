"""Find audio files, check each one once, and cache what was found.

A corpus is named by a directory tree, a glob, or a JSONL/CSV manifest
with a `path` column (relative paths are relative to the manifest). Every
candidate is decoded once from start to end: that is the only way to
catch truncated or corrupt streams, NaN samples and all-silent files
before training rather than in the middle of it. The results (frames,
rate, channels, peak, or why the file is unusable) are cached in a JSON
file keyed by the corpus spec, and a file is decoded again only when its
size or modification time changes, so later runs only `stat` the files.

Whether a usable file is long enough, or of a high enough rate, depends
on the pipeline's settings, so `select` applies those rules on top of the
cached probe results.
"""

import collections
from collections.abc import Callable, Iterable, Iterator
import concurrent.futures
import csv
import dataclasses
import glob
import hashlib
import json
import math
import os
import pathlib
from typing import Any

from absl import logging
import numpy as np
import soundfile as sf

from spectrostream_jax import files as files_lib

AUDIO_SUFFIXES = frozenset(
  {'.wav', '.flac', '.ogg', '.oga', '.opus', '.mp3', '.aif', '.aiff', '.w64'}
)
MANIFEST_SUFFIXES = frozenset({'.jsonl', '.csv'})
SPLITS = ('train', 'eval')
# Below one 16-bit step everywhere: the file is silence.
SILENT_PEAK = 2.0**-16
_CACHE_FORMAT = 1
_BLOCK_FRAMES = 1 << 16
# Lossy codecs' priming and padding make the decoded length differ a little
# from the header's; a shortfall beyond this many frames is truncation.
_FRAME_SLACK = 4096
# libsndfile's log says this when a header promises more than the file has.
_TRUNCATION_MARKS = ('(should be', 'Last page lacks an end-of-stream')


class DataError(ValueError):
  """A corpus or setting that cannot work; the message says what to fix."""


@dataclasses.dataclass(frozen=True)
class Candidate:
  """A file named by the corpus spec."""

  path: str
  # Files of one track share a split: the manifest's `track` column, or
  # else the path relative to the corpus root.
  track: str
  # From the manifest's `split` column, if any.
  split: str | None = None


@dataclasses.dataclass(frozen=True)
class Probe:
  """What decoding a file found; `reason` is empty for a usable file."""

  frames: int = 0
  sample_rate: int = 0
  channels: int = 0
  peak: float = 0.0
  reason: str = ''
  detail: str = ''


@dataclasses.dataclass(frozen=True)
class AudioFile:
  path: str
  track: str
  frames: int
  sample_rate: int
  channels: int
  peak: float
  split: str | None = None

  @property
  def seconds(self) -> float:
    return self.frames / self.sample_rate


@dataclasses.dataclass(frozen=True)
class Skipped:
  path: str
  reason: str
  detail: str = ''


@dataclasses.dataclass(frozen=True)
class Index:
  """Usable files and skipped ones (with reasons) of one corpus spec."""

  spec: str
  files: tuple[AudioFile, ...]
  skipped: tuple[Skipped, ...]

  def summary(self, max_listed: int | None = None) -> dict[str, Any]:
    """JSON-ready counts; lists at most `max_listed` skipped files."""
    reasons = collections.Counter(s.reason for s in self.skipped)
    listed = self.skipped if max_listed is None else self.skipped[:max_listed]
    return {
      'spec': self.spec,
      'usable_files': len(self.files),
      'total_seconds': round(sum(f.seconds for f in self.files), 3),
      'sample_rates': _count(f.sample_rate for f in self.files),
      'channels': _count(f.channels for f in self.files),
      'splits': _count(f.split or 'unassigned' for f in self.files),
      'skipped_files': len(self.skipped),
      'skipped_by_reason': dict(sorted(reasons.items())),
      'skipped': [dataclasses.asdict(s) for s in listed],
    }

  def log_skipped(self, max_listed: int = 20) -> None:
    """Logs each skipped file (up to `max_listed`) and the counts, once."""
    for s in self.skipped[:max_listed]:
      logging.warning('skipping %s: %s %s', s.path, s.reason, s.detail)
    if self.skipped:
      summary = self.summary(max_listed=0)
      logging.warning(
        '%s: %d usable files, %d skipped %s',
        self.spec,
        len(self.files),
        len(self.skipped),
        summary['skipped_by_reason'],
      )


def _count(values: Iterable[Any]) -> dict[str, int]:
  return {str(k): v for k, v in sorted(collections.Counter(values).items())}


def _is_glob(spec: str) -> bool:
  return any(c in spec for c in '*?[')


def discover(spec: str) -> list[Candidate]:
  """The candidate files of a directory, glob, manifest or single file."""
  path = pathlib.Path(spec).expanduser()
  if path.is_dir():
    root = path.resolve()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames.sort()
      for name in sorted(filenames):
        if pathlib.Path(name).suffix.lower() in AUDIO_SUFFIXES:
          full = os.path.join(dirpath, name)
          found.append(Candidate(full, os.path.relpath(full, root)))
    return found
  if path.suffix.lower() in MANIFEST_SUFFIXES and path.is_file():
    return _read_manifest(path)
  if _is_glob(spec):
    paths = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
    return [
      Candidate(os.path.abspath(p), p)
      for p in paths
      if os.path.isfile(p) or os.path.islink(p)
    ]
  if path.is_file() or path.is_symlink():
    return [Candidate(str(path.absolute()), path.name)]
  raise DataError(f'{spec}: no such file or directory')


def _read_rows(path: pathlib.Path) -> list[Any]:
  try:
    with path.open(newline='', encoding='utf-8') as f:
      if path.suffix.lower() == '.csv':
        return list(csv.DictReader(f))
      return [json.loads(line) for line in f if line.strip()]
  except (UnicodeDecodeError, csv.Error, json.JSONDecodeError) as e:
    raise DataError(
      f'{path}: not a UTF-8 JSONL or CSV manifest ({e})'
    ) from None


def _read_manifest(path: pathlib.Path) -> list[Candidate]:
  rows = _read_rows(path)
  found = []
  for number, row in enumerate(rows, 1):
    if not isinstance(row, dict) or not row.get('path'):
      raise DataError(f'{path}: row {number} has no "path"')
    rel = str(row['path'])
    split = row.get('split')
    if split not in (None, '', *SPLITS):
      raise DataError(f'{path}: row {number}: split must be one of {SPLITS}')
    full = os.path.normpath(os.path.join(path.parent.absolute(), rel))
    found.append(Candidate(full, str(row.get('track') or rel), split or None))
  return found


def probe(path: str) -> Probe:
  """Decodes `path` once, start to end, and says whether it is usable."""
  if not os.path.lexists(path):
    return Probe(reason='missing')
  if not os.path.exists(path):
    return Probe(reason='broken_symlink', detail=os.readlink(path))
  if os.path.getsize(path) == 0:
    return Probe(reason='empty_file')
  try:
    f = sf.SoundFile(path)
  except (RuntimeError, OSError, ValueError, EOFError) as e:
    return Probe(reason='unreadable', detail=files_lib.first_line(e))
  with f:
    rate, channels = f.samplerate, f.channels
    frames, peak, finite = 0, 0.0, True
    try:
      while True:
        block = f.read(_BLOCK_FRAMES, dtype='float32', always_2d=True)
        if not block.shape[0]:
          break
        frames += block.shape[0]
        finite = finite and bool(np.all(np.isfinite(block)))
        if finite:
          peak = max(peak, float(np.max(np.abs(block))))
    except (RuntimeError, OSError, ValueError, EOFError) as e:
      detail = f'after {frames} frames: {files_lib.first_line(e)}'
      return Probe(frames, rate, channels, reason='corrupt', detail=detail)
    header_frames, log = f.frames, f.extra_info
  found = Probe(frames, rate, channels, peak)
  if frames == 0:
    return dataclasses.replace(found, reason='no_samples')
  marks = [
    line
    for line in log.splitlines()
    if any(m in line for m in _TRUNCATION_MARKS)
  ]
  if frames + _FRAME_SLACK < header_frames or marks:
    detail = marks[0] if marks else f'{frames} of {header_frames} frames'
    return dataclasses.replace(found, reason='truncated', detail=detail)
  if not finite:
    return dataclasses.replace(found, reason='non_finite')
  if peak < SILENT_PEAK:
    return dataclasses.replace(found, reason='silent')
  return found


def ordered_map(
  fn: Callable[[Any], Any], items: Iterable[Any], workers: int
) -> Iterator[Any]:
  """fn over items in `workers` threads, in order, a bounded window ahead.

  Decoding releases the GIL, so threads overlap the work of several files
  without holding every result in memory.
  """
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    window = collections.deque()
    for item in items:
      window.append(pool.submit(fn, item))
      if len(window) > 2 * workers:
        yield window.popleft().result()
    while window:
      yield window.popleft().result()


def default_cache_dir() -> str:
  base = os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache')
  return os.path.join(base, 'spectrostream_jax', 'index')


def _stat_key(path: str) -> list[int] | None:
  try:
    st = os.stat(path)
  except OSError:
    return None
  return [st.st_size, st.st_mtime_ns]


def _load_cache(path: str) -> dict[str, Any]:
  try:
    with open(path, encoding='utf-8') as f:
      cache = json.load(f)
  except (OSError, ValueError):
    return {}
  if cache.get('format') != _CACHE_FORMAT:
    return {}
  return cache.get('files', {})


def scan(
  spec: str, cache_dir: str | None = None, workers: int | None = None
) -> Index:
  """Index of `spec`: every candidate probed, or read back from the cache.

  Raises DataError when `spec` does not exist or names no audio file.
  """
  candidates = discover(spec)
  if not candidates:
    raise DataError(f'{spec}: no audio files found')
  cache_dir = cache_dir or default_cache_dir()
  name = hashlib.sha256(os.path.abspath(spec).encode()).hexdigest()[:20]
  cache_path = os.path.join(cache_dir, f'{name}.json')
  cached = _load_cache(cache_path)
  keys = [_stat_key(c.path) for c in candidates]

  def lookup(i: int) -> Probe:
    hit = cached.get(candidates[i].path)
    if keys[i] is not None and hit and hit[0] == keys[i]:
      return Probe(**hit[1])
    return probe(candidates[i].path)

  probes = list(
    ordered_map(lookup, range(len(candidates)), workers or os.cpu_count() or 1)
  )
  fresh = {
    c.path: [k, dataclasses.asdict(p)]
    for c, k, p in zip(candidates, keys, probes, strict=True)
    if k is not None
  }
  if fresh != cached:
    payload = {'format': _CACHE_FORMAT, 'spec': spec, 'files': fresh}
    try:
      files_lib.write_atomic(cache_path, json.dumps(payload))
    except OSError as e:
      logging.warning('index cache not written (%s); next run rescans', e)
  files, skipped = [], []
  for c, p in zip(candidates, probes, strict=True):
    if p.reason:
      skipped.append(Skipped(c.path, p.reason, p.detail))
    else:
      files.append(
        AudioFile(
          c.path, c.track, p.frames, p.sample_rate, p.channels, p.peak, c.split
        )
      )
  return Index(spec, tuple(files), tuple(skipped))


def assign_splits(
  groups: Iterable[str], eval_fraction: float, seed: int = 0
) -> dict[str, str]:
  """Deterministic train/eval split of track groups.

  Groups are ordered by a hash of (seed, group) and the first
  n·eval_fraction (rounded half up) go to eval, at least one when there
  are two or more groups and the fraction is positive; so a split does
  not depend on the order in which files were found.
  """
  if not 0 <= eval_fraction < 1:
    raise DataError(f'eval_fraction must be in [0, 1), not {eval_fraction}')
  unique = sorted(set(groups))
  order = sorted(
    unique, key=lambda g: hashlib.sha256(f'{seed}/{g}'.encode()).hexdigest()
  )
  num_eval = math.floor(len(unique) * eval_fraction + 0.5)
  if eval_fraction > 0 and len(unique) >= 2:
    num_eval = max(1, num_eval)
  evals = set(order[:num_eval])
  return {g: 'eval' if g in evals else 'train' for g in unique}


def with_splits(index: Index, eval_fraction: float, seed: int = 0) -> Index:
  """Every usable file with a split: its manifest's, or one by track.

  Decided before any length or rate rule is applied, so a file's split
  does not move when the crop length or minimum rate changes.
  """
  assigned = assign_splits(
    [f.track for f in index.files if f.split is None], eval_fraction, seed
  )
  files = tuple(
    dataclasses.replace(f, split=f.split or assigned[f.track])
    for f in index.files
  )
  return dataclasses.replace(index, files=files)


def select(
  index: Index,
  *,
  min_frames: Callable[[int], int],
  min_sample_rate: int = 0,
  split: str | None = None,
) -> Index:
  """The files a pipeline can use; the others join `skipped`.

  `min_frames(rate)` is the shortest usable file at that rate. With
  `split` (after `with_splits`), files of the other split are left out;
  they are not skipped: nothing is wrong with them.
  """
  if split is not None and split not in SPLITS:
    raise DataError(f'split must be one of {SPLITS}, not {split!r}')
  files, skipped = [], list(index.skipped)
  for f in index.files:
    if split is not None and f.split != split:
      continue
    if f.sample_rate < min_sample_rate:
      detail = f'{f.sample_rate} Hz < {min_sample_rate} Hz'
      skipped.append(Skipped(f.path, 'low_sample_rate', detail))
    elif f.frames < min_frames(f.sample_rate):
      detail = f'{f.frames} frames < {min_frames(f.sample_rate)}'
      skipped.append(Skipped(f.path, 'too_short', detail))
    else:
      files.append(f)
  return Index(index.spec, tuple(files), tuple(skipped))
