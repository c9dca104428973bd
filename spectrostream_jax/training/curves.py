r"""Training curves from a run's TensorBoard events, without TensorFlow.

    python -m spectrostream_jax.training.curves --workdir /tmp/run \
        --out curves.png

Reads the scalar summaries that `spectrostream-train` logs (TFRecord files
of `Event` protos, parsed with tensorboardX's own proto classes) and plots
the chosen tags against the step, one panel per tag. A tag with glob
characters is a group drawn in one panel, one line per match: for example
`'g/share/*'` (what each loss contributes to the gradient) or
`'vq/usage/L0[0-7]'` (codebook usage of levels 1-8). A tag given with
--tags that the run did not log is an error naming the closest logged
one; of the default tags, those not logged are left out.
"""

import argparse
import difflib
import fnmatch
import glob
import os
import re
import struct
import sys

import numpy as np

from spectrostream_jax import files

DEFAULT_TAGS = (
  'g/mel',
  'g/feat',
  'd/loss',
  'vq/commit',
  'eval/mel_distance',
  'eval/si_sdr',
)


def read_scalars(logdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{tag: (steps, values)} of every scalar in `logdir`, sorted by step.

  A step logged twice (a resumed run repeats the steps after its last
  checkpoint) keeps the value written last. A torn record at the end of a
  file (a killed run) ends that file.
  """
  from tensorboardX.proto import event_pb2

  points: dict[str, dict[int, float]] = {}
  for path in sorted(glob.glob(os.path.join(logdir, 'events.out.tfevents.*'))):
    with open(path, 'rb') as f:
      data = f.read()
    pos = 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack('<Q', data[pos : pos + 8])
      start, end = pos + 12, pos + 12 + length
      if end + 4 > len(data):
        break
      event = event_pb2.Event()
      event.ParseFromString(data[start:end])
      pos = end + 4
      for value in event.summary.value:
        if value.HasField('simple_value'):
          points.setdefault(value.tag, {})[event.step] = value.simple_value
  out = {}
  for tag, by_step in points.items():
    steps = np.array(sorted(by_step))
    out[tag] = (steps, np.array([by_step[s] for s in steps]))
  return out


def panels(scalars: dict, tags) -> list[tuple[str, list[str]]]:
  """(title, logged tags) per requested tag or glob; unmatched ones dropped."""
  out = []
  for tag in tags:
    if any(c in tag for c in '*?['):
      matched = sorted(fnmatch.filter(scalars, tag))
    else:
      matched = [tag] if tag in scalars else []
    if matched:
      out.append((tag, matched))
  return out


def logged_names(scalars: dict) -> list[str]:
  """The logged tags, per-level series (`vq/usage/L00`...) as one glob."""
  return sorted({re.sub(r'/L\d+$', '/L*', tag) for tag in scalars})


def check_tags(scalars: dict, tags) -> None:
  """ValueError naming the first tag or glob that matches nothing logged."""
  for tag in tags:
    if panels(scalars, [tag]):
      continue
    close = difflib.get_close_matches(tag, list(scalars), n=1)
    hint = f'did you mean {close[0]}? ' if close else ''
    raise ValueError(
      f'no scalar {tag!r} was logged; {hint}logged: '
      + ', '.join(logged_names(scalars))
    )


def plot(
  scalars: dict, tags, out: str, title: str = '', smooth: int = 1
) -> None:
  """One panel per tag or glob (missing skipped); `smooth`: moving average."""
  chosen = panels(scalars, tags)
  fig, axes = _figure(len(chosen))
  for ax, (name, matched) in zip(axes.flat, chosen, strict=False):
    group = len(matched) > 1
    prefix = os.path.commonprefix(matched) if group else ''
    for tag in matched:
      _line(ax, *scalars[tag], smooth, tag[len(prefix) :] or tag, group)
    if group:
      ax.legend(fontsize=6, ncol=2 if len(matched) > 4 else 1)
    ax.set_title(name)
  _finish(fig, axes, len(chosen), title, out)


def compare(
  runs: dict[str, dict], tags, out: str, title: str = '', smooth: int = 1
) -> None:
  """One panel per tag, one line per run ({name: read_scalars(...)});
  tags that no run logged are left out."""
  from matplotlib import pyplot as plt

  chosen = [t for t in tags if any(t in scalars for scalars in runs.values())]
  fig, axes = _figure(len(chosen))
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for ax, tag in zip(axes.flat, chosen, strict=False):
    for i, (name, scalars) in enumerate(runs.items()):
      if tag in scalars:
        _line(ax, *scalars[tag], smooth, name, True, colors[i % len(colors)])
    ax.legend(fontsize=6)
    ax.set_title(tag)
  _finish(fig, axes, len(chosen), title, out)


def _figure(panels_needed: int):
  """A figure with that many panels, three to a row."""
  import matplotlib

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt

  if not panels_needed:
    raise ValueError('none of the requested tags were logged')
  cols = min(3, panels_needed)
  rows = -(-panels_needed // cols)
  return plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)


def _line(ax, steps, values, smooth, label, keep_color, color=None):
  """The values, faint under their moving average when `smooth` > 1."""
  smoothed = smooth > 1 and len(values) >= smooth
  raw = ax.plot(
    steps,
    values,
    alpha=0.35 if smoothed else 1.0,
    lw=1,
    color=color,
    label=None if smoothed else label,
  )
  if smoothed:
    kernel = np.ones(smooth) / smooth
    ax.plot(
      steps[smooth - 1 :],
      np.convolve(values, kernel, 'valid'),
      lw=2,
      color=raw[0].get_color() if keep_color else None,
      label=label,
    )


def _finish(fig, axes, used: int, title: str, out: str) -> None:
  from matplotlib import pyplot as plt

  for ax in axes.flat[:used]:
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
  for ax in axes.flat[used:]:
    ax.axis('off')
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  with files.atomic_path(out) as tmp:
    fig.savefig(tmp, dpi=100)
  plt.close(fig)


def training_seconds(scalars: dict) -> float:
  """Time spent in steps: each log interval's steps over its logged rate
  (`perf/steps_per_second`), so compiles, evals and restarts are left out."""
  steps, rates = scalars['perf/steps_per_second']
  previous = np.concatenate([[0], steps[:-1]])
  return float(np.sum((steps - previous) / rates))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--workdir', required=True)
  ap.add_argument('--out', required=True)
  ap.add_argument(
    '--tags',
    default=None,
    help='comma-separated tags or globs (default: '
    f'{",".join(DEFAULT_TAGS)}, those logged)',
  )
  ap.add_argument('--smooth', type=int, default=1)
  ap.add_argument('--title', default='')
  args = ap.parse_args(argv)
  logdir = os.path.join(args.workdir, 'tensorboard')
  scalars = read_scalars(logdir)
  if not scalars:
    print(f'curves: error: no scalars under {logdir}', file=sys.stderr)
    return 1
  tags = DEFAULT_TAGS if args.tags is None else args.tags.split(',')
  try:
    if args.tags is not None:
      check_tags(scalars, tags)
    plot(scalars, tags, args.out, args.title, args.smooth)
  except ValueError as e:
    print(f'curves: error: {e}', file=sys.stderr)
    return 1
  last = {t: float(v[-1]) for t, (_, v) in scalars.items()}
  last_step = max(int(s[-1]) for s, _ in scalars.values())
  print(f'wrote {args.out}; last step {last_step}')
  for _, matched in panels(scalars, tags):
    for tag in matched:
      print(f'  {tag}: first {scalars[tag][1][0]:.4g}, last {last[tag]:.4g}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
