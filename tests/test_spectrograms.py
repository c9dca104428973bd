"""The spectrogram comparison: what it draws and how it refuses bad input."""

from matplotlib import image as mpimg
import numpy as np
import pytest
import soundfile as sf

from spectrostream_jax import inference
from spectrostream_jax.evaluation import spectrograms

SR = 48_000


@pytest.fixture(scope='module')
def audio_file(tmp_path_factory):
  """1.5 s at 44.1 kHz: a 1 kHz tone on the left, silence on the right."""
  path = tmp_path_factory.mktemp('audio') / 'tone.wav'
  t = np.arange(int(1.5 * 44_100)) / 44_100
  tone = 0.3 * np.sin(2 * np.pi * 1000 * t)
  sf.write(path, np.stack([tone, 0 * tone], 1).astype(np.float32), 44_100)
  return str(path)


def test_log_mel_puts_a_tone_in_its_band_and_identical_channels_in_mid():
  t = np.arange(SR) / SR
  tone = 0.5 * np.sin(2 * np.pi * 1000 * t).astype(np.float32)
  mel = spectrograms.log_mel(np.stack([tone, tone], 1), SR)
  assert mel.shape[0] == 2 and mel.shape[2] == spectrograms.NUM_MELS
  from spectrostream_jax import signal

  fb = signal.mel_filterbank(spectrograms.NUM_MELS, spectrograms.WINDOW, SR)
  expected = int(np.argmax(fb[round(1000 * spectrograms.WINDOW / SR)]))
  peaks = np.argmax(mel[0], axis=1)
  assert abs(int(np.median(peaks)) - expected) <= 1
  # L = R: no side signal at all, the floor everywhere.
  assert mel[1].max() == pytest.approx(-140.0)
  assert mel[0].max() > -20.0


def test_read_excerpt_resamples_and_bounds(audio_file):
  x = spectrograms.read_excerpt(audio_file, 0.5, 0.5, SR)
  assert x.shape == (SR // 2, 2) and x.dtype == np.float32
  assert np.abs(x[:, 1]).max() == 0.0
  assert np.abs(x[:, 0]).max() == pytest.approx(0.3, abs=0.02)
  # Asking past the end returns what there is, not padding.
  assert spectrograms.read_excerpt(audio_file, 1.0, 5.0, SR).shape[0] == (
    SR // 2
  )
  with pytest.raises(ValueError, match='past its end'):
    spectrograms.read_excerpt(audio_file, 2.0, 1.0, SR)


def test_rows_are_aligned_and_labelled(tiny_model_dir, audio_file):
  codec = inference.Codec.load(tiny_model_dir)
  ref = spectrograms.read_excerpt(audio_file, 0.0, 1.0, SR)
  out = spectrograms.rows(codec, ref, [0.3, 1.2], [('opus', 8.0)])
  assert [r.label.split()[0] for r in out] == [
    'reference',
    'model',
    'model',
    'opus',
  ]
  assert out[1].label == 'model 0.3 kbps' and out[2].label == 'model 1.2 kbps'
  assert all(r.audio.shape == ref.shape for r in out)
  np.testing.assert_array_equal(
    out[2].audio, codec.reconstruct(ref[None], 8)[0]
  )


def test_main_writes_one_row_per_system(tiny_model_dir, audio_file, tmp_path):
  out = tmp_path / 'fig.png'
  rc = spectrograms.main(
    [
      '--model',
      tiny_model_dir,
      '--audio',
      audio_file,
      '--seconds',
      '1',
      '--kbps',
      '0.3,1.2',
      '--baseline',
      'opus:8',
      '--baseline',
      'mp3:16',
      '--out',
      str(out),
    ]
  )
  assert rc == 0
  pixels = mpimg.imread(out)
  # 5 rows of 1.9 in at 100 dpi, plus 0.6 in.
  assert pixels.shape[0] == round(100 * (1.9 * 5 + 0.6))
  assert pixels.shape[1] == 1200


@pytest.mark.parametrize(
  'extra, rc, message',
  [
    (['--start', '9'], 1, 'past its end'),
    (['--kbps', '3'], 1, 'not a whole number of levels'),
    (['--baseline', 'vorbis:8'], 2, 'CODEC:KBPS'),
    (['--seconds', '-1'], 2, 'must be a number > 0'),
  ],
)
def test_bad_requests_give_one_line(
  tiny_model_dir, audio_file, tmp_path, capsys, extra, rc, message
):
  argv = ['--model', tiny_model_dir, '--audio', audio_file]
  argv += ['--out', str(tmp_path / 'x.png'), *extra]
  if rc == 2:
    with pytest.raises(SystemExit) as e:
      spectrograms.main(argv)
    code = e.value.code
  else:
    code = spectrograms.main(argv)
  err = capsys.readouterr().err
  assert code == rc
  assert message in err and err.count('\n') == 1
  assert not (tmp_path / 'x.png').exists()
