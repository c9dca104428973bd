"""Can the input pipeline keep a training step fed? Prints JSON.

    python benchmarks/data_throughput.py \
      --corpus /tmp/debian_music/manifest.jsonl [--update_docs]

Measures examples/s and audio-seconds/s of the real-corpus pipeline
(default crops, train split) with 0, 1 and 2 grain workers, the first
batch (worker start-up) excluded. Next to it, it estimates what one
training step consumes, as a quick proxy that needs no gin config: the
forward and backward pass of the production generator (L1 loss on the
reconstruction; no discriminators, no optimiser) on this machine's
default JAX device for a small batch, and converts that into audio-seconds
per second per device. `--update_docs` writes the figures into
docs/benchmarks.md.

Build the corpus first: spectrostream-data fetch-debian-music /tmp/debian_music
"""

import datetime
import json
import os
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from spectrostream_jax.data import pipeline
from spectrostream_jax.data import sources
from spectrostream_jax.models import codec

try:
  from benchmarks import report
except ImportError:  # Run as a script from the repository root.
  import report

_CORPUS = flags.DEFINE_string(
  'corpus', '/tmp/debian_music/manifest.jsonl', 'corpus spec'
)
_BATCH = flags.DEFINE_integer('batch_size', 8, 'pipeline batch size')
_BATCHES = flags.DEFINE_integer('batches', 30, 'timed batches per setting')
_WORKERS = flags.DEFINE_list('workers', ['0', '1', '2'], 'worker counts')
_MODEL_BATCH = flags.DEFINE_integer('model_batch', 2, 'training step batch')
_MODEL_STEPS = flags.DEFINE_integer(
  'model_steps', 3, 'timed training steps (0: no step estimate)'
)
_UPDATE_DOCS = flags.DEFINE_bool(
  'update_docs', False, 'write the section of docs/benchmarks.md'
)


def pipeline_rate(config: pipeline.PipelineConfig) -> dict[str, float]:
  """Examples/s and audio-seconds/s after the first batch."""
  it = iter(pipeline.make_dataset(config))
  try:
    start = time.perf_counter()
    next(it)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(_BATCHES.value):
      batch = next(it)
      assert np.all(np.isfinite(batch['audio']))
    seconds = time.perf_counter() - start
  finally:
    it.close()
  examples = _BATCHES.value * config.batch_size / seconds
  return {
    'num_workers': config.num_workers,
    'first_batch_s': round(first, 2),
    'examples_per_s': round(examples, 2),
    'audio_seconds_per_s': round(examples * config.audio.crop_seconds, 2),
  }


def training_step_rate(wav: np.ndarray) -> dict[str, float]:
  """Forward + backward of the production generator on `wav` [B, T, 2]."""
  config = codec.production()
  params = codec.init_params(config, jax.random.key(0))
  model = codec.SpectroStream(config)

  def loss(params, wav, rng):
    recon, _, _ = model.apply({'params': params}, wav, rng)
    return jnp.mean(jnp.abs(recon - wav[:, : recon.shape[1]]))

  step = jax.jit(jax.value_and_grad(loss))
  wav = jnp.asarray(wav)
  start = time.perf_counter()
  jax.block_until_ready(step(params, wav, jax.random.key(1)))
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for i in range(_MODEL_STEPS.value):
    jax.block_until_ready(step(params, wav, jax.random.key(2 + i)))
  step_s = (time.perf_counter() - start) / _MODEL_STEPS.value
  audio = wav.shape[0] * wav.shape[1] / config.sample_rate
  return {
    'device': str(jax.devices()[0].device_kind),
    'batch': int(wav.shape[0]),
    'compile_and_first_step_s': round(compile_s, 2),
    'step_s': round(step_s, 2),
    'audio_seconds_per_s_per_device': round(audio / step_s, 3),
  }


def markdown(result: dict) -> str:
  """The docs/benchmarks.md section for `result`."""
  step = result['training_step_estimate']
  rows = '\n'.join(
    f'| {r["num_workers"]} | {r["examples_per_s"]} | '
    f'{r["audio_seconds_per_s"]} | {r["first_batch_s"]} |'
    for r in result['pipeline']
  )
  return f"""## Input pipeline throughput

Command: `{report.command_line()}` ({result['date']}).
Machine: {result['machine']}.
Corpus: `{result['corpus']}` (train split), batches of
{result['batch_size']} crops of {result['crop_seconds']} s.

| grain workers | examples/s | audio-s/s | first batch (s) |
|---|---|---|---|
{rows}

What one training step consumes, as an **estimate**: forward and
backward of the production generator, L1 loss, no discriminators, no
optimiser update (the full GAN step is measured under "GAN train
step"), batch {step['batch']} on
{step['device']}: {step['step_s']} s per step, so
{step['audio_seconds_per_s_per_device']} audio-s/s per device.
The best pipeline setting delivers {result['headroom']}× that (target:
at least 2× per device; with D devices per host the pipeline must
deliver 2·D× the per-device figure, and accelerator steps are far
faster than this CPU step).
"""


def main(argv):
  del argv
  source = sources.FileSource(_CORPUS.value, split='train')
  base = pipeline.PipelineConfig(sources=(source,), batch_size=_BATCH.value)
  rates = []
  for workers in _WORKERS.value:
    config = pipeline.PipelineConfig(
      **{**base.__dict__, 'num_workers': int(workers)}
    )
    rates.append(pipeline_rate(config))
  best = max(r['audio_seconds_per_s'] for r in rates)
  result = {
    'date': datetime.date.today().isoformat(),
    'machine': f'{report.cpu_name()}, {os.cpu_count()} cores, '
    f'{jax.local_device_count()} JAX device(s); load average '
    f'{os.getloadavg()[0]:.1f} at the end',
    'corpus': _CORPUS.value,
    'batch_size': _BATCH.value,
    'crop_seconds': base.audio.crop_seconds,
    'pipeline': rates,
  }
  if _MODEL_STEPS.value:
    dataset = pipeline.make_dataset(base)
    wav = next(iter(dataset))['audio'][: _MODEL_BATCH.value]
    step = training_step_rate(np.asarray(wav))
    result['training_step_estimate'] = step
    per_device = step['audio_seconds_per_s_per_device']
    result['headroom'] = round(best / per_device, 1)
  print(json.dumps(result, indent=1))
  if _UPDATE_DOCS.value and _MODEL_STEPS.value:
    report.update_section('data_throughput', result, markdown)


if __name__ == '__main__':
  app.run(main)
