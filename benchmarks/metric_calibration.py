"""What each quality metric makes of known damage: the calibration table.

    python benchmarks/metric_calibration.py [--data FILE_OR_CORPUS]
        [--seconds 10] [--no-visqol]

Takes one clip (the first eval clip of `--data`, read the way
`spectrostream-eval` reads it, or procedural music when no data is given)
and damages it five ways (evaluation/degrade.py): not at all, white noise
at 40 dB SNR, a 10 kHz low-pass, the right STFT magnitudes with a random
phase, and magnitudes blurred over ±2 bins with the true phase. Each
version is scored against the clip with the ladder's metrics, ViSQOL
included. Prints JSON; docs/evaluation.md shows the table.
"""

import argparse
import json
import sys

import numpy as np

from spectrostream_jax.data import synthetic
from spectrostream_jax.evaluation import clips as clips_lib
from spectrostream_jax.evaluation import degrade
from spectrostream_jax.evaluation import metrics

SR = 48_000
KEYS = ('lsd', 'mel_distance', 'stft_distance', 'si_sdr', 'mid_snr')


def versions(x: np.ndarray) -> dict[str, np.ndarray]:
  return {
    'identical': x,
    'noise_40db': degrade.add_noise(x, 40.0),
    'lowpass_10khz': degrade.lowpass(x, 10_000.0, SR),
    'random_phase': degrade.random_phase(x),
    'blurred_magnitudes': degrade.blur_magnitudes(x),
  }


def table(x: np.ndarray, visqol: bool) -> dict[str, dict[str, float]]:
  out = {}
  for name, y in versions(x).items():
    m = metrics.signal_metrics(x, y)
    row = {k: round(m[k], 3) for k in KEYS}
    if visqol:
      row['visqol'] = round(metrics.visqol(x, y), 3)
    out[name] = row
  return out


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--data', help='corpus spec (default: procedural music)')
  p.add_argument('--seconds', type=float, default=10.0)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--no-visqol', action='store_true')
  args = p.parse_args()
  if args.data:
    data = clips_lib.load(args.data, args.seconds, max_clips=1, seed=args.seed)
    clip, source = data.clips[0].audio, data.clips[0].name
  else:
    rng = np.random.default_rng(args.seed)
    clip = synthetic.render(rng, round(args.seconds * SR))
    source = f'procedural music, seed {args.seed}'
  missing = None if args.no_visqol else metrics.visqol_missing()
  if missing:
    print(f'metric_calibration: error: {missing}', file=sys.stderr)
    return 1
  result = {
    'clip': source,
    'seconds': round(clip.shape[0] / SR, 3),
    'table': table(clip, not args.no_visqol),
  }
  json.dump(result, sys.stdout, indent=1)
  print()
  return 0


if __name__ == '__main__':
  sys.exit(main())
