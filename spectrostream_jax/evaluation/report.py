"""The ladder's results as files: JSON, CSV, a Markdown table and plots.

Every file is written to a temporary name in the output directory and
renamed into place, so a reader never sees half a file and an
interrupted run leaves the previous results intact.
"""

import csv
import io
import json
import math
import os
from typing import Any

from spectrostream_jax import files

# (key, column title, better when higher) of the main table and plots.
COLUMNS = (
  ('visqol', 'ViSQOL', True),
  ('mel_distance', 'mel dist', False),
  ('stft_distance', 'STFT dist', False),
  ('lsd', 'LSD dB', False),
  ('si_sdr', 'SI-SDR dB', True),
  ('mid_snr', 'mid SNR dB', True),
  ('side_snr', 'side SNR dB', True),
  ('ild_error', 'ILD err dB', False),
  ('ipd_error', 'IPD err rad', False),
  ('icc_error', 'ICC err', False),
)
METRIC_KEYS = tuple(key for key, _, _ in COLUMNS)


def finite_or_none(x: Any) -> Any:
  """JSON has no NaN: a missing value is null."""
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: finite_or_none(v) for k, v in x.items()}
  if isinstance(x, list | tuple):
    return [finite_or_none(v) for v in x]
  return x


def write_all(out_dir: str, results: dict[str, Any]) -> list[str]:
  """Writes every output file into `out_dir`; returns their names."""
  text = json.dumps(finite_or_none(results), indent=1, allow_nan=False)
  for name, body in (
    ('results.json', text + '\n'),
    ('results.csv', csv_text(results)),
    ('results.md', markdown(results) + '\n'),
  ):
    files.write_atomic(os.path.join(out_dir, name), body)
  return ['results.json', 'results.csv', 'results.md', *plots(out_dir, results)]


# How results.md names the classic codecs (evaluation/baselines.py).
_NAMES = {
  'opus': 'Opus',
  'aac': 'AAC',
  'mp3': 'MP3',
  'opus-tools': 'opus-tools',
}


def ladder_title(results: dict[str, Any]) -> str:
  """'SpectroStream vs Opus, AAC' for the codecs that have rows, or alone."""
  others = [
    _NAMES.get(s, s)
    for s in dict.fromkeys(row['system'] for row in results['rows'])
    if s != 'spectrostream'
  ]
  if not others:
    return 'SpectroStream alone (no baseline ran)'
  return f'SpectroStream vs {", ".join(others)}'


def _fmt(x: Any, digits: int = 3) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return '–'
  if isinstance(x, float):
    return f'{x:.{digits}f}'
  return str(x)


def csv_text(results: dict[str, Any]) -> str:
  """One line per system × bitrate × clip, and one per mean ('mean')."""
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator='\n')
  head = ('system', 'kbps_requested', 'kbps', 'levels', 'clip')
  writer.writerow([*head, *METRIC_KEYS])
  for row in results['rows']:
    key = [row['system'], row['kbps_requested'], row['kbps'], row['levels']]
    for clip in [*row['clips'], {**row['mean'], 'clip': 'mean'}]:
      writer.writerow(
        [*key, clip['clip'], *(_csv_value(clip.get(k)) for k in METRIC_KEYS)]
      )
  return buf.getvalue()


def _csv_value(x: Any) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return ''
  return repr(x)


def markdown(results: dict[str, Any]) -> str:
  """The tables of results.md: means per bitrate × system, then details."""
  config, model, data = results['config'], results['model'], results['data']
  env = results['environment']
  head = [
    f'# Bitrate ladder: {ladder_title(results)} on {config["data"]}',
    '',
    f'Model `{config["model"]}` (id {model["model_id"][:12]}, '
    f'{model["kbps_per_level"]:g} kbps per level, {model["num_levels"]} '
    f'levels). {len(data["clips"])} clips of up to '
    f'{config["clip_seconds"]:g} s'
    + (f' from the {data["split"]!r} split' if data['split'] else '')
    + f', seed {config["seed"]}. Commit {env["git_commit"] or "unknown"}, '
    f'{env["date"]}.',
    '',
    'Means over clips (↑ higher is better, ↓ lower). `kbps` is what the '
    "system spent: the model's levels × kbps per level, or a classic "
    "codec's packets' measured rate. See docs/evaluation.md for the "
    'definitions.',
    '',
  ]
  titles = [f'{t} {"↑" if up else "↓"}' for _, t, up in COLUMNS]
  table = [
    '| target kbps | system | kbps | ' + ' | '.join(titles) + ' |',
    '|' + '---|' * (3 + len(COLUMNS)),
  ]
  for row in results['rows']:
    mean = row['mean']
    cells = [_fmt(mean.get(k)) for k in METRIC_KEYS]
    table.append(
      f'| {row["kbps_requested"]:g} | {row["system"]} | '
      f'{_fmt(row["kbps"], 2)} | ' + ' | '.join(cells) + ' |'
    )
  out = head + table + _libraries(results) + _clip_table(results)
  for key, title in (
    ('ild_error', 'ILD error, dB'),
    ('ipd_error', 'IPD error, radians'),
  ):
    out += _band_table(results, key, title)
  out += _codebook_table(results)
  if results['notes']:
    out += ['', '## Notes', '', *(f'- {n}' for n in results['notes'])]
  return '\n'.join(out)


def _libraries(results: dict[str, Any]) -> list[str]:
  """Which library (and version) made each classic codec's rows."""
  seen = {}
  for row in results['rows']:
    if row.get('library'):
      seen.setdefault(row['system'], row['library'])
  if not seen:
    return []
  lines = ['', '## Classic codecs', '', '| system | library |', '|---|---|']
  return lines + [f'| {s} | {lib} |' for s, lib in seen.items()]


def _clip_table(results: dict[str, Any]) -> list[str]:
  clips = results['data']['clips']
  lines = ['', '## Clips', '', '| clip | start s | seconds |', '|---|---|---|']
  for c in clips:
    seconds = c.get('seconds')
    lines.append(
      f'| {c["name"]} | {c["start_seconds"]:.2f} | {_fmt(seconds, 2)} |'
    )
  return lines


def _band_table(results: dict[str, Any], key: str, title: str) -> list[str]:
  bands = results['bands_hz']
  lines = [
    '',
    f'## {title}, per octave band (centre Hz)',
    '',
    '| target kbps | system | ' + ' | '.join(f'{b:g}' for b in bands) + ' |',
    '|' + '---|' * (2 + len(bands)),
  ]
  for row in results['rows']:
    values = row['mean'].get(f'{key}_bands') or [None] * len(bands)
    lines.append(
      f'| {row["kbps_requested"]:g} | {row["system"]} | '
      + ' | '.join(_fmt(v, 2) for v in values)
      + ' |'
    )
  return lines


def _codebook_table(results: dict[str, Any]) -> list[str]:
  books = results['codebooks']
  lines = [
    '',
    f'## Codebooks ({books["frames"]} frames of the eval clips)',
    '',
    'Per level: share of the codebook used at least once, perplexity '
    '(2^entropy; the codebook size at best) and entropy in bits (of '
    f'{math.log2(results["model"]["codebook_size"]):g} spent per code).',
    '',
    '| level | usage | perplexity | entropy bits |',
    '|---|---|---|---|',
  ]
  for i, (u, p, h) in enumerate(
    zip(books['usage'], books['perplexity'], books['entropy_bits'], strict=True)
  ):
    lines.append(f'| {i + 1} | {100 * u:.1f} % | {p:.1f} | {h:.2f} |')
  return lines


def plots(out_dir: str, results: dict[str, Any]) -> list[str]:
  """plots/<metric>.png: mean metric against kbps, one line per system."""
  import matplotlib

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  from matplotlib import ticker

  systems = list(dict.fromkeys(row['system'] for row in results['rows']))
  written = []
  for key, title, up in COLUMNS:
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    drawn = False
    for system in systems:
      points = sorted(
        (row['kbps'], row['mean'].get(key))
        for row in results['rows']
        if row['system'] == system
      )
      points = [(x, y) for x, y in points if _finite(x) and _finite(y)]
      if points:
        ax.plot(*zip(*points, strict=True), marker='o', label=system)
        drawn = True
    if not drawn:
      plt.close(fig)
      continue
    ax.set_xscale('log', base=2)
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f'{v:g}'))
    ax.set_xlabel('kbps')
    ax.set_ylabel(f'{title} ({"higher" if up else "lower"} is better)')
    ax.grid(True, which='both', alpha=0.3)
    ax.legend()
    fig.tight_layout()
    name = os.path.join('plots', f'{key}.png')
    png = io.BytesIO()
    fig.savefig(png, format='png')
    plt.close(fig)
    files.write_atomic(os.path.join(out_dir, name), png.getvalue())
    written.append(name)
  return written


def _finite(x: Any) -> bool:
  return isinstance(x, int | float) and math.isfinite(x)
