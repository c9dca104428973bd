"""Log-mel pictures of an excerpt through a model and classic codecs.

    python -m spectrostream_jax.evaluation.spectrograms \\
        --model MODEL_DIR --audio FILE [--start 0] [--seconds 6] \\
        [--kbps 2,8,16] [--baseline opus:8 ...] --out FIGURE.png

Where nobody can listen, the spectrogram is how a codec's output is
judged: harmonics (horizontal lines), transients (vertical edges) and the
bandwidth show in the mid channel (L + R) / 2, and the stereo image in the
side channel (L - R) / 2. One row per system, mid on the left and side on
the right, all on the reference's colour scale (its loudest mid bin at the
top, 80 dB below it at the bottom), so a quieter or noisier output looks
it. docs/evaluation.md shows how to read one.
"""

import argparse
import dataclasses
import io
import math
import os
import sys

import numpy as np
import soundfile as sf

from spectrostream_jax import channels
from spectrostream_jax import commands
from spectrostream_jax import files

# A finer mel scale than the losses' (docs/evaluation.md): 128 bands of a
# 2048-point STFT, hop 10.7 ms at 48 kHz.
WINDOW, HOP, NUM_MELS = 2048, 512, 128
DYNAMIC_RANGE_DB = 80.0


@dataclasses.dataclass(frozen=True)
class Row:
  label: str
  audio: np.ndarray  # float32 [T, 2] at 48 kHz


def log_mel(audio: np.ndarray, sample_rate: int) -> np.ndarray:
  """dB mel magnitudes of mid and side: float32 [2, frames, NUM_MELS]."""
  from spectrostream_jax import signal

  mid = (audio[:, 0] + audio[:, 1]) / 2
  side = (audio[:, 0] - audio[:, 1]) / 2
  x = np.stack([mid, side], axis=-1)[None].astype(np.float32)
  mel = signal.mel_spectrogram(x, sample_rate, WINDOW, HOP, NUM_MELS)
  mel = np.asarray(mel)
  return (20 * np.log10(np.maximum(mel[0], 1e-7))).astype(np.float32)


def read_excerpt(
  path: str, start: float, seconds: float, sample_rate: int
) -> np.ndarray:
  """[T, 2] float32 at `sample_rate`; ValueError/OSError for a bad request."""
  import soxr

  info = sf.info(path)
  first = round(start * info.samplerate)
  count = round(seconds * info.samplerate)
  if first >= info.frames:
    raise ValueError(
      f'{path} lasts {info.frames / info.samplerate:.2f} s; '
      f'--start {start:g} is past its end'
    )
  audio = sf.read(
    path, frames=count, start=first, dtype='float32', always_2d=True
  )[0]
  if not np.all(np.isfinite(audio)):
    raise ValueError(f'{path} has non-finite samples in the excerpt')
  audio = channels.to_channels(audio, 2)
  if info.samplerate != sample_rate:
    audio = soxr.resample(audio, info.samplerate, sample_rate)
  return np.ascontiguousarray(audio, np.float32)


def rows(
  codec, reference: np.ndarray, kbps: list[float], baselines: list[tuple]
) -> list[Row]:
  """The reference, the model at each bitrate, then each (codec, kbps)."""
  from spectrostream_jax.evaluation import baselines as baselines_lib

  out = [Row('reference', reference)]
  for rate in kbps:
    levels = codec.kbps_to_levels(rate)
    decoded = codec.reconstruct(reference[None], levels)[0]
    out.append(Row(f'model {codec.levels_to_kbps(levels):g} kbps', decoded))
  for name, rate in baselines:
    result = baselines_lib.roundtrip(reference, rate, name, codec.sample_rate)
    out.append(Row(f'{name} {result.kbps:.1f} kbps', result.audio))
  return out


def figure_png(
  figure_rows: list[Row], sample_rate: int, title: str = ''
) -> bytes:
  """The PNG: one row per system, mid and side columns, one colour scale."""
  import matplotlib

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt

  mels = [log_mel(r.audio, sample_rate) for r in figure_rows]
  top = float(mels[0][0].max())
  seconds = figure_rows[0].audio.shape[0] / sample_rate
  fig, axes = plt.subplots(
    len(figure_rows),
    2,
    figsize=(12, 1.9 * len(figure_rows) + 0.6),
    dpi=100,
    sharex=True,
    squeeze=False,
  )
  for (mid_ax, side_ax), row, mel in zip(axes, figure_rows, mels, strict=True):
    for ax, image, part in ((mid_ax, mel[0], 'mid'), (side_ax, mel[1], 'side')):
      shown = ax.imshow(
        image.T,
        origin='lower',
        aspect='auto',
        extent=(0, seconds, 0, NUM_MELS),
        vmin=top - DYNAMIC_RANGE_DB,
        vmax=top,
        cmap='magma',
      )
      ax.set_title(f'{row.label}: {part}', fontsize=9, loc='left')
      ax.set_ylabel('mel bin', fontsize=8)
  for ax in axes[-1]:
    ax.set_xlabel('seconds')
  fig.colorbar(shown, ax=axes, shrink=0.6, label='dB')
  if title:
    fig.suptitle(title)
  png = io.BytesIO()
  fig.savefig(png, format='png')
  plt.close(fig)
  return png.getvalue()


# Command line --------------------------------------------------------------


def _positive(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    value = math.nan
  if not (math.isfinite(value) and value > 0):
    raise argparse.ArgumentTypeError(f'must be a number > 0: {text!r}')
  return value


def _baseline(text: str) -> tuple[str, float]:
  from spectrostream_jax.evaluation import baselines as baselines_lib

  name, _, rate = text.partition(':')
  if name not in baselines_lib.BASELINES or not rate:
    raise argparse.ArgumentTypeError(
      f'{text!r} is not CODEC:KBPS with CODEC one of '
      f'{", ".join(baselines_lib.BASELINES)}'
    )
  return name, _positive(rate)


def _parser() -> argparse.ArgumentParser:
  from spectrostream_jax.evaluation import ladder

  p = commands.Parser(
    prog='python -m spectrostream_jax.evaluation.spectrograms',
    description='Log-mel spectrograms (mid and side) of an excerpt through '
    'a model and classic codecs (docs/evaluation.md).',
  )
  p.add_argument('--model', required=True, help='model directory')
  p.add_argument('--audio', required=True, help='an audio file')
  p.add_argument('--start', type=float, default=0.0, help='seconds')
  p.add_argument('--seconds', type=_positive, default=6.0)
  p.add_argument('--kbps', type=ladder.kbps_list, default=[2.0, 8.0, 16.0])
  p.add_argument(
    '--baseline',
    type=_baseline,
    action='append',
    default=None,
    help='CODEC:KBPS, repeatable (default opus:8)',
  )
  p.add_argument('--title', default=None, help='default: the file name')
  p.add_argument('--out', required=True, help='PNG to write')
  return p


def main(argv: list[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  if not args.start >= 0:
    parser.error(f'--start must be >= 0, not {args.start:g}')
  from spectrostream_jax.evaluation import baselines as baselines_lib
  from spectrostream_jax.inference import Codec

  chosen = [('opus', 8.0)] if args.baseline is None else args.baseline
  try:
    if chosen and (missing := baselines_lib.missing()):
      raise ValueError(f'cannot run the baselines: {missing}')
    codec = Codec.load(args.model)
    if codec.config.num_channels != 2:
      raise ValueError(f'{args.model} is not a stereo model')
    reference = read_excerpt(
      args.audio, args.start, args.seconds, codec.sample_rate
    )
    if reference.shape[0] < WINDOW:
      raise ValueError(
        f'the excerpt of {args.audio} is shorter than one '
        f'{WINDOW}-sample window'
      )
    png = figure_png(
      rows(codec, reference, args.kbps, chosen),
      codec.sample_rate,
      args.title or os.path.basename(args.audio),
    )
    files.write_atomic(args.out, png)
  except (ValueError, OSError, sf.LibsndfileError) as e:
    print(f'{parser.prog}: error: {e}', file=sys.stderr)
    return 1
  print(f'wrote {args.out}', file=sys.stderr)
  return 0


if __name__ == '__main__':
  sys.exit(main())
