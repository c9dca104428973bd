"""Convert an audio corpus into a TFDS ArrayRecord dataset, without TF.

Big corpora train best from a few large files on a bucket rather than
millions of small ones: ArrayRecord gives random access to records, so
grain can shuffle and shard them across hosts. `build` decodes every
usable file of a corpus once, resamples it to the model rate and channel
count, cuts it into fixed-length segments, and writes

    OUT_DIR/NAME/VERSION/NAME-{train,eval}.array_record-0000i-of-0000n
    OUT_DIR/NAME/VERSION/{dataset_info,features,metadata}.json

which `tfds.data_source(NAME, split=..., data_dir=OUT_DIR)` opens (and
`sources.TfdsSource` reads) with no TensorFlow installed. Records are
{'audio': int16 [T, C], 'track': str, 'start': int64 sample offset};
the rate is in the dataset metadata. Tracks, not segments, are split
between train and eval, so no piece of an eval track is trained on.

The dataset is written under a temporary directory and renamed into
place at the end, so a crashed build never looks like a finished one.
"""

import collections
import dataclasses
import math
import os
from typing import Any

from array_record.python import array_record_module
import numpy as np
import soundfile as sf
import soxr
import tensorflow_datasets as tfds

from spectrostream_jax import channels
from spectrostream_jax import files as files_lib
from spectrostream_jax.data import index as index_lib

_BLOCK_FRAMES = 1 << 18
_TEMPLATE = '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}'


@dataclasses.dataclass(frozen=True)
class BuildConfig:
  """How a corpus is turned into records."""

  name: str = 'spectrostream_audio'
  version: str = '1.0.0'
  sample_rate: int = 48_000
  num_channels: int = 2
  channel_mode: str = 'downmix'
  segment_seconds: float = 10.0
  # The last piece of a track is kept when at least this long (default:
  # one default training crop).
  min_segment_seconds: float = 1.32
  # Used for files without a split in their manifest.
  eval_fraction: float = 0.05
  seed: int = 0
  min_sample_rate: int = 0
  shard_megabytes: int = 256
  workers: int = 2

  def __post_init__(self):
    if not self.name.isidentifier() or self.name.lower() != self.name:
      raise index_lib.DataError(
        f'dataset name {self.name!r} must be lower_case_with_underscores'
      )
    if not 0 < self.min_segment_seconds <= self.segment_seconds:
      raise index_lib.DataError(
        f'min_segment_seconds ({self.min_segment_seconds}) must be in '
        f'(0, segment_seconds={self.segment_seconds}]'
      )
    if self.num_channels not in (1, 2) or self.sample_rate <= 0:
      raise index_lib.DataError('need num_channels 1 or 2, sample_rate > 0')
    if self.channel_mode not in channels.CHANNEL_MODES:
      raise index_lib.DataError(
        f'channel_mode must be one of {channels.CHANNEL_MODES}'
      )

  @property
  def segment_samples(self) -> int:
    return round(self.segment_seconds * self.sample_rate)


def features(num_channels: int = 2) -> tfds.features.FeaturesDict:
  """The record spec; raw int16 bytes decode fast and need no TF."""
  return tfds.features.FeaturesDict(
    {
      'audio': tfds.features.Tensor(
        shape=(None, num_channels),
        dtype=np.int16,
        encoding=tfds.features.Encoding.BYTES,
      ),
      'track': tfds.features.Text(),
      'start': tfds.features.Scalar(dtype=np.int64),
    }
  )


def to_int16(x: np.ndarray) -> np.ndarray:
  return np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)


def segments(
  audio_file: index_lib.AudioFile, config: BuildConfig
) -> tuple[list[tuple[int, np.ndarray]], int]:
  """(start, int16 [T, C]) segments of one file, and the number dropped.

  Reads and resamples in blocks, so memory holds one track's int16
  output, not its float decode. Tracks whose peak exceeds full scale are
  scaled down to fit; segments of digital silence, and a last piece
  shorter than min_segment_seconds, are dropped.
  """
  gain = 1.0 / max(audio_file.peak, 1.0)
  stream = None
  if audio_file.sample_rate != config.sample_rate:
    stream = soxr.ResampleStream(
      audio_file.sample_rate, config.sample_rate, config.num_channels
    )
  pieces = []
  try:
    with sf.SoundFile(audio_file.path) as f:
      while True:
        block = f.read(_BLOCK_FRAMES, dtype='float32', always_2d=True)
        last = block.shape[0] < _BLOCK_FRAMES
        block = channels.to_channels(
          block * gain, config.num_channels, config.channel_mode
        )
        if stream is not None:
          block = stream.resample_chunk(block, last=last)
        pieces.append(to_int16(block))
        if last:
          break
  except (RuntimeError, OSError) as e:
    raise index_lib.DataError(
      f'{audio_file.path} changed since it was indexed: {e}'
    ) from None
  audio = np.concatenate(pieces)
  length = config.segment_samples
  shortest = math.ceil(config.min_segment_seconds * config.sample_rate)
  kept, dropped = [], 0
  for start in range(0, audio.shape[0], length):
    piece = audio[start : start + length]
    if piece.shape[0] >= shortest and np.any(piece):
      kept.append((start, piece))
    else:
      dropped += 1
  return kept, dropped


class _ShardWriter:
  """Writes one split's records into shards of about `shard_bytes`."""

  def __init__(self, directory: str, name: str, split: str, shard_bytes: int):
    self.directory, self.name, self.split = directory, name, split
    self.shard_bytes = shard_bytes
    self.lengths: list[int] = []
    self.num_bytes = 0
    self._writer = None
    self._bytes_in_shard = 0

  def _temp_path(self, shard: int) -> str:
    return os.path.join(self.directory, f'.tmp-{self.split}-{shard:05d}')

  def write(self, record: bytes) -> None:
    if self._writer is None:
      self._writer = array_record_module.ArrayRecordWriter(
        self._temp_path(len(self.lengths)), 'group_size:1'
      )
      self.lengths.append(0)
      self._bytes_in_shard = 0
    self._writer.write(record)
    self.lengths[-1] += 1
    self._bytes_in_shard += len(record)
    self.num_bytes += len(record)
    if self._bytes_in_shard >= self.shard_bytes:
      self._writer.close()
      self._writer = None

  def close(self) -> tfds.core.SplitInfo | None:
    """Gives the shards their final names; None when nothing was written."""
    if self._writer is not None:
      self._writer.close()
    total = len(self.lengths)
    # Not for atomicity (files.atomic_dir swaps the whole build in): a
    # shard's name carries the shard count, known only now.
    for shard in range(total):
      final = (
        f'{self.name}-{self.split}.array_record-{shard:05d}-of-{total:05d}'
      )
      os.replace(self._temp_path(shard), os.path.join(self.directory, final))
    if not total:
      return None
    return tfds.core.SplitInfo(
      name=self.split,
      shard_lengths=self.lengths,
      num_bytes=self.num_bytes,
      filename_template=tfds.core.ShardedFileTemplate(
        data_dir=self.directory,
        template=_TEMPLATE,
        dataset_name=self.name,
        split=self.split,
        filetype_suffix='array_record',
      ),
    )


def build(
  spec: str,
  out_dir: str,
  config: BuildConfig = BuildConfig(),
  cache_dir: str | None = None,
  overwrite: bool = False,
) -> dict[str, Any]:
  """Writes the dataset of corpus `spec` under `out_dir`; returns a summary."""
  final = os.path.join(out_dir, config.name, config.version)
  if os.path.exists(final) and not overwrite:
    raise index_lib.DataError(
      f'{final} exists (pass --overwrite to replace it)'
    )
  index = index_lib.select(
    index_lib.with_splits(
      index_lib.scan(spec, cache_dir, config.workers),
      config.eval_fraction,
      config.seed,
    ),
    min_frames=lambda rate: math.ceil(config.min_segment_seconds * rate),
    min_sample_rate=config.min_sample_rate,
  )
  if not index.files:
    reasons = index.summary(max_listed=0)['skipped_by_reason']
    raise index_lib.DataError(f'{spec}: no usable audio (skipped: {reasons})')
  by_split = collections.defaultdict(list)
  for f in sorted(index.files, key=lambda f: f.track):
    by_split[f.split].append(f)

  with files_lib.atomic_dir(final, overwrite=overwrite) as work:
    record_spec = features(config.num_channels)
    split_infos, stats = [], {}
    dropped = 0
    for split, files in sorted(by_split.items()):
      writer = _ShardWriter(
        work, config.name, split, config.shard_megabytes << 20
      )
      samples = 0
      cut = index_lib.ordered_map(
        lambda f: segments(f, config), files, config.workers
      )
      for f, (pieces, num_dropped) in zip(files, cut, strict=True):
        dropped += num_dropped
        for start, audio in pieces:
          samples += audio.shape[0]
          writer.write(
            record_spec.serialize_example(
              {'audio': audio, 'track': f.track, 'start': start}
            )
          )
      info = writer.close()
      if info is not None:
        split_infos.append(info)
      stats[split] = {
        'tracks': len(files),
        'examples': sum(writer.lengths),
        'shards': len(writer.lengths),
        'seconds': round(samples / config.sample_rate, 3),
      }
    tfds.folder_dataset.write_metadata(
      data_dir=work,
      features=record_spec,
      split_infos=split_infos,
      version=config.version,
      filename_template=_TEMPLATE,
      check_data=False,
      description=(
        f'Audio from {spec}, {config.sample_rate} Hz, {config.num_channels} '
        f'channels, {config.segment_seconds} s segments, split by track.'
      ),
      metadata=tfds.core.MetadataDict(
        sample_rate=config.sample_rate,
        num_channels=config.num_channels,
        segment_seconds=config.segment_seconds,
      ),
    )
  summary = index.summary()
  return {
    'dataset_dir': final,
    'tfds_name': config.name,
    'tfds_data_dir': os.path.abspath(out_dir),
    'splits': stats,
    'usable_files': summary['usable_files'],
    'skipped_files': summary['skipped_files'],
    'skipped_by_reason': summary['skipped_by_reason'],
    'skipped': summary['skipped'],
    'dropped_segments': dropped,
  }
