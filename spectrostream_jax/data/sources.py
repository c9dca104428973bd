"""Where training audio comes from: files, TFDS ArrayRecord, or generated.

A source config (frozen, hashable, gin-bindable) names the data;
`open_source` turns it into a `Reader`: a random-access collection of
items whose `read(item, rng)` returns a `transforms.Chunk` at a random
crop position, or raises `transforms.CropError`. Readers are picklable
(numpy arrays, paths, TFDS data sources), so grain can ship them to its
worker processes; audio files are opened for each crop, not kept open.

Items of a file source are segments: a file of F frames contributes
max(1, F // crop) items, each covering an equal share of the file's
possible crop starts, so sampling items uniformly samples audio time
uniformly and one epoch covers every file about once, long or short.
"""

import dataclasses
import math
import os
from typing import Protocol

import numpy as np
import soundfile as sf

from spectrostream_jax import files as files_lib
from spectrostream_jax.data import index as index_lib
from spectrostream_jax.data import synthetic
from spectrostream_jax.data import transforms


@dataclasses.dataclass(frozen=True)
class FileSource:
  """Audio files: a directory tree, a glob, or a JSONL/CSV manifest."""

  path: str
  weight: float = 1.0
  # 'train' or 'eval': the manifest's split column, or a split by track;
  # None uses every file.
  split: str | None = None
  eval_fraction: float = 0.05
  # Where the file index is cached (default: ~/.cache/spectrostream_jax).
  cache_dir: str | None = None


@dataclasses.dataclass(frozen=True)
class TfdsSource:
  """A TFDS dataset in ArrayRecord format, read without TensorFlow."""

  name: str
  data_dir: str | None = None
  split: str = 'train'
  weight: float = 1.0
  # Feature holding the audio tensor, [T] or [T, C] of int or float.
  audio_key: str = 'audio'
  # None: the dataset metadata's 'sample_rate' (datasets we build have it).
  sample_rate: int | None = None


@dataclasses.dataclass(frozen=True)
class SyntheticSource:
  """Procedural stereo music (see synthetic.py): for smoke runs and demos."""

  weight: float = 1.0
  # Clips per epoch; every index is a different clip.
  size: int = 1 << 20


Source = FileSource | TfdsSource | SyntheticSource


class Reader(Protocol):
  def __len__(self) -> int: ...

  def read(self, item: int, rng: np.random.Generator) -> transforms.Chunk: ...


def _start(
  total: int, need: int, segment: int, count: int, rng: np.random.Generator
) -> int:
  """A random crop start in the `segment`-th of `count` equal shares."""
  starts = total - need + 1
  lo, hi = segment * starts // count, (segment + 1) * starts // count
  return lo + int(rng.integers(0, max(hi - lo, 1)))


class FileReader:
  """Reads random crops of indexed files, touching only the frames needed."""

  def __init__(
    self,
    files: tuple[index_lib.AudioFile, ...],
    config: transforms.AudioConfig,
  ):
    self.paths = [f.path for f in files]
    self.frames = np.array([f.frames for f in files], np.int64)
    self.rates = np.array([f.sample_rate for f in files], np.int64)
    self.need = np.array(
      [config.source_frames(int(r)) for r in self.rates], np.int64
    )
    counts = np.maximum(self.frames // self.need, 1)
    self.offsets = np.concatenate([[0], np.cumsum(counts)])
    self.config = config

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def read(self, item: int, rng: np.random.Generator) -> transforms.Chunk:
    i = int(np.searchsorted(self.offsets, item, side='right')) - 1
    path, total, rate = self.paths[i], int(self.frames[i]), int(self.rates[i])
    segment = item - int(self.offsets[i])
    count = int(self.offsets[i + 1] - self.offsets[i])
    start = _start(total, int(self.need[i]), segment, count, rng)
    lo, hi, lead = transforms.crop_window(total, start, self.config, rate)
    if not os.path.exists(path):
      raise transforms.CropError('missing', path)
    try:
      with sf.SoundFile(path) as f:
        f.seek(lo)
        audio = f.read(hi - lo, dtype='float32', always_2d=True)
    except (RuntimeError, OSError, ValueError) as e:
      raise transforms.CropError('unreadable', f'{path}: {e}') from None
    return transforms.Chunk(audio, rate, lead)


class TfdsReader:
  """Reads random crops of the records of a TFDS ArrayRecord split."""

  def __init__(self, source: TfdsSource, config: transforms.AudioConfig):
    # Imported here: TFDS (and TensorFlow's import time) is needed by this
    # source alone, so file and synthetic runs go without it.
    import tensorflow_datasets as tfds

    try:
      self.records = tfds.data_source(
        source.name, split=source.split, data_dir=source.data_dir
      )
    except Exception as e:  # tfds raises many types; all mean "cannot open".
      raise index_lib.DataError(
        f'cannot open TFDS dataset {source.name!r} split {source.split!r} '
        f'in {source.data_dir}: {files_lib.first_line(e)}'
      ) from None
    features = self.records.dataset_info.features
    if source.audio_key not in features:
      raise index_lib.DataError(
        f'{source.name} has no feature {source.audio_key!r}; '
        f'it has {sorted(features)}'
      )
    metadata = self.records.dataset_info.metadata or {}
    rate = source.sample_rate or metadata.get('sample_rate')
    if not rate:
      raise index_lib.DataError(
        f'{source.name}: no sample_rate in its metadata; set '
        'TfdsSource.sample_rate'
      )
    if len(self.records) == 0:
      raise index_lib.DataError(f'{source.name} split {source.split} is empty')
    self.rate = int(rate)
    self.key = source.audio_key
    self.config = config

  def __len__(self) -> int:
    return len(self.records)

  def read(self, item: int, rng: np.random.Generator) -> transforms.Chunk:
    audio = np.asarray(self.records[item][self.key])
    if np.issubdtype(audio.dtype, np.integer):
      half = float(2 ** (8 * audio.dtype.itemsize - 1))
      offset = half if np.issubdtype(audio.dtype, np.unsignedinteger) else 0
      audio = (audio.astype(np.float32) - offset) / half
    audio = audio.reshape(audio.shape[0], -1)
    total, need = audio.shape[0], self.config.source_frames(self.rate)
    if total < need:
      raise transforms.CropError('too_short', f'record {item}: {total} frames')
    start = _start(total, need, 0, 1, rng)
    lo, hi, lead = transforms.crop_window(total, start, self.config, self.rate)
    return transforms.Chunk(audio[lo:hi], self.rate, lead)


class SyntheticReader:
  """Renders a fresh procedural clip for every item."""

  def __init__(self, source: SyntheticSource, config: transforms.AudioConfig):
    self.size = source.size
    self.config = config

  def __len__(self) -> int:
    return self.size

  def read(self, item: int, rng: np.random.Generator) -> transforms.Chunk:
    del item  # The generator is already seeded by the item's index.
    audio = synthetic.render(
      rng, self.config.crop_samples, self.config.sample_rate
    )
    return transforms.Chunk(audio, self.config.sample_rate, 0)


def open_files(
  source: FileSource, config: transforms.AudioConfig
) -> tuple[FileReader, index_lib.Index]:
  """Reader of a file source and the index it was built from."""
  index = index_lib.scan(source.path, source.cache_dir)
  if source.split is not None:
    index = index_lib.with_splits(index, source.eval_fraction)
  index = index_lib.select(
    index,
    min_frames=config.source_frames,
    min_sample_rate=config.min_sample_rate,
    split=source.split,
  )
  index.log_skipped()
  if not index.files:
    reasons = index.summary(max_listed=0)['skipped_by_reason']
    split = f' in split {source.split!r}' if source.split else ''
    raise index_lib.DataError(
      f'{source.path}: no usable audio{split} ({len(index.skipped)} files '
      f'skipped: {reasons})'
    )
  return FileReader(index.files, config), index


def open_source(source: Source, config: transforms.AudioConfig) -> Reader:
  """The reader of any source; raises DataError when it cannot be used."""
  if not source.weight > 0 or not math.isfinite(source.weight):
    raise index_lib.DataError(f'source weight must be > 0: {source}')
  if isinstance(source, FileSource):
    return open_files(source, config)[0]
  if isinstance(source, TfdsSource):
    return TfdsReader(source, config)
  if isinstance(source, SyntheticSource):
    return SyntheticReader(source, config)
  raise TypeError(f'not a data source: {source!r}')
