"""The `spectrostream` CLI: round trips, block-size independence, bad input."""

import json

import numpy as np
import pytest
import soundfile as sf
import soxr

from spectrostream_jax import bitstream
from spectrostream_jax import channels
from spectrostream_jax import cli
from spectrostream_jax import export
from spectrostream_jax.inference import Codec
from spectrostream_jax.models import codec as codec_lib


@pytest.fixture(scope='module')
def model(tmp_path_factory):
  codec = Codec.random(codec_lib.tiny(), seed=5)
  out = tmp_path_factory.mktemp('model') / 'tiny'
  export.export_model(codec, str(out), block_frames=[4])
  return str(out), codec


def _clip(seconds, rate, channels, seed=0):
  rng = np.random.default_rng(seed)
  t = np.arange(round(seconds * rate)) / rate
  x = 0.3 * np.sin(2 * np.pi * 440 * t)[:, None] * np.ones(channels)
  return (x + 0.02 * rng.standard_normal(x.shape)).astype(np.float32)


def _run(capsys, *argv):
  try:
    rc = cli.main([str(a) for a in argv])
  except SystemExit as e:  # argparse: usage errors exit 2.
    rc = e.code
  out, err = capsys.readouterr()
  assert 'Traceback' not in err
  return rc, out, err


def test_round_trip_restores_rate_channels_and_length(model, tmp_path, capsys):
  model_dir, codec = model
  for rate, num_channels in ((44_100, 2), (22_050, 1), (48_000, 2)):
    x = _clip(1.3, rate, num_channels, seed=rate)
    src = tmp_path / f'in_{rate}.flac'
    sf.write(src, x, rate, subtype='PCM_24')
    sps, wav = tmp_path / f'{rate}.sps', tmp_path / f'{rate}.wav'
    assert _run(capsys, 'encode', '--model', model_dir, src, sps)[0] == 0
    assert _run(capsys, 'decode', '--model', model_dir, sps, wav)[0] == 0
    y, y_rate = sf.read(wav, dtype='float32', always_2d=True)
    assert (y_rate, y.shape) == (rate, x.shape)
    # The file holds the codec's own codes of the 48 kHz signal.
    header, codes = bitstream.read(sps, bytes.fromhex(codec.model_id))
    x48 = sf.read(src, dtype='float32', always_2d=True)[0]
    if rate != 48_000:
      x48 = soxr.resample(x48, rate, 48_000)
    x48 = np.repeat(x48, 2 // num_channels, axis=1)
    padded = np.pad(x48, ((0, 1920), (0, 0)))[None]
    want = codec.encode(padded)[0]
    assert header.levels == 8 and header.original_length == x.shape[0]
    np.testing.assert_array_equal(codes, want)
    if rate == 48_000:
      np.testing.assert_allclose(
        y, codec.decode(want[None])[0, : x.shape[0]], atol=1e-5
      )


def test_surround_takes_the_training_downmix(model, tmp_path, capsys):
  """5.1 (L R C LFE Ls Rs) is coded as the downmix training uses."""
  model_dir, codec = model
  x = np.zeros((48_000, 6), np.float32)
  x[:, 0] = _clip(1.0, 48_000, 1, seed=1)[:, 0]  # Front left only.
  x[:, 3] = _clip(1.0, 48_000, 1, seed=2)[:, 0]  # LFE: dropped.
  src, sps, wav = tmp_path / 'in.wav', tmp_path / 'x.sps', tmp_path / 'y.wav'
  sf.write(src, x, 48_000, subtype='FLOAT')
  assert _run(capsys, 'encode', '--model', model_dir, src, sps)[0] == 0
  assert _run(capsys, 'decode', '--model', model_dir, sps, wav)[0] == 0
  header, codes = bitstream.read(sps, bytes.fromhex(codec.model_id))
  assert header.original_channels == 6
  stereo = channels.to_channels(x, 2)
  # All of it left, none right: not the old mono average of six channels.
  np.testing.assert_allclose(stereo[:, 0], x[:, 0] / (1 + np.sqrt(2)))
  assert not stereo[:, 1].any()
  want = codec.encode(np.pad(stereo, ((0, 1920), (0, 0)))[None])[0]
  np.testing.assert_array_equal(codes, want)
  mono = np.repeat(x.mean(axis=1, keepdims=True), 2, axis=1)
  assert np.any(
    codec.encode(np.pad(mono, ((0, 1920), (0, 0)))[None])[0] != want
  )
  y, rate = sf.read(wav, dtype='float32', always_2d=True)
  assert (rate, y.shape) == (48_000, (48_000, 2))
  np.testing.assert_allclose(
    y, codec.decode(want[None])[0, : x.shape[0]], atol=1e-5
  )


def test_codes_do_not_depend_on_block_size(model, tmp_path, capsys):
  model_dir, _ = model
  src = tmp_path / 'song.wav'
  sf.write(src, _clip(4.1, 44_100, 2, seed=1), 44_100)
  files = []
  for seconds in (0.12, 1.0, 30.0):
    out = tmp_path / f'song_{seconds}.sps'
    rc, _, _ = _run(
      capsys, 'encode', '--model', model_dir, '--kbps', '0.6',
      '--block-seconds', seconds, src, out,
    )  # fmt: skip
    assert rc == 0
    files.append(out.read_bytes())
  assert files[0] == files[1] == files[2]
  header = bitstream.read_header(tmp_path / 'song_1.0.sps')
  assert header.levels == 4


def test_directories_recursively(model, tmp_path, capsys):
  model_dir, _ = model
  tree = tmp_path / 'music'
  (tree / 'a' / 'b').mkdir(parents=True)
  sf.write(tree / 'one.wav', _clip(0.5, 48_000, 2), 48_000)
  sf.write(tree / 'a' / 'b' / 'two.flac', _clip(0.3, 32_000, 1), 32_000)
  rc, _, err = _run(
    capsys, 'encode', '--model', model_dir, tree, tmp_path / 'c'
  )
  assert rc == 0, err
  assert sorted(
    str(p.relative_to(tmp_path / 'c')) for p in (tmp_path / 'c').rglob('*')
  ) == ['a', 'a/b', 'a/b/two.sps', 'one.sps']
  rc, _, err = _run(
    capsys, 'decode', '--model', model_dir, tmp_path / 'c', tmp_path / 'd'
  )
  assert rc == 0, err
  two = sf.info(str(tmp_path / 'd' / 'a' / 'b' / 'two.wav'))
  assert (two.samplerate, two.channels, two.frames) == (32_000, 1, 9600)
  # Existing outputs are kept (and skipped) unless --overwrite.
  rc, _, err = _run(
    capsys, 'encode', '--model', model_dir, tree, tmp_path / 'c'
  )
  assert rc == 0 and '2 skipped' in err


def test_info(model, tmp_path, capsys):
  model_dir, codec = model
  src = tmp_path / 'x.wav'
  sf.write(src, _clip(2.0, 48_000, 2), 48_000)
  sps = tmp_path / 'x.sps'
  _run(capsys, 'encode', '--model', model_dir, '--levels', '3', src, sps)
  rc, out, _ = _run(capsys, 'info', sps)
  info = json.loads(out)
  assert rc == 0
  assert info['frames'] == 51 and info['levels'] == 3
  assert info['model_id'] == codec.model_id
  assert info['original_duration_seconds'] == 2.0


def _assert_clean_failure(rc, err, dst):
  assert rc == 1
  lines = [line for line in err.splitlines() if line.strip()]
  assert lines, 'no message'
  assert not dst.exists()
  assert not list(dst.parent.glob(f'.{dst.name}-tmp-*'))


def test_corrupt_inputs_fail_cleanly(model, tmp_path, capsys):
  model_dir, _ = model
  src = tmp_path / 'x.wav'
  sf.write(src, _clip(1.0, 48_000, 2), 48_000)
  sps = tmp_path / 'x.sps'
  assert _run(capsys, 'encode', '--model', model_dir, src, sps)[0] == 0
  good = sps.read_bytes()
  rng = np.random.default_rng(0)
  out = tmp_path / 'out.wav'
  cases = {}
  for i, pos in enumerate(rng.integers(0, len(good), 25)):
    bad = bytearray(good)
    bad[pos] ^= 1 << int(rng.integers(0, 8))
    cases[f'flip{i}'] = bytes(bad)
  for n in (0, 5, 79, 80, len(good) // 2, len(good) - 1):
    cases[f'cut{n}'] = good[:n]
  cases['wav'] = src.read_bytes()
  cases['text'] = b'hello world\n' * 20
  for name, data in cases.items():
    bad = tmp_path / f'{name}.sps'
    bad.write_bytes(data)
    rc, _, err = _run(capsys, 'decode', '--model', model_dir, bad, out)
    _assert_clean_failure(rc, err, out)
  rc, _, err = _run(capsys, 'info', tmp_path / 'cut79.sps')
  assert rc == 1 and err.startswith('spectrostream: error:')


def test_wrong_model_and_user_mistakes(model, tmp_path, capsys):
  model_dir, _ = model
  other = tmp_path / 'other'
  export.export_model(
    Codec.random(codec_lib.tiny(), seed=6), str(other), block_frames=[4]
  )
  src = tmp_path / 'x.wav'
  sf.write(src, _clip(0.5, 48_000, 2), 48_000)
  sps = tmp_path / 'x.sps'
  assert _run(capsys, 'encode', '--model', model_dir, src, sps)[0] == 0
  out = tmp_path / 'y.wav'
  rc, _, err = _run(capsys, 'decode', '--model', other, sps, out)
  _assert_clean_failure(rc, err, out)
  assert 'another model' in err
  bad_audio = tmp_path / 'bad.flac'
  bad_audio.write_bytes(b'fLaC' + bytes(100))
  z = tmp_path / 'z'
  for want, argv in (
    (1, ['--model', model_dir, '--kbps', '0.5', src, z]),
    (1, ['--model', model_dir, '--levels', '99', src, z]),
    (1, ['--model', tmp_path / 'nope', src, z]),
    (1, ['--model', model_dir, tmp_path / 'missing.wav', z]),
    (1, ['--model', model_dir, bad_audio, z]),
    (2, ['--model', model_dir, '--block-seconds', '0', src, z]),
  ):
    rc, _, err = _run(capsys, 'encode', *argv)
    assert rc == want, argv
    assert len(err.splitlines()) == 1, err
    assert not z.exists()


def test_demo_reports_frame_times(model, tmp_path, capsys):
  model_dir, _ = model
  src = tmp_path / 'x.wav'
  sf.write(src, _clip(1.0, 48_000, 2), 48_000)
  out = tmp_path / 'demo.wav'
  rc, stdout, _ = _run(
    capsys, 'demo', '--model', model_dir, '--seconds', '0.8', src,
    '--out', out,
  )  # fmt: skip
  report = json.loads(stdout)
  assert rc == 0
  assert report['frames'] == 21  # 20 frames of input + the look-ahead one.
  assert report['budget_ms'] == 40.0 and report['latency_ms'] == 120.0
  assert report['encode_ms_median'] > 0 and report['decode_ms_median'] > 0
  assert sf.info(str(out)).frames == 38_400


def test_length_estimated_by_the_decoder(model, tmp_path, capsys, monkeypatch):
  """Ogg Opus and MP3 headers may claim more samples than decode."""
  model_dir, _ = model
  src = tmp_path / 'x.wav'
  sf.write(src, _clip(0.7, 44_100, 2), 44_100)
  open_audio = cli._open_audio

  class Overstated:
    def __init__(self, path):
      self._f = open_audio(path)
      self.frames = self._f.frames + 10

    def __getattr__(self, name):
      return getattr(self._f, name)

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self._f.close()

  monkeypatch.setattr(cli, '_open_audio', Overstated)
  sps, wav = tmp_path / 'x.sps', tmp_path / 'y.wav'
  assert _run(capsys, 'encode', '--model', model_dir, src, sps)[0] == 0
  assert bitstream.read_header(sps).original_length == 30_870
  assert _run(capsys, 'decode', '--model', model_dir, sps, wav)[0] == 0
  assert sf.info(str(wav)).frames == 30_870
