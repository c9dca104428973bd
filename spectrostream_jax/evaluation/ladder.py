"""`spectrostream-eval`: a model's bitrate ladder next to classic codecs.

    spectrostream-eval --model MODEL_DIR --data DIR_OR_MANIFEST \\
        --kbps 1,2,4,8,12,16 --out OUT_DIR \\
        [--clip-seconds 10] [--max-clips N] [--workers K] [--seed S] \\
        [--baselines opus,aac,mp3[,opus-tools] | none] [--no-visqol]

For every clip (clips.py) and bitrate it decodes the clip through the
model at that many RVQ levels, and through each classic codec at the
same target bitrate (baselines.py: Opus, AAC and MP3 through PyAV;
opus.py: opus-tools, when asked for), and scores them against the
reference (metrics.py); it also counts the model's codes per level.
OUT_DIR receives results.json, results.csv, results.md and plots/*.png
(report.py); docs/evaluation.md explains them.

The codec runs in this process. Classic codecs' round trips and ViSQOL,
the slow CPU work, run in K spawned worker processes (0: in this
process). Every
number is a pure function of its clip and bitrate, computed the same way
wherever it runs, and results are gathered in clip order: the output is
the same for any K. A mistake in the arguments, model or data prints one
line on stderr and exits non-zero.
"""

import argparse
import collections
import concurrent.futures
import dataclasses
import datetime
import importlib.metadata
import math
import multiprocessing
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np
from rich import console as rich_console
from rich import progress as rich_progress

from spectrostream_jax import commands
from spectrostream_jax.evaluation import baselines as baselines_lib
from spectrostream_jax.evaluation import clips as clips_lib
from spectrostream_jax.evaluation import metrics
from spectrostream_jax.evaluation import opus
from spectrostream_jax.evaluation import report
from spectrostream_jax.inference import Codec

NEURAL = 'spectrostream'
OPUS_TOOLS = 'opus-tools'
DEFAULT_BASELINES = ('opus', 'aac', 'mp3')
FORMAT = 'spectrostream-eval'
FORMAT_VERSION = 1
_PACKAGES = (
  'spectrostream-jax',
  'jax',
  'jaxlib',
  'flax',
  'numpy',
  'soundfile',
  'soxr',
  'visqol-python',
  'numba',
  'matplotlib',
  'av',
)


@dataclasses.dataclass(frozen=True)
class Rate:
  """A rung of the ladder: the bitrate asked for and the model's levels."""

  requested: float
  levels: int
  kbps: float  # what `levels` levels cost


def rates_for(codec: Codec, kbps: list[float]) -> tuple[list[Rate], list[str]]:
  """Levels for each requested bitrate, and notes where it was rounded.

  A bitrate that is not a whole number of levels, or lies outside the
  model's range, is evaluated at the nearest level count in range.
  """
  per_level = codec.levels_to_kbps(1)
  rates, notes = [], []
  for k in kbps:
    try:
      levels = codec.kbps_to_levels(k)
    except ValueError:
      levels = min(max(round(k / per_level), 1), codec.num_levels)
      notes.append(
        f'{k:g} kbps is not a whole number of levels in 1..'
        f'{codec.num_levels} of this model ({per_level:g} kbps per level): '
        f'{NEURAL} ran at {levels} levels = '
        f'{codec.levels_to_kbps(levels):g} kbps, classic codecs at '
        f'{k:g} kbps.'
      )
    rates.append(Rate(k, levels, codec.levels_to_kbps(levels)))
  return rates, notes


class _Inline:
  """The pool of --workers 0: runs each job when it is submitted."""

  def submit(self, fn, *args) -> concurrent.futures.Future:
    future = concurrent.futures.Future()
    try:
      future.set_result(fn(*args))
    except Exception as e:  # Delivered by result(), as a pool would.
      future.set_exception(e)
    return future

  def shutdown(self, cancel_futures: bool = False) -> None:
    del cancel_futures


def _pool(workers: int):
  if workers == 0:
    return _Inline()
  # JAX runs threads in this process: fork would copy them mid-flight.
  return concurrent.futures.ProcessPoolExecutor(
    workers, mp_context=multiprocessing.get_context('spawn')
  )


class _Scores:
  """Per (system, requested kbps): one dict of metrics per clip.

  ViSQOL jobs wait in a bounded queue, so that clips decoded faster than
  they are scored do not pile up in memory.
  """

  def __init__(self, pool, visqol: bool, window: int, advance):
    self.rows = collections.defaultdict(dict)
    self.pool, self.visqol, self.window = pool, visqol, window
    self.pending = collections.deque()
    self.advance = advance
    self.errors = collections.Counter()
    self.first_error = {}

  def add(self, key, clip: int, ref: np.ndarray, est: np.ndarray, **extra):
    scores = {**extra, **metrics.signal_metrics(ref, est)}
    self.rows[key][clip] = scores
    if not self.visqol:
      self.advance()
      return
    self.pending.append(
      (scores, self.pool.submit(metrics.visqol, _mono(ref), _mono(est)))
    )
    while len(self.pending) > self.window:
      self._finish_one()

  def failed(self, what: str, error: Exception) -> None:
    self.errors[what] += 1
    self.first_error.setdefault(what, f'{type(error).__name__}: {error}')

  def _finish_one(self) -> None:
    scores, future = self.pending.popleft()
    try:
      scores['visqol'] = future.result()
    except Exception as e:  # One bad clip should not end a long run.
      scores['visqol'] = math.nan
      self.failed('ViSQOL', e)
    self.advance()

  def finish(self) -> None:
    while self.pending:
      self._finish_one()


def _mono(wav: np.ndarray) -> np.ndarray:
  """What ViSQOL compares anyway; half the bytes to ship to a worker."""
  return wav.mean(axis=1, keepdims=True)


def target_kbps(system: str, requested: float) -> float:
  """The rate `system` is run at when `requested` is asked for."""
  if system in baselines_lib.BASELINES:
    return baselines_lib.BASELINES[system].target(requested)
  return requested


def _roundtrip(system: str, ref: np.ndarray, kbps: float, tools):
  """One classic codec's round trip, as the extra fields of its scores."""
  if system == OPUS_TOOLS:
    out = opus.roundtrip(ref, kbps, tools)
    extra = {'kbps': out.kbps, 'file_kbps': out.file_kbps, 'lag': out.lag}
    extra['library'] = tools.version
  else:
    out = baselines_lib.roundtrip(ref, kbps, system)
    extra = {'kbps': out.kbps, 'lag': out.lag, 'library': out.library}
    extra['sample_rate'] = out.sample_rate
  return out.audio, extra


def evaluate(
  codec: Codec,
  data: clips_lib.Clips,
  rates: list[Rate],
  *,
  baselines: list[str] = (),
  opus_tools: opus.Tools | None = None,
  visqol: bool,
  workers: int,
  progress: bool = True,
) -> dict[str, Any]:
  """Scores every clip at every rate: rows, codebook statistics, notes.

  `baselines` names classic codecs of baselines.BASELINES, or OPUS_TOOLS
  (which needs `opus_tools`). A classic codec asked for a rate below its
  lowest runs at its lowest, once for all the rates that map there.
  """
  if OPUS_TOOLS in baselines and opus_tools is None:
    raise ValueError('opus-tools was asked for, but not found')
  systems = [NEURAL, *baselines]
  targets = {
    s: sorted({target_kbps(s, r.requested) for r in rates}) for s in baselines
  }
  max_levels = max(r.levels for r in rates)
  k = codec.config.quantizer.codebook_size
  counts = np.zeros((max_levels, k), np.int64)
  pool = _pool(workers)
  columns = (
    rich_progress.TextColumn('{task.description}'),
    rich_progress.BarColumn(),
    rich_progress.MofNCompleteColumn(),
    rich_progress.TimeElapsedColumn(),
    rich_progress.TimeRemainingColumn(),
  )
  try:
    console = rich_console.Console(stderr=True)
    with rich_progress.Progress(
      *columns, console=console, disable=not progress
    ) as bar:
      per_clip = len(rates) + sum(len(t) for t in targets.values())
      task = bar.add_task(
        'clip × kbps × system', total=len(data.clips) * per_clip
      )
      scores = _Scores(
        pool, visqol, 2 * max(workers, 1), lambda: bar.advance(task)
      )
      for i, clip in enumerate(data.clips):
        ref = clip.audio
        # Submitted first: the workers encode while the codec runs here.
        jobs = [
          ((s, kbps), pool.submit(_roundtrip, s, ref, kbps, opus_tools))
          for s in baselines
          for kbps in targets[s]
        ]
        # One encode and one decode program per length bucket, not a few
        # per clip length (docs/evaluation.md, "Speed").
        codes, decoded = codec.reconstruct_levels(
          ref[None], [r.levels for r in rates]
        )
        counts += metrics.code_counts(codes[0], k)
        decoded = {n: audio[0] for n, audio in decoded.items()}
        for r in rates:
          scores.add((NEURAL, r.requested), i, ref, decoded[r.levels])
        for key, job in jobs:
          try:
            audio, extra = job.result()
          except Exception as e:  # One bad clip should not end a long run.
            scores.failed(key[0], e)
            scores.rows[key][i] = {}
            bar.advance(task)
            continue
          silent = not np.any(audio)
          scores.add(key, i, ref, audio, **extra, silent=silent)
      scores.finish()
  finally:
    pool.shutdown(cancel_futures=True)
  notes = [
    f'{what} failed on {n} clip(s) (those values are missing); first: '
    f'{scores.first_error[what]}'
    for what, n in scores.errors.items()
  ]
  return {
    'rows': _rows(codec, data, rates, systems, scores.rows, counts, notes),
    'codebooks': {
      'frames': int(counts[0].sum()),
      **metrics.codebook_stats(counts),
    },
    'notes': notes,
  }


def _mean(values: list) -> float:
  """Mean of the finite values; NaN when there is none."""
  finite = [v for v in values if isinstance(v, float) and math.isfinite(v)]
  return math.fsum(finite) / len(finite) if finite else math.nan


def _means(per_clip: list[dict[str, Any]]) -> dict[str, Any]:
  """Means over clips of every metric (and band) that the clips have."""
  keys = (*report.METRIC_KEYS, 'kbps', 'file_kbps')
  out = {
    k: _mean([c.get(k, math.nan) for c in per_clip])
    for k in keys
    if any(k in c for c in per_clip)
  }
  for name in metrics.BAND_METRICS:
    bands = [c[f'{name}_bands'] for c in per_clip if f'{name}_bands' in c]
    if bands:
      out[f'{name}_bands'] = [_mean(list(b)) for b in zip(*bands, strict=True)]
  return out


def _rows(codec, data, rates, systems, scored, counts, notes) -> list:
  stats = metrics.codebook_stats(counts)
  rows = []
  # Classic codecs run below or above the rate asked for: (system,
  # target) -> the requests; and the (system, target) pairs noted already.
  moved = collections.defaultdict(list)
  noted = set()
  for r in rates:
    for system in systems:
      target = target_kbps(system, r.requested)
      key = (system, target) if system != NEURAL else (system, r.requested)
      per_clip = [
        {'clip': c.name, **scored[key][i]} for i, c in enumerate(data.clips)
      ]
      row = {
        'system': system,
        'kbps_requested': r.requested,
        'kbps': r.kbps,
        'levels': r.levels if system == NEURAL else None,
        'mean': _means(per_clip),
        'clips': per_clip,
      }
      if system == NEURAL:
        bits = stats['entropy_bits'][: r.levels]
        row['codes'] = {
          'mean_perplexity': float(np.mean(stats['perplexity'][: r.levels])),
          # What an ideal entropy coder of each level's codes would spend.
          'entropy_kbps': math.fsum(bits) * codec.config.frame_rate / 1000,
        }
      else:
        row['kbps'] = row['mean'].pop('kbps', math.nan)
        row['kbps_target'] = target
        # The same for every clip: kept once, in the row.
        for name in ('library', 'sample_rate'):
          found = [c.pop(name) for c in per_clip if name in c]
          row[name] = found[0] if found else None
        if target != r.requested:
          moved[(system, target)].append(r.requested)
        if (system, target) not in noted:
          noted.add((system, target))
          _note_rate(system, target, row, notes)
      rows.append(row)
  for (system, target), requested in moved.items():
    asked = ', '.join(f'{k:g}' for k in requested)
    floor = baselines_lib.BASELINES[system].min_kbps
    why = (
      f'cannot be held below {floor:g} kbps'
      if target == floor
      else f'has no rate between {target:g} and {max(requested):g} kbps'
    )
    notes.append(
      f'{system} {why}: its rows at {asked} kbps ran at {target:g} kbps.'
    )
  return rows


def _note_rate(system: str, target: float, row: dict[str, Any], notes) -> None:
  """Notes where a classic codec missed its target or decoded silence."""
  achieved, file_kbps = row['kbps'], row['mean'].get('file_kbps', math.nan)
  if math.isfinite(achieved) and abs(achieved - target) > 0.05 * target:
    container = (
      f'; {file_kbps:.2f} kbps with the Ogg container'
      if math.isfinite(file_kbps)
      else ''
    )
    notes.append(
      f'{system} at a {target:g} kbps target spent {achieved:.2f} kbps '
      f'(packets{container}).'
    )
  silent = sum(bool(c.get('silent')) for c in row['clips'])
  if silent:
    notes.append(
      f'{system} at {target:g} kbps decoded {silent} of '
      f'{len(row["clips"])} clips to silence; ViSQOL cannot score silence, '
      'so its mean leaves them out.'
    )


# Run description -----------------------------------------------------------


def git_commit() -> tuple[str | None, bool | None]:
  """(HEAD commit, whether the tree has changes) of this source tree."""
  here = os.path.dirname(os.path.abspath(__file__))

  def git(*args: str) -> str | None:
    try:
      done = subprocess.run(
        ['git', '-C', here, *args], capture_output=True, text=True, timeout=30
      )
    except (OSError, subprocess.TimeoutExpired):
      return None
    return done.stdout.strip() if done.returncode == 0 else None

  commit = git('rev-parse', 'HEAD')
  status = git('status', '--porcelain') if commit else None
  return commit, None if status is None else bool(status)


def versions() -> dict[str, str | None]:
  found = {'python': sys.version.split()[0]}
  for name in _PACKAGES:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      found[name] = None
  return found


def _model_info(codec: Codec, model_dir: str) -> dict[str, Any]:
  c = codec.config
  return {
    'dir': os.path.abspath(model_dir),
    'model_id': codec.model_id,
    'sample_rate': c.sample_rate,
    'frame_rate': c.frame_rate,
    'num_levels': codec.num_levels,
    'codebook_size': c.quantizer.codebook_size,
    'kbps_per_level': codec.levels_to_kbps(1),
  }


# Command line --------------------------------------------------------------


def kbps_list(text: str) -> list[float]:
  try:
    values = [float(v) for v in text.split(',') if v.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(
      f'not a comma-separated list of numbers: {text!r}'
    ) from None
  if not values or not all(math.isfinite(v) and v > 0 for v in values):
    raise argparse.ArgumentTypeError(f'bitrates must be > 0 kbps: {text!r}')
  return sorted(set(values))


def _baseline_list(text: str) -> list[str]:
  names = [n.strip() for n in text.split(',') if n.strip()]
  if names == ['none']:
    return []
  known = [*baselines_lib.BASELINES, OPUS_TOOLS]
  unknown = [n for n in names if n not in known]
  if unknown or not names:
    raise argparse.ArgumentTypeError(
      f'unknown baseline {", ".join(unknown) or repr(text)}; choose from '
      f'{", ".join(known)} or none'
    )
  return list(dict.fromkeys(names))


def check_out(out: str) -> None:
  """ValueError unless `out` is, or can be made as, a writable directory.

  Nothing is created: --out appears with the results, so a run that
  fails or is interrupted leaves none behind.
  """
  path = os.path.abspath(out)
  while not os.path.lexists(path):
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    raise ValueError(f'--out {out}: {path} is not a directory')
  if not os.access(path, os.W_OK | os.X_OK):
    raise ValueError(f'--out {out}: cannot write in {path}')


def _parser() -> commands.Parser:
  p = commands.Parser(
    prog='spectrostream-eval',
    description='Bitrate ladder of a SpectroStream model, next to classic '
    'codecs (Opus, AAC, MP3) unless --baselines none (docs/evaluation.md).',
  )
  commands.add_version(p, p.prog)
  p.add_argument('--model', required=True, help='model directory')
  p.add_argument(
    '--data', required=True, help='directory, glob or .jsonl/.csv manifest'
  )
  p.add_argument(
    '--kbps',
    type=kbps_list,
    default=[1.0, 2.0, 4.0, 8.0, 12.0, 16.0],
    help='comma-separated bitrates (default 1,2,4,8,12,16)',
  )
  p.add_argument('--out', required=True, help='output directory')
  p.add_argument('--clip-seconds', type=float, default=10.0)
  p.add_argument('--max-clips', type=int, default=None, help='default: all')
  p.add_argument(
    '--workers',
    type=int,
    default=min(4, os.cpu_count() or 1),
    help='processes for Opus and ViSQOL (0: none)',
  )
  p.add_argument('--seed', type=int, default=0, help='of the clip positions')
  p.add_argument(
    '--baselines',
    type=_baseline_list,
    default=list(DEFAULT_BASELINES),
    help='classic codecs to compare with, comma-separated, from '
    f'{", ".join([*baselines_lib.BASELINES, OPUS_TOOLS])}; none for the '
    f'model only (default {",".join(DEFAULT_BASELINES)})',
  )
  p.add_argument('--no-visqol', action='store_true', help='skip ViSQOL')
  p.add_argument(
    '-q',
    '--quiet',
    action='store_true',
    help='no progress bar and no closing line; errors only',
  )
  return p


def main(argv: list[str] | None = None) -> int:
  """Runs the ladder; the exit status."""
  parser = _parser()
  args = parser.parse_args(argv)
  if args.workers < 0 or (args.max_clips is not None and args.max_clips < 1):
    parser.error('--workers must be >= 0 and --max-clips >= 1')
  start = time.time()
  try:
    codec = Codec.load(args.model)
    if codec.config.num_channels != 2:
      raise ValueError(
        f'{args.model} is a {codec.config.num_channels}-channel model; '
        'the ladder and its stereo metrics need a stereo one'
      )
    rates, notes = rates_for(codec, args.kbps)
    # Before the data: an unusable --out should fail in seconds, not hours.
    check_out(args.out)
    data = clips_lib.load(
      args.data,
      args.clip_seconds,
      max_clips=args.max_clips,
      seed=args.seed,
      sample_rate=codec.sample_rate,
      workers=max(args.workers, 1),
    )
  except (ValueError, OSError) as e:
    print(f'{parser.prog}: error: {e}', file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print(f'{parser.prog}: interrupted', file=sys.stderr)
    return 130

  chosen, tools = list(args.baselines), None
  if OPUS_TOOLS in chosen:
    tools = opus.find()
    if tools is None:
      chosen.remove(OPUS_TOOLS)
      notes.append(
        'opus-tools rows skipped: opusenc/opusdec not found on PATH '
        '(apt-get install opus-tools).'
      )
  no_pyav = baselines_lib.missing()
  if no_pyav and set(chosen) & set(baselines_lib.BASELINES):
    skipped = [n for n in chosen if n in baselines_lib.BASELINES]
    chosen = [n for n in chosen if n not in skipped]
    notes.append(f'{", ".join(skipped)} rows skipped: {no_pyav}.')
  missing = None if args.no_visqol else metrics.visqol_missing()
  if missing:
    notes.append(f'ViSQOL skipped: {missing}.')
  if data.skipped:
    notes.append(f'Files skipped (no clip): {data.skipped}.')
  try:
    results = evaluate(
      codec,
      data,
      rates,
      baselines=chosen,
      opus_tools=tools,
      visqol=not (args.no_visqol or missing),
      workers=args.workers,
      progress=not args.quiet,
    )
  except KeyboardInterrupt:
    print(f'{parser.prog}: interrupted', file=sys.stderr)
    return 130
  commit, dirty = git_commit()
  output = {
    'format': FORMAT,
    'format_version': FORMAT_VERSION,
    'config': {
      'model': args.model,
      'data': args.data,
      'kbps': args.kbps,
      'clip_seconds': args.clip_seconds,
      'max_clips': args.max_clips,
      'workers': args.workers,
      'seed': args.seed,
      'baselines': chosen,
      'visqol': not (args.no_visqol or missing),
    },
    'model': _model_info(codec, args.model),
    'environment': {
      'git_commit': commit,
      'git_dirty': dirty,
      'date': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
      'wall_seconds': round(time.time() - start, 1),
      'opus_tools': tools.version if tools else None,
      'baselines': {
        n: baselines_lib.library(n)
        for n in chosen
        if n in baselines_lib.BASELINES
      },
      'versions': versions(),
    },
    'data': {
      'spec': args.data,
      'split': data.split,
      'clips': [
        {
          'name': c.name,
          'start_seconds': c.start_seconds,
          'seconds': c.seconds,
        }
        for c in data.clips
      ],
      'skipped': data.skipped,
      'skipped_examples': [list(s) for s in data.skipped_examples],
    },
    'bands_hz': list(metrics.BAND_CENTRES_HZ),
    'rows': results['rows'],
    'codebooks': results['codebooks'],
    'notes': notes + results['notes'],
  }
  written = report.write_all(args.out, output)
  if not args.quiet:
    print(
      f'{parser.prog}: wrote {", ".join(written)} to {args.out}',
      file=sys.stderr,
    )
  return 0


if __name__ == '__main__':
  sys.exit(main())
