r"""Compares training runs of the `small` codec: curves and final quality.

    python benchmarks/recipe_ab.py --run old=/tmp/ab/old --run new=/tmp/ab/new \
        --data /tmp/debian_music/manifest.jsonl --png docs/results/recipe_ab.png

For each run (a `spectrostream-train` work directory of the `small`
preset): the in-loop eval's SI-SDR and mel distance, d/loss and level 1's
per-step perplexity over steps, from its TensorBoard events; and, from its
newest checkpoint's EMA parameters, on one clip of `--clip-seconds` from
every track of the corpus' eval split: SI-SDR and mel distance at 1, 2, 4,
8 and 16 kbps (without the first 480 samples) and, at 16 kbps, the usage
(fraction of codes) and perplexity of RVQ levels 1-8 over all the clips'
frames. `--init` adds the same figures for the network as every run
starts it (step 0, seed 0: the trainer's split of the seed), and each
`--model NAME=DIR` for a model directory (a fine-tune's source, say;
docs/finetune.md). Prints JSON; `--png` draws the curves.
"""

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from spectrostream_jax import files
from spectrostream_jax import inference
from spectrostream_jax import losses
from spectrostream_jax import model_dir
from spectrostream_jax.evaluation import clips as clips_lib
from spectrostream_jax.models import codec as codec_lib
from spectrostream_jax.models import quantizer as rvq
from spectrostream_jax.training import checkpoint
from spectrostream_jax.training import curves

KBPS = (1, 2, 4, 8, 16)


def newest_ema_params(workdir: pathlib.Path):
  params, _, step = checkpoint.restore_for_export(str(workdir / 'checkpoints'))
  return step, jax.tree.map(jnp.asarray, params)


def codec_step(directory: str) -> int | None:
  return model_dir.read_model_config(
    str(pathlib.Path(directory) / model_dir.CONFIG_FILE)
  )['step']


def initial_params(config, seed: int = 0):
  # step.init_state's first key of the seed is the codec's.
  rng_codec = jax.random.split(jax.random.key(seed), 3)[0]
  return codec_lib.init_params(config, rng_codec)


def final_quality(params, config, audio: np.ndarray) -> dict:
  model = codec_lib.SpectroStream(config)
  variables = {'params': params}
  levels = config.quantizer.num_levels

  @jax.jit
  def codes_of(x):
    return model.apply(variables, x, levels, method=model.encode)

  @jax.jit
  def decode(codes):
    return model.apply(variables, codes, method=model.decode)

  out = {}
  all_codes = []
  for kbps in KBPS:
    n = config.levels_for_kbps(kbps)
    sdr, mel = [], []
    for clip in audio:
      x = jnp.asarray(clip[None])
      codes = codes_of(x)
      if kbps == KBPS[-1]:
        all_codes.append(np.asarray(codes[0]))
      ref, rec = losses.trim(x, decode(codes[..., :n]), 480)
      sdr.append(float(losses.si_sdr(ref, rec)[0]))
      mel.append(float(losses.mel_distance(ref, rec)[0]))
    out[f'{kbps}kbps'] = {
      'si_sdr': float(np.mean(sdr)),
      'mel_distance': float(np.mean(mel)),
    }
  codes = np.concatenate(all_codes)  # [frames, levels]
  counts = np.stack(
    [
      np.bincount(codes[:, i], minlength=config.quantizer.codebook_size)
      for i in range(8)
    ]
  )
  stats = rvq.codebook_metrics(jnp.asarray(counts, jnp.float32))
  out['frames'] = int(codes.shape[0])
  out['usage'] = [round(float(v), 3) for v in stats['usage']]
  out['perplexity'] = [round(float(v), 1) for v in stats['perplexity']]
  return out


def curves_of(workdir: pathlib.Path) -> dict:
  scalars = curves.read_scalars(str(workdir / 'tensorboard'))
  keep = {}
  for tag in (
    'eval/si_sdr',
    'eval/si_sdr/16kbps',
    'eval/si_sdr/4kbps',
    'eval/mel_distance',
    'd/loss',
    'vq/perplexity/L00',
    'g/adv',
  ):
    if tag in scalars:
      steps, values = scalars[tag]
      keep[tag] = (steps.tolist(), values.tolist())
  return keep


def plot(runs: dict, path: str) -> None:
  import matplotlib  # noqa: PLC0415

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # noqa: PLC0415

  panels = (
    ('eval/si_sdr/16kbps', 'eval SI-SDR at 16 kbps (dB)'),
    ('eval/mel_distance', 'eval mel distance (mean over 1-16 kbps)'),
    ('d/loss', 'd/loss (hinge; 2 = undecided, 0 = D wins)'),
    ('vq/perplexity/L00', 'level 1 perplexity per step (max = rows = 68)'),
  )
  fig, axes = plt.subplots(2, 2, figsize=(11, 7))
  for ax, (tag, title) in zip(axes.ravel(), panels, strict=True):
    for name, run in runs.items():
      if tag in run['curves']:
        steps, values = run['curves'][tag]
        if tag in ('d/loss', 'vq/perplexity/L00') and len(values) > 20:
          kernel = np.ones(8) / 8
          values = np.convolve(values, kernel, mode='valid')
          steps = steps[len(steps) - len(values) :]
        ax.plot(steps, values, label=name, marker='o' if 'eval' in tag else '')
    ax.set_title(title, fontsize=10)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  with files.atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=110)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--run', action='append', required=True)
  parser.add_argument('--data', required=True)
  parser.add_argument('--clip-seconds', type=float, default=30.0)
  parser.add_argument('--png')
  parser.add_argument('--init', action='store_true')
  parser.add_argument('--model', action='append', default=[])
  args = parser.parse_args(argv)
  config = codec_lib.small()
  audio = [c.audio for c in clips_lib.load(args.data, args.clip_seconds).clips]
  runs = {}
  summary = {}
  if args.init:
    summary['step 0'] = {
      'step': 0,
      **final_quality(initial_params(config), config, audio),
    }
  for spec in args.model:
    name, _, directory = spec.partition('=')
    codec = inference.Codec.load(directory)
    if codec.config.network_differences(config):
      parser.error(f'{directory} is not a small model')
    summary[name] = {
      'step': codec_step(directory),
      **final_quality(codec.params, config, audio),
    }
  for spec in args.run:
    name, _, workdir = spec.partition('=')
    workdir = pathlib.Path(workdir)
    step, params = newest_ema_params(workdir)
    runs[name] = {
      'step': step,
      'final': final_quality(params, config, audio),
      'curves': curves_of(workdir),
    }
  if args.png:
    plot(runs, args.png)
  for name, run in runs.items():
    summary[name] = {'step': run['step'], **run['final']}
  summary['clips'] = {'count': len(audio), 'seconds': args.clip_seconds}
  json.dump(summary, sys.stdout, indent=2)
  print()
  return 0


if __name__ == '__main__':
  sys.exit(main())
