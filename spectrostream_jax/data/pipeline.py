"""The training input: weighted sources -> clean crops -> global batches.

    ds = pipeline.make_dataset(config)           # this process's slice
    it = iter(ds)                                # checkpointable iterator
    batch = pipeline.to_global_batch(next(it), mesh, 'data')

The whole pipeline is a grain `MapDataset` until its very end, so every
batch is a pure function of (config, seed, batch number, files on disk):
per source, item ids are shuffled and repeated forever, and a random map
turns each id into a crop (read, resample, channels, loudness, silence
check), drawing a replacement id from the same generator when a crop is
unusable; sources are mixed by weight; each process takes every
`process_count`-th example; examples are batched. Only then does
`to_iter_dataset` (threads) and `mp_prefetch` (worker processes) run it.
Because batching happens before the workers split the work, the batches
are the same for any number of workers, and `get_state()`/`set_state()`
resume exactly where a run stopped.
"""

import dataclasses
from typing import Any

from absl import flags
from absl import logging
import grain
import jax
import numpy as np

from spectrostream_jax.data import index as index_lib
from spectrostream_jax.data import sources as sources_lib
from spectrostream_jax.data import transforms


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Everything that decides the batches. Defaults: runs with no data."""

  sources: tuple[sources_lib.Source, ...] = (sources_lib.SyntheticSource(),)
  audio: transforms.AudioConfig = transforms.AudioConfig()
  # Global batch size, over all processes.
  batch_size: int = 16
  seed: int = 0
  # Replacement draws for an unusable crop before giving up with an error.
  max_retries: int = 32
  # grain worker processes; 0 runs in this process (with read threads).
  num_workers: int = 0
  worker_buffer_size: int = 2
  num_threads: int = 2
  prefetch_batches: int = 2


# Reasons logged for every file they happen to; the others once a process.
_PER_FILE_REASONS = ('missing', 'unreadable')
_logged: set[tuple[str, str]] = set()


def _log_once(skip: transforms.CropError) -> None:
  key = (skip.reason, skip.detail if skip.reason in _PER_FILE_REASONS else '')
  if key not in _logged:
    _logged.add(key)
    logging.warning('dropping a crop (%s) %s', skip.reason, skip.detail)


class MakeExample(grain.transforms.RandomMap):
  """Item id -> {'audio': [T, C] float32, 'skips': [R] int32}.

  `skips[i]` counts the replacement draws this example needed for reason
  transforms.RUNTIME_REASONS[i]; replacements come from the example's own
  generator, so they are as deterministic as the first draw.
  """

  def __init__(
    self,
    reader: sources_lib.Reader,
    config: transforms.AudioConfig,
    max_retries: int,
  ):
    self.reader = reader
    self.config = config
    self.max_retries = max_retries

  def random_map(
    self, element: int, rng: np.random.Generator
  ) -> dict[str, np.ndarray]:
    skips = np.zeros(len(transforms.RUNTIME_REASONS), np.int32)
    item = int(element)
    for _ in range(self.max_retries + 1):
      try:
        audio = transforms.finish(self.reader.read(item, rng), self.config, rng)
        return {'audio': audio, 'skips': skips}
      except transforms.CropError as skip:
        skips[transforms.RUNTIME_REASONS.index(skip.reason)] += 1
        _log_once(skip)
        item = int(rng.integers(len(self.reader)))
    counts = dict(zip(transforms.RUNTIME_REASONS, skips.tolist(), strict=True))
    raise index_lib.DataError(
      f'no usable crop in {self.max_retries + 1} draws {counts}: '
      'the data is mostly silent, too short or unreadable'
    )


def _seeds(seed: int, source: int) -> tuple[int, int]:
  """Independent (shuffle, crop) seeds of source number `source`."""
  state = np.random.SeedSequence([seed, source]).generate_state(2)
  return int(state[0]), int(state[1])


def _ensure_flags_parsed() -> None:
  """grain's workers read absl flags, which only absl apps have parsed."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_dataset(
  config: PipelineConfig,
  process_index: int | None = None,
  process_count: int | None = None,
) -> grain.IterDataset:
  """This process's batches {'audio': [b, T, C], 'skips': [b, R]}.

  b = batch_size / process_count. Process p gets examples p, p + P, ...,
  so processes never share an example and together see the batches one
  process would. Sources are opened (and files indexed) here, so a missing
  or empty corpus fails now with a DataError, not later in a worker.
  """
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if not config.sources:
    raise index_lib.DataError('no data sources configured')
  if config.batch_size <= 0 or config.batch_size % process_count:
    raise index_lib.DataError(
      f'batch_size {config.batch_size} is not a positive multiple of the '
      f'{process_count} processes'
    )
  if not 0 <= process_index < process_count:
    raise index_lib.DataError(
      f'process_index {process_index} is not in [0, {process_count})'
    )
  parts = []
  for number, source in enumerate(config.sources):
    reader = sources_lib.open_source(source, config.audio)
    shuffle_seed, crop_seed = _seeds(config.seed, number)
    part = grain.MapDataset.range(len(reader)).shuffle(shuffle_seed).repeat()
    example = MakeExample(reader, config.audio, config.max_retries)
    parts.append(part.random_map(example, seed=crop_seed))
  weights = [s.weight for s in config.sources]
  mixed = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
  local = mixed[process_index::process_count].batch(
    config.batch_size // process_count, drop_remainder=True
  )
  ds = local.to_iter_dataset(
    grain.ReadOptions(
      num_threads=config.num_threads,
      prefetch_buffer_size=config.prefetch_batches,
    )
  )
  if config.num_workers:
    _ensure_flags_parsed()
    ds = ds.mp_prefetch(
      grain.MultiprocessingOptions(
        num_workers=config.num_workers,
        per_worker_buffer_size=config.worker_buffer_size,
      )
    )
  return ds


def skip_counts(batch: dict[str, Any]) -> dict[str, int]:
  """Replacement draws in `batch` by reason, e.g. for `data/skips/*`."""
  totals = np.asarray(batch['skips']).sum(axis=0).tolist()
  return dict(zip(transforms.RUNTIME_REASONS, totals, strict=True))


def to_global_batch(
  batch: dict[str, np.ndarray],
  mesh: jax.sharding.Mesh,
  data_axis: str | tuple[str, ...] = 'data',
) -> dict[str, jax.Array]:
  """Process-local batch -> global arrays sharded on `data_axis` of `mesh`.

  Every process calls this with its own batch; the global batch is the
  processes' batches concatenated in process order. Other mesh axes hold
  replicas.
  """
  sharding = jax.sharding.NamedSharding(
    mesh, jax.sharding.PartitionSpec(data_axis)
  )
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
    for k, v in batch.items()
  }
