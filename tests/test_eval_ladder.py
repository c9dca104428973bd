"""`spectrostream-eval` end to end on generated clips and a tiny model.

With the `eval` extra (the README's test command installs it), so
ViSQOL and the PyAV baselines run: their absence fails these tests.
"""

import csv
import json
import math
import os

import numpy as np
import pytest
import soundfile as sf

from spectrostream_jax import inference
from spectrostream_jax.evaluation import baselines
from spectrostream_jax.evaluation import clips
from spectrostream_jax.evaluation import ladder
from spectrostream_jax.evaluation import metrics
from spectrostream_jax.evaluation import report

SR = 48_000


@pytest.fixture(scope='module')
def model_dir(tiny_model_dir):
  return tiny_model_dir


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """Two 1.3 s stereo tracks, a corrupt file and one too short (0.1 s)."""
  out = tmp_path_factory.mktemp('eval_data')
  rng = np.random.default_rng(0)
  t = np.arange(int(1.3 * SR)) / SR
  for i, freq in enumerate((220.0, 330.0)):
    tone = 0.3 * np.sin(2 * np.pi * freq * t)
    wav = np.stack([tone, 0.5 * tone], 1) + 0.02 * rng.standard_normal(
      (t.size, 2)
    )
    sf.write(out / f'track{i}.wav', wav.astype(np.float32), SR)
  (out / 'corrupt.wav').write_bytes(b'RIFF' + bytes(40) + b'garbage')
  sf.write(out / 'short.wav', np.zeros((4800, 2), np.float32) + 0.1, SR)
  return str(out)


@pytest.fixture(scope='module')
def codec(model_dir):
  return inference.Codec.load(model_dir)


@pytest.fixture(scope='module')
def results(codec, model_dir, data_dir, tmp_path_factory):
  """One run of the command, with one worker process."""
  out = tmp_path_factory.mktemp('eval_out')
  argv = ['--model', model_dir, '--data', data_dir, '--out', str(out)]
  # 0.45 kbps is 3 levels of the tiny model; 0.5 kbps rounds to it. One
  # level count keeps the codec's compilations few; `codec`, loaded from
  # the same directory, is compiled once for this test and the next.
  argv += ['--clip-seconds', '1', '--kbps', '0.45,0.5', '--workers', '1']
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(inference.Codec, 'load', lambda path: codec)
    assert ladder.main(argv) == 0
  with open(out / 'results.json') as f:
    return out, json.load(f)


def test_eval_extra_is_installed():
  assert metrics.visqol_missing() is None
  assert baselines.missing() is None


def test_files_written(results):
  out, _ = results
  names = set(os.listdir(out))
  assert {'results.json', 'results.csv', 'results.md', 'plots'} <= names
  plots = os.listdir(out / 'plots')
  assert not [n for n in [*names, *plots] if n.startswith('.')]  # Temps.
  assert 'mel_distance.png' in plots
  table = (out / 'results.md').read_text()
  assert '| 0.45 | spectrostream |' in table and '## Codebooks' in table
  assert '| track0.wav | ' in table and '| 1.00 |' in table  # durations
  assert '| mp3 | LAME 3.' in table
  with open(out / 'results.csv') as f:
    rows = list(csv.DictReader(f))
  assert {r['clip'] for r in rows} == {'track0.wav', 'track1.wav', 'mean'}


def test_json_structure(results, codec):
  _, r = results
  assert r['format'] == ladder.FORMAT
  assert r['model']['model_id'] == codec.model_id
  assert r['environment']['versions']['jax']
  assert [c['name'] for c in r['data']['clips']] == ['track0.wav', 'track1.wav']
  assert [c['seconds'] for c in r['data']['clips']] == [1.0, 1.0]
  assert r['data']['skipped'] == {'too_short': 1, 'unreadable': 1}
  assert r['config']['visqol'] and r['config']['baselines'] == [
    'opus',
    'aac',
    'mp3',
  ]
  systems = ['spectrostream', 'opus', 'aac', 'mp3']
  assert [(x['kbps_requested'], x['system']) for x in r['rows']] == [
    (k, s) for k in (0.45, 0.5) for s in systems
  ]
  for row in r['rows'][1:4]:
    # Below every classic codec's floor: each runs at its lowest rate, once
    # for both requests, and the notes say so.
    floor = baselines.BASELINES[row['system']].min_kbps
    assert row['kbps_target'] == floor and 0 < row['kbps'] < 1.5 * floor
    assert row['library'] == r['environment']['baselines'][row['system']]
    twin = r['rows'][row_index(r, 0.5, row['system'])]
    assert twin['mean'] == row['mean']
    assert (
      f'{row["system"]} cannot be held below {floor:g} kbps: its rows at '
      f'0.45, 0.5 kbps ran at {floor:g} kbps.'
    ) in r['notes']
  # One such note per codec, none for rows that ran as asked.
  assert sum(': its rows at ' in n for n in r['notes']) == 3
  neural = [x for x in r['rows'] if x['system'] == 'spectrostream']
  assert [x['levels'] for x in neural] == [3, 3]
  assert neural[0]['kbps'] == neural[1]['kbps'] == pytest.approx(0.45)
  assert any('0.5 kbps is not a whole number' in n for n in r['notes'])
  for row in neural:
    assert 0 < row['codes']['entropy_kbps'] <= row['kbps'] + 1e-9
  books = r['codebooks']
  assert len(books['perplexity']) == 3 and books['frames'] == 2 * 25
  keys = {*metrics.SCALAR_METRICS, 'visqol'}
  for row in r['rows']:
    assert len(row['clips']) == 2
    for clip in row['clips']:
      # Opus decodes silence this far below its range: no ViSQOL then.
      if clip.get('silent'):
        assert clip['visqol'] is None and 'to silence' in str(r['notes'])
      for key in keys - ({'visqol'} if clip.get('silent') else set()):
        assert math.isfinite(clip[key]), (row['system'], key)
      assert len(clip['ild_error_bands']) == len(r['bands_hz'])
    scored = [c for c in row['clips'] if c.get('visqol') is not None]
    for key in keys - ({'visqol'} if not scored else set()):
      assert math.isfinite(row['mean'][key]), (row['system'], key)


def row_index(r, kbps, system):
  return next(
    i
    for i, x in enumerate(r['rows'])
    if (x['kbps_requested'], x['system']) == (kbps, system)
  )


def test_same_results_without_worker_processes(results, codec, data_dir):
  _, r = results
  data = clips.load(data_dir, 1.0)
  rates, _ = ladder.rates_for(codec, [0.45, 0.5])
  inline = ladder.evaluate(
    codec,
    data,
    rates,
    baselines=list(ladder.DEFAULT_BASELINES),
    visqol=True,
    workers=0,
  )
  inline = json.loads(json.dumps(report.finite_or_none(inline)))
  assert inline['codebooks'] == r['codebooks']
  # ViSQOL's last digits (1e-14) depend on the process it ran in; every
  # other value, the codecs' included, is identical.
  visqol = [v for row in r['rows'] for v in _pop_visqol(row)]
  assert [v for row in inline['rows'] for v in _pop_visqol(row)] == (
    pytest.approx(visqol, rel=1e-12, nan_ok=True)
  )
  assert inline['rows'] == r['rows']


def _pop_visqol(row):
  """Removes the row's ViSQOL values; returns them, mean first."""
  values = [row['mean'].pop('visqol', None)]
  values += [clip.pop('visqol', None) for clip in row['clips']]
  return [math.nan if v is None else v for v in values]


@pytest.mark.parametrize(
  'args, message',
  [
    (['--model', '/nonexistent', '--data', '{data}'], 'no such model'),
    (['--model', '{model}', '--data', '{empty}'], 'no audio files'),
    (['--model', '{model}', '--data', '{data}', '--kbps', '2,x'], 'numbers'),
    (['--model', '{model}', '--data', '{data}', '--kbps', '0'], '> 0'),
    (['--model', '{model}', '--data', '{data}', '--baselines', 'ogg'], 'ogg'),
    (
      ['--model', '{model}', '--data', '{data}', '--clip-seconds', '0.5'],
      'at least 1 s',
    ),
  ],
)
def test_bad_input_is_one_line(
  args, message, model_dir, data_dir, tmp_path, capsys
):
  paths = {'model': model_dir, 'data': data_dir, 'empty': str(tmp_path)}
  argv = [a.format(**paths) for a in args] + ['--out', str(tmp_path / 'o')]
  usage = {'--kbps', '--baselines'} & set(args)
  code = ladder.main(argv) if not usage else None
  if code is None:
    with pytest.raises(SystemExit) as e:
      ladder.main(argv)
    code = e.value.code
  err = capsys.readouterr().err.strip()
  assert code != 0 and message in err and len(err.splitlines()) == 1
  # A failed run leaves no --out behind.
  assert not (tmp_path / 'o').exists()


def test_out_must_be_a_writable_directory(
  model_dir, data_dir, tmp_path, capsys
):
  (tmp_path / 'file').write_text('x')
  for out in (tmp_path / 'file', tmp_path / 'file' / 'o'):
    argv = ['--model', model_dir, '--data', data_dir, '--out', str(out)]
    assert ladder.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
      f'spectrostream-eval: error: --out {out}: {tmp_path / "file"} is not '
      'a directory'
    )
  assert [p.name for p in tmp_path.iterdir()] == ['file']


def test_the_title_names_the_baselines_that_ran(results):
  _, r = results
  first = report.markdown(r).splitlines()[0]
  assert first.startswith(
    '# Bitrate ladder: SpectroStream vs Opus, AAC, MP3 on '
  )
  alone = {
    **r,
    'rows': [w for w in r['rows'] if w['system'] == 'spectrostream'],
  }
  first = report.markdown(alone).splitlines()[0]
  assert first.startswith(
    '# Bitrate ladder: SpectroStream alone (no baseline ran) on '
  )
  assert 'Opus' not in first


def test_without_baselines_the_neural_rows_are_unchanged(
  results, codec, data_dir
):
  """--baselines none leaves only the codec's rows, with the same values."""
  _, r = results
  data = clips.load(data_dir, 1.0)
  rates, _ = ladder.rates_for(codec, [0.45, 0.5])
  alone = ladder.evaluate(
    codec, data, rates, opus_tools=None, visqol=False, workers=0
  )
  alone = json.loads(json.dumps(report.finite_or_none(alone)))
  assert {row['system'] for row in alone['rows']} == {'spectrostream'}
  want = [row for row in r['rows'] if row['system'] == 'spectrostream']
  for got, ref in zip(alone['rows'], want, strict=True):
    for key, value in got['mean'].items():
      assert value == ref['mean'][key], key


def test_short_files_are_evaluated_whole(data_dir, tmp_path):
  """Clips longer than a file take the file whole, resampled or not."""
  sf.write(
    tmp_path / 'cd.wav',
    0.2 * np.random.default_rng(1).standard_normal((int(1.5 * 44_100), 2)),
    44_100,
  )
  for name in ('track0.wav', 'track1.wav'):
    (tmp_path / name).symlink_to(os.path.join(data_dir, name))
  data = clips.load(str(tmp_path), 10.0)
  seconds = {c.name: c.seconds for c in data.clips}
  assert seconds['track0.wav'] == seconds['track1.wav'] == 1.3
  # Resampled: the last few samples lack the resampler's context.
  assert seconds['cd.wav'] == pytest.approx(1.5, abs=4 / 48_000)
  assert all(c.start_seconds == 0 for c in data.clips)
  # The clip is the file: the same samples as reading it directly.
  whole, _ = sf.read(os.path.join(data_dir, 'track0.wav'), dtype='float32')
  np.testing.assert_array_equal(data.clips[1].audio, whole)


def test_quiet_prints_nothing_and_writes_the_results(
  codec, model_dir, data_dir, tmp_path, capsys, monkeypatch
):
  monkeypatch.setattr(inference.Codec, 'load', lambda path: codec)
  out = tmp_path / 'ladder'
  argv = ['--model', model_dir, '--data', data_dir, '--out', str(out)]
  argv += ['--kbps', '0.45', '--clip-seconds', '1', '--max-clips', '1']
  argv += ['--baselines', 'none', '--no-visqol', '--workers', '0', '-q']
  assert ladder.main(argv) == 0
  printed = capsys.readouterr()
  assert (printed.out, printed.err) == ('', '')
  assert {'results.json', 'results.md'} <= set(os.listdir(out))
  title = (out / 'results.md').read_text().splitlines()[0]
  assert title.startswith('# Bitrate ladder: SpectroStream alone')
