"""`spectrostream` as a user meets it: folders, progress, formats, flags.

Issue 19: each test names the item it covers. Everything runs in-process
on the tiny model; usage errors are argparse's SystemExit(2).
"""

import os

import numpy as np
import pytest
import soundfile as sf

from spectrostream_jax import audio_formats
from spectrostream_jax import cli
from spectrostream_jax import export
from spectrostream_jax.inference import Codec
from spectrostream_jax.models import codec as codec_lib


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp('model') / 'tiny'
  codec = Codec.random(codec_lib.tiny(), seed=5)
  export.export_model(codec, str(out), block_frames=[4])
  return str(out)


@pytest.fixture(scope='module')
def sps(model_dir, tmp_path_factory):
  """A 0.5 s bitstream to decode."""
  folder = tmp_path_factory.mktemp('sps')
  sf.write(folder / 'x.wav', _clip(0.5), 48_000)
  assert cli.main(['encode', '--model', model_dir, *_s(folder, 'x')]) == 0
  return folder / 'x.sps'


def _s(folder, stem):
  return [str(folder / f'{stem}.wav'), str(folder / f'{stem}.sps')]


def _clip(seconds, rate=48_000, channels=2, seed=0):
  rng = np.random.default_rng(seed)
  x = 0.1 * rng.standard_normal((round(seconds * rate), channels))
  return x.astype(np.float32)


def _run(capsys, *argv):
  """(exit status, stdout, stderr lines) of `spectrostream argv`."""
  try:
    rc = cli.main([str(a) for a in argv])
  except SystemExit as e:
    rc = e.code
  out, err = capsys.readouterr()
  assert 'Traceback' not in err
  return rc, out, err.splitlines()


def _tree(tmp_path, names, seconds=0.3):
  music = tmp_path / 'music'
  music.mkdir()
  for name in names:
    if name.endswith('.txt'):
      (music / name).write_text('not audio\n')
    else:
      sf.write(music / name, _clip(seconds), 48_000)
  return music


# Item 3: folders.


def test_folder_encodes_audio_only_and_counts_the_rest(
  model_dir, tmp_path, capsys
):
  music = _tree(tmp_path, ['a.wav', 'b.flac', 'notes.txt'])
  out = tmp_path / 'out'
  rc, _, err = _run(capsys, 'encode', '--model', model_dir, music, f'{out}/')
  assert rc == 0, err
  assert sorted(p.name for p in out.iterdir()) == ['a.sps', 'b.sps']
  assert err == ['encode 1.2 kbps: 2 encoded, 1 ignored (not audio)']


def test_folder_again_skips_existing_outputs(model_dir, tmp_path, capsys):
  music = _tree(tmp_path, ['a.wav', 'b.wav', 'c.flac'])
  out = tmp_path / 'out'
  argv = ['encode', '--model', model_dir, music, out]
  assert _run(capsys, *argv)[0] == 0
  before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
  rc, _, err = _run(capsys, *argv)
  assert rc == 0, err
  assert err == [
    'encode 1.2 kbps: 0 encoded, 3 skipped (output exists; --overwrite)'
  ]
  assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
  rc, _, err = _run(capsys, *argv, '--overwrite')
  assert rc == 0 and err == ['encode 1.2 kbps: 3 encoded']


def test_folder_collision_is_reported_as_one(model_dir, tmp_path, capsys):
  music = _tree(tmp_path, ['a.wav', 'a.flac', 'b.wav'])
  out = tmp_path / 'out'
  rc, _, err = _run(capsys, 'encode', '--model', model_dir, music, out)
  assert rc == 1
  assert err[0].startswith('collision: ')
  assert 'a.flac and ' in err[0] and str(out / 'a.sps') in err[0]
  assert err[1] == 'encode 1.2 kbps: 1 encoded, 2 failed'
  assert sorted(p.name for p in out.iterdir()) == ['b.sps']


# Item 4: progress counts seconds of audio, block by block.


def test_progress_counts_seconds_of_audio(
  model_dir, tmp_path, capsys, monkeypatch
):
  monkeypatch.setenv('TTY_COMPATIBLE', '1')  # rich draws as on a terminal.
  monkeypatch.setenv('COLUMNS', '120')
  src, dst = _s(tmp_path, 'x')
  sf.write(src, _clip(3.0), 48_000)
  rc, _, err = _run(
    capsys, 'encode', '--model', model_dir, '--block-seconds', '1', src, dst
  )
  assert rc == 0
  # Drawn again after each 1 s block, not only when the file is done.
  text = '\n'.join(err)
  for shown in ('0.0/3.0 s', '1.0/3.0 s', '2.0/3.0 s', '3.0/3.0 s'):
    assert shown in text
  rc, _, err = _run(
    capsys, 'encode', '--model', model_dir, '-q', '--overwrite', src, dst
  )
  assert rc == 0 and err == []


# Item 6: decode output.


@pytest.mark.parametrize(
  'name,fmt,subtype',
  [('y.flac', 'FLAC', 'PCM_24'), ('y.ogg', 'OGG', 'VORBIS')],
)
def test_decode_format_follows_extension(
  model_dir, sps, tmp_path, capsys, name, fmt, subtype
):
  out = tmp_path / name
  rc, _, err = _run(capsys, 'decode', '--model', model_dir, sps, out)
  assert rc == 0, err
  info = sf.info(str(out))
  assert (info.format, info.subtype, info.frames) == (fmt, subtype, 24_000)


def test_decode_writes_what_a_folder_encode_reads():
  assert set(audio_formats.FORMATS) == cli.AUDIO_SUFFIXES


def test_decode_refuses_what_it_cannot_write(model_dir, sps, tmp_path, capsys):
  before = sps.read_bytes()
  nope = tmp_path / 'no-model'  # Checked before any model is looked for.
  for want, argv, words in (
    (2, ['--subtype', 'PCM_17', sps, tmp_path / 'y.wav'], '--subtype'),
    (1, ['--subtype', 'FLOAT', sps, tmp_path / 'y.flac'], 'FLAC cannot'),
    (1, [sps, tmp_path / 'y.xyz'], 'audio format'),
    (1, [sps, tmp_path / 'y'], 'audio format'),
    (1, ['--overwrite', sps, sps], 'is the input'),
  ):
    rc, _, err = _run(capsys, 'decode', '--model', nope, *argv)
    assert rc == want and len(err) == 1 and words in err[0], (argv, err)
    assert err[0].startswith('spectrostream')
  assert sps.read_bytes() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == []


# Item 7: conventions.


@pytest.mark.parametrize('command', [[], ['encode'], ['decode'], ['info']])
def test_version_on_every_command(capsys, command):
  rc, out, _ = _run(capsys, *command, '--version')
  assert rc == 0 and out.startswith('spectrostream (spectrostream_jax ')


def test_bad_flag_is_one_line_and_exit_2(model_dir, tmp_path, capsys):
  for argv in (
    ['encode', '--model', model_dir, '--bogus', 'x.wav', 'x.sps'],
    ['encode', '--model', model_dir, 'x.wav'],
    ['encode', '--model', model_dir, '--kbps', 'six', 'x.wav', 'x.sps'],
    ['encode', '-q', '-v', '--model', model_dir, 'x.wav', 'x.sps'],
    ['frobnicate'],
  ):
    rc, _, err = _run(capsys, *argv)
    assert rc == 2 and len(err) == 1, (argv, err)
    assert err[0].startswith('spectrostream') and ': error: ' in err[0]


def test_a_failed_file_is_one_line(model_dir, tmp_path, capsys):
  bad = tmp_path / 'bad.flac'
  bad.write_bytes(b'fLaC' + bytes(100))
  rc, _, err = _run(
    capsys, 'encode', '--model', model_dir, bad, tmp_path / 'x.sps'
  )
  assert rc == 1 and len(err) == 1
  assert err[0].startswith(f'spectrostream: error: cannot read audio {bad}')


def test_quiet_and_verbose(model_dir, tmp_path, capsys):
  music = _tree(tmp_path, ['a.wav', 'notes.txt'])
  argv = ['encode', '--model', model_dir, music]
  rc, _, err = _run(capsys, *argv, tmp_path / 'q', '-q')
  assert rc == 0 and err == []
  rc, _, err = _run(capsys, *argv, tmp_path / 'v', '-v')
  assert rc == 0
  assert err[0].startswith(f'model {model_dir}: ')
  assert f'ignored {music / "notes.txt"}: not audio' in err
  assert any(line.startswith(f'encoded {music / "a.wav"} -> ') for line in err)


def test_flags_are_spelled_with_dashes():
  parser = cli._parser()
  commands = parser._subparsers._group_actions[0].choices
  for sub in (parser, *commands.values()):
    for action in sub._actions:
      for flag in action.option_strings:
        assert '_' not in flag, (sub.prog, flag)


# Item 8: messages and checks before the model loads.


def test_kbps_outside_the_model_names_its_range(model_dir, tmp_path, capsys):
  src, dst = _s(tmp_path, 'x')
  sf.write(src, _clip(0.2), 48_000)
  for kbps in ('100', '0.5'):
    rc, _, err = _run(
      capsys, 'encode', '--model', model_dir, '--kbps', kbps, src, dst
    )
    assert rc == 1
    assert err == [
      f'spectrostream: error: --kbps {kbps}: this model codes 0.15 to '
      '1.2 kbps in steps of 0.15 (1 to 8 levels)'
    ]
  parser = cli._parser()
  encode = parser._subparsers._group_actions[0].choices['encode']
  assert "model's levels (0.25 kbps each for the production model" in ' '.join(
    encode.format_help().split()
  )


def test_values_checked_before_the_model_loads(tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)
  sf.write('x.wav', _clip(0.2), 48_000)
  for flag, value in (
    ('--kbps', '0'),
    ('--kbps', '-6'),
    ('--levels', '0'),
    ('--block-seconds', '0'),
    ('--block-seconds', 'nan'),
  ):
    rc, _, err = _run(
      capsys, 'encode', '--model', 'no-model', flag, value, 'x.wav', 'x.sps'
    )
    assert rc == 2 and len(err) == 1 and flag in err[0], (flag, err)
  rc, _, err = _run(capsys, 'encode', '--model', 'no-model', 'x.wav', 'x.flac')
  assert rc == 1 and 'bitstream' in err[0]
  assert os.listdir() == ['x.wav']


def test_dash_is_refused_not_a_file(model_dir, tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)
  sf.write('x.wav', _clip(0.2), 48_000)
  for argv in (['x.wav', '-'], ['-', 'x.sps']):
    rc, _, err = _run(capsys, 'encode', '--model', model_dir, *argv)
    assert rc == 2 and len(err) == 1 and 'standard' in err[0], err
  assert os.listdir() == ['x.wav']


def test_demo_out_follows_extension_and_refuses_bad_values(
  model_dir, tmp_path, capsys
):
  """Items 6 and 8 for `demo`: --out's format, '-', --seconds 0."""
  src = tmp_path / 'in.wav'
  sf.write(src, _clip(0.3), 48_000)
  out = tmp_path / 'live.flac'
  rc, report, err = _run(
    capsys, 'demo', '--model', model_dir, '--out', out, src
  )
  assert (rc, err) == (0, [])
  assert '"frames_dropped"' in report
  info = sf.info(str(out))
  assert (info.format, info.subtype) == ('FLAC', 'PCM_24')
  assert info.frames == round(0.3 * 48_000)
  for bad in (
    ['--out', '-'],
    ['--seconds', '0'],
    ['--out', str(tmp_path / 'x.xyz')],
    ['--out', str(src)],
  ):
    rc, _, err = _run(capsys, 'demo', '--model', 'no-model', *bad, src)
    assert rc in (1, 2) and len(err) == 1, (bad, err)
    assert 'no-model' not in err[0], (bad, err)  # Checked before loading.
  assert not (tmp_path / 'x.xyz').exists()
