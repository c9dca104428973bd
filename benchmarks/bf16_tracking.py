"""Does training in bfloat16 track float32? And do bf16 codes match f32's?

    python benchmarks/bf16_tracking.py [--steps 200] [--warmup 50] \
        [--batch 2] [--frames 9] [--data debian|synthetic] [--update-docs]

Two copies of the `small` model (gin/experiments/small_debian.gin) start
from the same seed and train on the same batches in this process, one in
float32 and one with `CodecConfig.dtype` and `DiscriminatorConfig.dtype`
set to 'bfloat16' (what hardware/gpu8.gin and tpu_pod.gin bind): the
trainer's programs in its order (reconstruction-only warm-up steps, k-means
once, then GAN steps), interleaved step by step. Per step it logs the
generator terms, the discriminator loss and the commitment of both runs,
and reports the relative difference of each term (per step and over
windows of `--window` steps). Then the float32 run's EMA parameters (what
evals and exports use) encode held-out clips with the f32 and with the bf16
config, and the fraction of frames whose codes agree is reported per RVQ
level and for each prefix of levels (a bitrate). Batches are `--batch`
crops of `--frames` 40 ms frames (the last one is the decoder's
look-ahead). Prints one JSON object, writes the loss curves to
docs/results/bf16_tracking.png; `--update-docs` writes the figures into
docs/benchmarks.md.
"""

import argparse
import dataclasses
import functools
import json
import pathlib
import time

import jax
import numpy as np

import gin
from spectrostream_jax.data import pipeline
from spectrostream_jax.models import codec as codec_lib
from spectrostream_jax.training import step as step_lib
from spectrostream_jax.training import train

try:
  from benchmarks import report
except ImportError:  # Run as a script from the repository root.
  import report

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENT = 'experiments/small_debian.gin'
DEBIAN = pathlib.Path('/tmp/debian_music/manifest.jsonl')
PLOT = ROOT / 'docs' / 'results' / 'bf16_tracking.png'
# Logged per step for both runs; the first four are the reconstruction and
# adversarial terms of the generator.
TERMS = ('g/mel', 'g/phase', 'g/wav', 'g/adv', 'g/feat', 'd/loss', 'vq/commit')
# Compared over every step; the others over the GAN steps only.
RECONSTRUCTION = ('g/mel', 'g/phase', 'g/wav')
# Code agreement is reported for these prefixes of levels (kbps = 0.25 ×
# levels for the 25 Hz, 10-bit `small` model).
PREFIXES = (1, 2, 4, 8, 16, 32, 64)


def configs(data: str):
  """(f32 step config, train pipeline, held-out pipeline) of the experiment."""
  gin.clear_config()
  bindings = []
  if data == 'synthetic':
    bindings = [
      'training/pipeline.PipelineConfig.sources = '
      '(@sources.SyntheticSource(),)',
      'held_out/pipeline.PipelineConfig.sources = '
      '(@sources.SyntheticSource(),)',
    ]
  train.parse_gin([EXPERIMENT], bindings)
  model = gin.query_parameter('train.model').scoped_configurable_fn()
  data_cfg = gin.query_parameter('train.data').scoped_configurable_fn()
  held_out = gin.query_parameter('train.eval_data').scoped_configurable_fn()
  gin.clear_config()
  return model, data_cfg, held_out


def draw(config: pipeline.PipelineConfig, count: int) -> list[np.ndarray]:
  it = iter(pipeline.make_dataset(config, 0, 1))
  return [np.asarray(next(it)['audio'], np.float32) for _ in range(count)]


def bf16(config: step_lib.StepConfig) -> step_lib.StepConfig:
  return dataclasses.replace(
    config,
    codec=dataclasses.replace(config.codec, dtype='bfloat16'),
    discriminator=dataclasses.replace(config.discriminator, dtype='bfloat16'),
  )


class Run:
  """One copy of the model and the trainer's three programs."""

  def __init__(self, config: step_lib.StepConfig, batch: dict):
    self.config = config
    start = time.perf_counter()
    self.state = jax.jit(functools.partial(step_lib.init_state, config))(0)

    def program(fn, **kw):
      return (
        jax.jit(functools.partial(fn, config, **kw), donate_argnums=0)
        .lower(self.state, batch)
        .compile()
      )

    self.warmup = program(step_lib.train_step, warmup=True)
    self.gan = program(step_lib.train_step)
    self.kmeans = program(step_lib.init_codebooks)
    self.compile_seconds = time.perf_counter() - start
    self.seconds = 0.0

  def step(self, batch: dict, number: int) -> dict[str, float]:
    """Step `number` (1-based), like train.py: k-means before the GAN."""
    start = time.perf_counter()
    warmup = number <= self.config.warmup_steps
    if not warmup and not bool(self.state.codebooks.initialized):
      self.state = self.kmeans(self.state, batch)
    self.state, metrics = (self.warmup if warmup else self.gan)(
      self.state, batch
    )
    out = {k: float(metrics[k]) for k in TERMS if k in metrics}
    self.seconds += time.perf_counter() - start
    return out


def relative(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  return np.abs(b - a) / np.maximum(np.abs(a), 1e-12)


def tracking(log: list[dict], window: int, warmup: int) -> dict:
  """Per term: relative differences per step and of window means."""
  out = {}
  for term in TERMS:
    rows = [
      (r['step'], r['f32'][term], r['bf16'][term])
      for r in log
      if term in r['f32'] and (r['step'] > warmup or term in RECONSTRUCTION)
    ]
    if not rows:
      continue
    steps, f32, b16 = map(np.asarray, zip(*rows, strict=True))
    # A commitment of exactly 0 (the first GAN step can quantize the very
    # rows k-means was fit on) has no relative difference.
    nonzero = f32 != 0
    per_step = relative(f32[nonzero], b16[nonzero])
    n = len(f32) // window * window
    wf = f32[:n].reshape(-1, window).mean(1)
    wb = b16[:n].reshape(-1, window).mean(1)
    per_window = relative(wf, wb)
    out[term] = {
      'steps': f'{steps[0]}-{steps[-1]}',
      # Both runs still have the same parameters: bf16 rounding alone.
      'first_step': round(float(per_step[0]), 5),
      'per_step_max': round(float(per_step.max()), 4),
      'per_step_mean': round(float(per_step.mean()), 4),
      'window_max': round(float(per_window.max()), 4),
      'window_mean': round(float(per_window.mean()), 4),
      'f32_last_window': round(float(wf[-1]), 4),
      'bf16_last_window': round(float(wb[-1]), 4),
    }
  return out


def agreement(params, config: step_lib.StepConfig, clips: np.ndarray) -> dict:
  """Codes of `clips` from `params` in f32 and in bf16, compared."""

  def encode(codec_config):
    model = codec_lib.SpectroStream(codec_config)
    fn = jax.jit(
      lambda p, w: model.apply({'params': p}, w, method=model.encode)
    )
    return np.asarray(fn(params, clips))

  a = encode(config.codec)
  b = encode(bf16(config).codec)
  same = (a == b).reshape(-1, a.shape[-1])  # [frames, levels]
  prefix = np.cumprod(same, axis=1).astype(bool)
  kbps = config.codec.kbps_per_level
  return {
    'frames': int(same.shape[0]),
    'audio_seconds': round(clips.shape[0] * clips.shape[1] / 48_000, 2),
    'per_level': [round(float(x), 4) for x in same.mean(0)],
    'prefix': {
      f'{n} ({n * kbps:g} kbps)': round(float(prefix[:, n - 1].mean()), 4)
      for n in PREFIXES
      if n <= same.shape[1]
    },
  }


def plot(log: list[dict], warmup: int, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  terms = [t for t in TERMS if t in log[-1]['f32']]
  fig, axes = plt.subplots(2, (len(terms) + 1) // 2, figsize=(14, 6))
  for ax, term in zip(axes.flat, terms, strict=False):
    for run, style in (('f32', '-'), ('bf16', '--')):
      rows = [r for r in log if r['step'] > warmup or term in RECONSTRUCTION]
      xs = [r['step'] for r in rows if term in r[run]]
      ys = [r[run][term] for r in rows if term in r[run]]
      ax.plot(xs, ys, style, lw=1, label=run)
    ax.axvline(warmup + 0.5, color='grey', lw=0.5)
    ax.set_title(term)
    ax.set_xlabel('step')
  for ax in list(axes.flat)[len(terms) :]:
    ax.axis('off')
  axes.flat[0].legend()
  fig.suptitle(
    'small model, float32 (solid) vs bfloat16 compute (dashed); '
    f'GAN from step {warmup + 1}'
  )
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=90)


def markdown(r: dict) -> str:
  rows = [
    '| term | steps | first step | per-step max | per-step mean |'
    ' window max | window mean | f32 last window | bf16 last window |',
    '|---|---|---|---|---|---|---|---|---|',
  ]
  for term, t in r['tracking'].items():
    rows.append(
      f'| {term} | {t["steps"]} | {100 * t["first_step"]:.3f} % | '
      f'{100 * t["per_step_max"]:.2f} % | '
      f'{100 * t["per_step_mean"]:.2f} % | {100 * t["window_max"]:.2f} % | '
      f'{100 * t["window_mean"]:.2f} % | {t["f32_last_window"]} | '
      f'{t["bf16_last_window"]} |'
    )
  a = r['agreement']
  prefix = ', '.join(f'{k}: {100 * v:.1f} %' for k, v in a['prefix'].items())
  levels = ' '.join(f'{100 * v:.0f}' for v in a['per_level'])
  return '\n'.join(
    [
      '## bfloat16 training tracks float32 (small model)',
      '',
      report.machine_line(r),
      '',
      f'Two copies of the `small` model, same seed, same {r["data"]} '
      f'batches of {r["batch"]} × {r["crop_seconds"]} s, {r["steps"]} '
      f'steps ({r["warmup"]} reconstruction-only, k-means, then the GAN): '
      'one in float32, one with codec and discriminator compute in '
      'bfloat16 (float32 parameters, optimizer state, STFT/iSTFT, losses, '
      'RVQ distances). Relative difference |bf16 − f32| / f32 of each '
      'logged term: at the first step compared (for the reconstruction '
      'terms step 1, where both runs still have the same parameters: '
      'bf16 rounding alone), per step, and of '
      f'{r["window"]}-step means. Step by step the two runs are two '
      'trajectories (rounding moves the parameters apart, and a GAN on '
      'batches this small amplifies it), so the per-step figures measure '
      'batch-to-batch noise as much as precision; the window means are '
      f'what "tracks" means here. Tolerance: {r["tolerance"]}.',
      '',
      *rows,
      '',
      f'Codes of {a["audio_seconds"]} s of held-out audio ({a["frames"]} '
      "frames) from the f32 run's EMA parameters, encoded in f32 and in "
      'bf16: frames whose first n levels all agree — '
      f'{prefix}. Per level (%): {levels}.',
      '',
      '![loss curves](results/bf16_tracking.png)',
      '',
      *report.json_details(r),
    ]
  )


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--steps', type=int, default=200)
  ap.add_argument('--warmup', type=int, default=50)
  ap.add_argument('--batch', type=int, default=2)
  ap.add_argument('--frames', type=int, default=9)
  ap.add_argument('--window', type=int, default=20)
  ap.add_argument('--eval_clips', type=int, default=4)
  ap.add_argument('--eval_frames', type=int, default=65)
  ap.add_argument('--data', choices=('debian', 'synthetic'), default='debian')
  # Chosen from the first measurement (docs/training.md, "Mixed
  # precision"): the largest 20-step differences were 3.2 % and 13.6 %.
  ap.add_argument(
    '--tolerance',
    default='20-step means of the reconstruction terms (g/mel, g/phase, '
    'g/wav) within 5 %, of the GAN terms (g/adv, g/feat, d/loss, '
    'vq/commit) within 20 %',
  )
  ap.add_argument('--log', default='', help='JSON lines of per-step metrics')
  ap.add_argument('--update-docs', action='store_true')
  args = ap.parse_args()

  data = args.data
  if data == 'debian' and not DEBIAN.exists():
    data = 'synthetic'
  model, data_cfg, held_out = configs(data)
  model = dataclasses.replace(model, warmup_steps=args.warmup)
  samples = args.frames * model.codec.samples_per_frame

  def sized(config, batch, samples):
    return dataclasses.replace(
      config,
      batch_size=batch,
      num_workers=0,
      audio=dataclasses.replace(config.audio, crop_samples=samples),
    )

  batches = draw(sized(data_cfg, args.batch, samples), args.steps)
  eval_samples = args.eval_frames * model.codec.samples_per_frame
  (clips,) = draw(sized(held_out, args.eval_clips, eval_samples), 1)

  runs = {
    'f32': Run(model, {'audio': batches[0]}),
    'bf16': Run(bf16(model), {'audio': batches[0]}),
  }
  log = []
  out = open(args.log, 'w') if args.log else None  # noqa: SIM115
  for i, audio in enumerate(batches, start=1):
    row = {'step': i}
    for name, run in runs.items():
      row[name] = run.step({'audio': audio}, i)
    log.append(row)
    if out:
      out.write(json.dumps(row) + '\n')
      out.flush()
  if out:
    out.close()

  params = runs['f32'].state.ema_params
  result = {
    'benchmark': 'bf16_tracking',
    **report.environment(),
    'data': 'Debian music corpus' if data == 'debian' else 'synthetic music',
    'batch': args.batch,
    'crop_seconds': round(samples / model.codec.sample_rate, 3),
    'steps': args.steps,
    'warmup': args.warmup,
    'window': args.window,
    'tolerance': args.tolerance,
    'seconds': {
      name: {
        'compile': round(run.compile_seconds, 1),
        'per_step': round(run.seconds / args.steps, 3),
      }
      for name, run in runs.items()
    },
    'skipped': {n: int(r.state.skipped) for n, r in runs.items()},
    'tracking': tracking(log, args.window, args.warmup),
    'agreement': agreement(params, model, clips),
  }
  plot(log, args.warmup, PLOT)
  print(json.dumps(result, indent=1))
  if args.update_docs:
    report.update_section('bf16_tracking', result, markdown)


if __name__ == '__main__':
  main()
