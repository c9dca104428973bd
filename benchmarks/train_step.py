"""Speed and memory of one GAN training step on this machine.

    python benchmarks/train_step.py [--batch 1] [--seconds 1.28] \
        [--steps 3] [--update-docs]

For the tiny model (gin/experiments/quickstart.gin) and the production
model (gin/experiments/production_debian.gin): compile time, step time
(and the warm-up step's and the gradient-norms program's),
audio-seconds per second, the step's FLOPs (`spectrostream_jax.flops`:
its matrix products and convolutions, counted alike on every backend),
the achieved fraction of this machine's float32 matmul rate (measured in
the same run, before and after) and, on an accelerator in
`flops.PEAKS`, the MFU; XLA's memory estimate and the process's peak
RSS. Batches are random audio of `--batch` crops of `--seconds` plus the
look-ahead frame, on one device. Prints one JSON object; `--update-docs`
writes it into docs/benchmarks.md. benchmarks/device_check.py reuses
`step_config` and `measure` for the small and production models.
"""

import argparse
import functools
import json
import resource
import time

import jax
import numpy as np

import gin
from spectrostream_jax import flops as flops_lib
from spectrostream_jax.training import step as step_lib
from spectrostream_jax.training import train

try:
  from benchmarks import codec_speed
  from benchmarks import report
except ImportError:  # Run as a script from the repository root.
  import codec_speed
  import report

EXPERIMENTS = {
  'tiny': 'experiments/quickstart.gin',
  'production': 'experiments/production_debian.gin',
}


def dtype_bindings(dtype: str | None) -> list[str]:
  """Gin bindings of the networks' compute dtype (None: the config's)."""
  if not dtype:
    return []
  return [
    f"codec.CodecConfig.dtype = '{dtype}'",
    f"discriminator.DiscriminatorConfig.dtype = '{dtype}'",
  ]


def step_config(
  experiment: str, dtype: str | None = None
) -> step_lib.StepConfig:
  """The experiment's networks, losses and optimizers.

  `dtype` sets the compute dtype of codec and discriminators, as the
  hardware gin files do ('bfloat16'); None keeps the experiment's.
  """
  gin.clear_config()
  try:
    train.parse_gin([experiment], dtype_bindings(dtype))
    return gin.query_parameter('train.model').scoped_configurable_fn()
  finally:
    gin.clear_config()


def measure(
  config: step_lib.StepConfig,
  batch: int,
  seconds: float,
  steps: int,
  gradient_norms: bool = True,
) -> dict:
  """Times the GAN step and the warm-up step (and the gradient norms)."""
  codec = config.codec
  frames = round(seconds * codec.frame_rate) + codec.lookahead
  samples = frames * codec.samples_per_frame
  wav = np.random.default_rng(0).uniform(-0.5, 0.5, (batch, samples, 2))
  audio = {'audio': jax.device_put(wav.astype(np.float32))}

  start = time.perf_counter()
  init = jax.jit(functools.partial(step_lib.init_state, config))
  state = jax.block_until_ready(init(0))
  init_seconds = time.perf_counter() - start

  start = time.perf_counter()
  traced = jax.jit(
    functools.partial(step_lib.train_step, config), donate_argnums=0
  ).trace(state, audio)
  compiled = traced.lower().compile()
  compile_seconds = time.perf_counter() - start
  flops = flops_lib.of_jaxpr(traced.jaxpr)
  memory = compiled.memory_analysis()

  state, _ = jax.block_until_ready(compiled(state, audio))  # Warm-up.
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, _ = jax.block_until_ready(compiled(state, audio))
    times.append(time.perf_counter() - start)
  best = min(times)
  # The other programs of a run: reconstruction-only warm-up steps, and
  # the per-term gradient norms computed at log steps.
  traced = jax.jit(
    functools.partial(step_lib.train_step, config, warmup=True),
    donate_argnums=0,
  ).trace(state, audio)
  warmup_flops = flops_lib.of_jaxpr(traced.jaxpr)
  warmup = traced.lower().compile()
  state, _ = jax.block_until_ready(warmup(state, audio))
  warmup_times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, _ = jax.block_until_ready(warmup(state, audio))
    warmup_times.append(time.perf_counter() - start)
  norms_times = []
  if gradient_norms:
    norms = jax.jit(functools.partial(step_lib.gradient_norms, config))
    jax.block_until_ready(norms(state, audio))
    for _ in range(steps):
      start = time.perf_counter()
      jax.block_until_ready(norms(state, audio))
      norms_times.append(time.perf_counter() - start)
  audio_seconds = batch * (frames - codec.lookahead) / codec.frame_rate
  mfu = flops_lib.mfu(flops, best, codec.dtype, devices=1)
  warmup_mfu = flops_lib.mfu(warmup_flops, min(warmup_times), codec.dtype, 1)
  return {
    'batch': batch,
    'dtype': codec.dtype,
    'crop_seconds': round(samples / codec.sample_rate, 3),
    'codec_params': sum(x.size for x in jax.tree.leaves(state.params)),
    'disc_params': sum(x.size for x in jax.tree.leaves(state.disc_params)),
    'init_seconds': round(init_seconds, 2),
    'compile_seconds': round(compile_seconds, 2),
    'step_seconds': round(best, 4),
    'median_step_seconds': round(float(np.median(times)), 4),
    'warmup_step_seconds': round(min(warmup_times), 4),
    'gradient_norms_seconds': round(min(norms_times), 4)
    if norms_times
    else None,
    'audio_seconds_per_second': round(audio_seconds / best, 4),
    'steps_per_second': round(1 / best, 2),
    'warmup_steps_per_second': round(1 / min(warmup_times), 2),
    'gflop': round(flops / 1e9, 1),
    'gflop_per_s': round(flops / best / 1e9, 1),
    'warmup_gflop': round(warmup_flops / 1e9, 1),
    'mfu': None if mfu is None else round(mfu, 4),
    'warmup_mfu': None if warmup_mfu is None else round(warmup_mfu, 4),
    'xla_peak_gib': round(
      (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
      )
      / 2**30,
      3,
    ),
    'process_peak_rss_gib': round(
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3
    ),
  }


def markdown(r: dict) -> str:
  rows = [
    '| model | batch × crop | step s | audio s/s | GFLOP | GFLOP/s |'
    ' of matmul rate | MFU | compile s | XLA peak GiB | process RSS GiB |'
    ' warm-up step s | gradient norms s |',
    '|---|---|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for name in EXPERIMENTS:
    m = r[name]
    rows.append(
      f'| {name} | {m["batch"]} × {m["crop_seconds"]} s | '
      f'{m["step_seconds"]} | {m["audio_seconds_per_second"]} | '
      f'{m["gflop"]} | {m["gflop_per_s"]} | '
      f'{100 * m["fraction_of_matmul_rate"]:.0f} % | '
      f'{report.percent(m.get("mfu"))} | '
      f'{m["compile_seconds"]} | {m["xla_peak_gib"]} | '
      f'{m["process_peak_rss_gib"]} | {m["warmup_step_seconds"]} | '
      f'{m["gradient_norms_seconds"]} |'
    )
  return '\n'.join(
    [
      '## GAN train step',
      '',
      report.machine_line(r),
      '',
      'One update of codec and discriminators (forward, both losses, '
      'both backward passes, EMA codebooks, Adam), on one device. '
      'float32 matmul rate measured in the same run: '
      f'**{r["matmul_gflop_per_s"]} GFLOP/s** (the higher of '
      f'{" before and ".join(map(str, r["matmul_gflop_per_s_before_after"]))}'
      ' after the steps).',
      '',
      *rows,
      '',
      'Step time is the best of the timed steps after a warm-up; audio s/s '
      'counts the reconstructed seconds (the look-ahead frame is input '
      'only). FLOPs are the matrix products and convolutions of the step '
      '(`spectrostream_jax.flops`); MFU is their rate over the peak of '
      'the device in `flops.PEAKS` (– off the table, as on CPU); XLA peak '
      'is arguments + outputs + temporaries − donated buffers. A run '
      'also runs reconstruction-only warm-up steps first and, every '
      '`log_every` steps, the per-term gradient norms (g/grad/…) as a '
      'program of their own: the last two columns.',
      '',
      *report.json_details(r),
    ]
  )


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--batch', type=int, default=1)
  ap.add_argument('--seconds', type=float, default=1.28)
  ap.add_argument('--steps', type=int, default=3)
  ap.add_argument(
    '--dtype', default=None, help="compute dtype, e.g. 'bfloat16'"
  )
  ap.add_argument('--update-docs', action='store_true')
  args = ap.parse_args()

  result = {'benchmark': 'train_step', **report.environment()}
  rates = [codec_speed.matmul_rate()]
  for name, experiment in EXPERIMENTS.items():
    result[name] = measure(
      step_config(experiment, args.dtype), args.batch, args.seconds, args.steps
    )
  rates.append(codec_speed.matmul_rate())
  # Other load on the machine lowers both figures; the higher matmul rate
  # gives the conservative fraction.
  result['matmul_gflop_per_s'] = round(max(rates), 1)
  result['matmul_gflop_per_s_before_after'] = [round(r, 1) for r in rates]
  for name in EXPERIMENTS:
    result[name]['fraction_of_matmul_rate'] = round(
      result[name]['gflop_per_s'] / result['matmul_gflop_per_s'], 3
    )
  print(json.dumps(result, indent=1))
  if args.update_docs:
    report.update_section('train_step', result, markdown)


if __name__ == '__main__':
  main()
