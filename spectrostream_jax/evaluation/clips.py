"""The evaluation clips: one fixed excerpt of each track of a corpus.

The corpus is anything `data.index` reads (a directory tree, a glob, a
JSONL/CSV manifest). When its files carry a split, only the 'eval' split
is used. Every file is probed by the index (cached), so corrupt,
truncated and silent files are skipped with a reason and counted. From
each remaining file one clip of `clip_seconds` is read at a start drawn
from a hash of (seed, file name): the same clips whatever the order of
the files or the number of threads, and a different `--max-clips` keeps
the clips it had. A file shorter than `clip_seconds` is taken whole, if
it lasts at least MIN_CLIP_SECONDS. Clips are converted to 48 kHz stereo
by the training pipeline's own channel and resampling code, but keep
their level: no loudness normalisation.
"""

import collections
import dataclasses
import hashlib
import os
import pathlib

import numpy as np
import soundfile as sf

from spectrostream_jax import channels
from spectrostream_jax.data import index as index_lib
from spectrostream_jax.data import loudness
from spectrostream_jax.data import transforms

# The shortest clip: a file shorter than this is skipped as too short.
# ViSQOL needs about a second, and the stereo metrics' tiles 0.12 s.
MIN_CLIP_SECONDS = 1.0


@dataclasses.dataclass(frozen=True)
class Clip:
  name: str  # the file, relative to the corpus root
  start_seconds: float  # where in the file the clip starts
  audio: np.ndarray  # float32 [T, 2] at the evaluation rate
  sample_rate: int = 48_000

  @property
  def seconds(self) -> float:
    return self.audio.shape[0] / self.sample_rate


@dataclasses.dataclass(frozen=True)
class Clips:
  clips: tuple[Clip, ...]
  split: str | None  # the split used, None for every file
  # Files that gave no clip, by reason, and a few of them by name.
  skipped: dict[str, int]
  skipped_examples: tuple[tuple[str, str], ...]


def _root(spec: str) -> pathlib.Path:
  path = pathlib.Path(spec).expanduser().absolute()
  if path.is_dir():
    return path
  if path.is_file():
    return path.parent
  # A glob: names are relative to its fixed leading directories.
  fixed = []
  for part in path.parts:
    if any(c in part for c in '*?['):
      break
    fixed.append(part)
  return pathlib.Path(*fixed)


def _hash(seed: int, name: str) -> int:
  return int(hashlib.sha256(f'{seed}/{name}'.encode()).hexdigest()[:15], 16)


def _read(
  f: index_lib.AudioFile, start: int, config: transforms.AudioConfig
) -> np.ndarray:
  """The clip at `start` (source frames), or raises CropError."""
  lo, hi, lead = transforms.crop_window(f.frames, start, config, f.sample_rate)
  try:
    with sf.SoundFile(f.path) as sound:
      sound.seek(lo)
      audio = sound.read(hi - lo, dtype='float32', always_2d=True)
  except (RuntimeError, OSError, ValueError) as e:
    raise transforms.CropError('unreadable', str(e)) from None
  audio = channels.to_channels(audio, 2, config.channel_mode)
  audio = transforms.resample_crop(
    transforms.Chunk(audio, f.sample_rate, lead), config
  )
  if not np.all(np.isfinite(audio)):
    raise transforms.CropError('non_finite')
  level = loudness.measure(audio, config.sample_rate)
  if level.ungated < config.silence_lufs:
    raise transforms.CropError('silent_crop', f'{level.ungated:.1f} LUFS')
  return np.ascontiguousarray(audio, np.float32)


def _fitting(
  config: transforms.AudioConfig, frames: int, rate: int
) -> transforms.AudioConfig:
  """`config`, shortened to the whole file when the file is shorter."""
  if frames >= config.source_frames(rate):
    return config
  samples = (
    frames
    if rate == config.sample_rate
    else frames * config.sample_rate // rate
  )
  config = dataclasses.replace(config, crop_samples=samples)
  while config.source_frames(rate) > frames:
    config = dataclasses.replace(config, crop_samples=config.crop_samples - 1)
  return config


def load(
  spec: str,
  clip_seconds: float,
  *,
  max_clips: int | None = None,
  seed: int = 0,
  sample_rate: int = 48_000,
  workers: int = 1,
  cache_dir: str | None = None,
) -> Clips:
  """Reads the clips of `spec`; raises DataError when none can be had."""
  if not clip_seconds >= MIN_CLIP_SECONDS:
    raise index_lib.DataError(
      f'clip length must be at least {MIN_CLIP_SECONDS:g} s, not '
      f'{clip_seconds:g}'
    )
  config = transforms.AudioConfig(
    sample_rate=sample_rate, crop_samples=round(clip_seconds * sample_rate)
  )
  shortest = dataclasses.replace(
    config, crop_samples=round(MIN_CLIP_SECONDS * sample_rate)
  )
  index = index_lib.scan(spec, cache_dir, workers)
  split = 'eval' if any(f.split for f in index.files) else None
  index = index_lib.select(
    index, min_frames=shortest.source_frames, split=split
  )
  root = _root(spec)
  named = sorted((os.path.relpath(f.path, root), f) for f in index.files)
  if max_clips is not None:
    # A hash order, so a smaller N takes a subset of a larger N's clips.
    named = sorted(sorted(named, key=lambda p: _hash(seed, p[0]))[:max_clips])

  def read(item):
    name, f = item
    fits = _fitting(config, f.frames, f.sample_rate)
    need = fits.source_frames(f.sample_rate)
    start = _hash(seed, name) % (f.frames - need + 1)
    try:
      audio = _read(f, start, fits)
      clip = Clip(name, start / f.sample_rate, audio, sample_rate)
    except transforms.CropError as e:
      clip = e
    return name, clip

  clips = []
  skipped = [(os.path.relpath(s.path, root), s.reason) for s in index.skipped]
  for name, clip in index_lib.ordered_map(read, named, workers):
    if isinstance(clip, Clip):
      clips.append(clip)
    else:
      skipped.append((name, clip.reason))
  reasons = dict(sorted(collections.Counter(r for _, r in skipped).items()))
  if not clips:
    where = f' in split {split!r}' if split else ''
    raise index_lib.DataError(
      f'{spec}: no usable clip of {MIN_CLIP_SECONDS:g} s or more{where} '
      f'({len(skipped)} files skipped: {reasons})'
    )
  return Clips(tuple(clips), split, reasons, tuple(skipped[:20]))
