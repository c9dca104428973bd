"""The public `Codec` API: shapes, dtypes, loading and input validation."""

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import soundfile as sf
import soxr

from spectrostream_jax import Codec
from spectrostream_jax import signal
from spectrostream_jax import weights
from spectrostream_jax.models import codec as codec_lib


@pytest.fixture(scope='module')
def codec():
  return Codec.random(codec_lib.tiny(), seed=0)


def clip(b=1, t=1920 * 4 + 100, c=2, seed=0):
  x = np.random.default_rng(seed).uniform(-0.5, 0.5, (b, t, c))
  return x.astype(np.float32)


def test_shapes_and_dtypes(codec):
  x = clip(b=2)
  emb = codec.embed(x)
  assert emb.shape == (2, 5, 16) and emb.dtype == np.float32
  codes = codec.encode(x, num_levels=3)
  assert codes.shape == (2, 5, 3) and codes.dtype == np.int32
  out = codec.decode(codes)
  assert out.shape == (2, 4 * 1920, 2) and out.dtype == np.float32
  assert isinstance(out, np.ndarray)
  # Full-depth default and JAX input give the same codes as numpy input.
  assert codec.encode(x).shape[-1] == codec.num_levels
  np.testing.assert_array_equal(codec.encode(jnp.asarray(x), 3), codes)
  # Encoding is a pure function of the input: prefix levels are stable.
  np.testing.assert_array_equal(codec.encode(x, 5)[..., :3], codes)


def test_decode_uses_the_given_levels(codec):
  codes = codec.encode(clip(), num_levels=8)
  a, b = codec.decode(codes[..., :2]), codec.decode(codes)
  assert not np.allclose(a, b)


def test_mono_input_is_duplicated(codec):
  x = clip(c=1)
  np.testing.assert_array_equal(
    codec.encode(x), codec.encode(np.repeat(x, 2, axis=-1))
  )


def test_kbps_helpers():
  c = Codec.__new__(Codec)
  c.config = codec_lib.production()
  assert c.kbps_to_levels(16) == 64 and c.kbps_to_levels(4) == 16
  assert c.levels_to_kbps(24) == 6.0
  with pytest.raises(ValueError):
    c.kbps_to_levels(17)


@pytest.mark.parametrize(
  'bad,match',
  [
    (np.zeros((4800, 2), np.float32), 'batch, samples, channels'),
    (np.zeros((1, 4800, 2), np.int16), 'float32'),
    (np.zeros((1, 4800, 3), np.float32), '1 or 2 channels'),
    (np.zeros((1, 0, 2), np.float32), 'empty'),
    (np.full((1, 4800, 2), np.nan, np.float32), 'NaN'),
    (np.full((1, 4800, 2), np.inf, np.float32), 'NaN or Inf'),
    ('not audio', 'batch, samples, channels'),
  ],
)
def test_bad_wav(codec, bad, match):
  with pytest.raises(ValueError, match=match):
    codec.encode(bad)
  with pytest.raises(ValueError, match=match):
    codec.embed(bad)


@pytest.mark.parametrize(
  'bad,match',
  [
    (np.zeros((2, 3), np.int32), 'batch, frames, levels'),
    (np.zeros((1, 3, 2), np.float32), 'integers'),
    (np.full((1, 3, 2), 64, np.int32), r'\[0, 64\)'),
    (np.full((1, 3, 2), -1, np.int32), r'\[0, 64\)'),
    (np.zeros((1, 3, 9), np.int32), 'num_levels'),
    (np.zeros((1, 0, 2), np.int32), 'empty'),
  ],
)
def test_bad_codes(codec, bad, match):
  with pytest.raises(ValueError, match=match):
    codec.decode(bad)


@pytest.mark.parametrize('levels', [0, 9, 2.5, '3'])
def test_bad_num_levels(codec, levels):
  with pytest.raises(ValueError, match='num_levels'):
    codec.encode(clip(), num_levels=levels)


def test_save_and_load_official_layout(codec, tmp_path):
  enc, snd = sorted(weights.save_official(codec.params, str(tmp_path)))
  assert enc.endswith('encoder.safetensors')
  keys = safetensors.numpy.load_file(snd).keys()
  assert 'params/soundstream/quantizer/embedding' in keys
  loaded = Codec.from_safetensors(enc, snd, codec.config)
  x = clip()
  np.testing.assert_array_equal(loaded.encode(x), codec.encode(x))


def test_loader_errors(codec, tmp_path):
  enc, snd = sorted(weights.save_official(codec.params, str(tmp_path)))
  with pytest.raises(ValueError, match='no such weights file'):
    Codec.from_safetensors(str(tmp_path / 'nope'), snd, codec.config)
  junk = tmp_path / 'junk.safetensors'
  junk.write_bytes(b'this is not a safetensors file')
  with pytest.raises(ValueError, match='not a readable safetensors'):
    Codec.from_safetensors(enc, str(junk), codec.config)
  with pytest.raises(ValueError, match='wrong preset'):
    Codec.from_safetensors(enc, snd, codec_lib.production())
  tensors = safetensors.numpy.load_file(enc)
  tensors.pop('params/encoder/base_conv_first/conv/bias')
  partial = tmp_path / 'partial.safetensors'
  safetensors.numpy.save_file(tensors, str(partial))
  with pytest.raises(ValueError, match='lacks params/encoder/base_conv_first'):
    Codec.from_safetensors(str(partial), snd, codec.config)


# Reconstruct ---------------------------------------------------------------


@pytest.mark.parametrize('t,c', [(1, 2), (1920, 2), (4 * 1920 + 100, 1)])
def test_reconstruct_keeps_the_length(codec, t, c):
  x = clip(b=2, t=t, c=c)
  out = codec.reconstruct(x, num_levels=4)
  assert out.shape == (2, t, 2) and out.dtype == np.float32


def test_reconstruct_is_aligned_with_decode(codec):
  x = clip(t=4 * 1920)
  # Without padding, decode covers all but the look-ahead frame.
  plain = codec.decode(codec.encode(x))
  np.testing.assert_allclose(
    codec.reconstruct(x)[:, : plain.shape[1]], plain, atol=1e-5
  )


def test_reconstruct_levels_equals_encode_and_reconstruct():
  """Clips of two lengths in one bucket: the codes and every level's
  reconstruction are the per-length programs' results, from one encode and
  one decode program."""
  codec = Codec.random(codec_lib.tiny(), seed=1)
  levels = [1, codec.num_levels]
  for t in (1920 * 5 + 7, 1920 * 12 + 1000):
    x = clip(t=t, seed=t)
    codes, out = codec.reconstruct_levels(x, levels)
    # The codes `reconstruct` decodes: of the clip padded to whole frames.
    whole = np.pad(x, ((0, 0), (0, -t % 1920), (0, 0)))
    np.testing.assert_array_equal(codes, codec.encode(whole, codec.num_levels))
    assert sorted(out) == levels
    for n in levels:
      assert out[n].shape == (1, t, 2)
      np.testing.assert_allclose(
        out[n], codec.reconstruct(x, n), rtol=1e-5, atol=1e-6
      )
  # 5 + 1 to 13 + 1 frames all pad to 16: one program each.
  assert codec._encode._cache_size() > 1  # the per-length reference calls
  assert codec._decode_prefix._cache_size() == 1


@pytest.mark.parametrize(
  'frames,bucket', [(1, 16), (16, 16), (17, 24), (25, 32), (33, 48), (751, 768)]
)
def test_length_buckets(frames, bucket):
  assert signal.bucket(frames) == bucket


# Sample rates, dtypes and files ----------------------------------------------


def test_float64_is_cast_to_float32(codec):
  x = clip()
  np.testing.assert_array_equal(
    codec.encode(x.astype(np.float64), 4), codec.encode(x, 4)
  )
  np.testing.assert_array_equal(
    codec.embed(x.astype(np.float64)), codec.embed(x)
  )


def test_encode_resamples_from_the_given_rate(codec):
  x44 = soxr.resample(clip()[0], 48000, 44100)[None]
  at48 = soxr.resample(x44[0], 44100, 48000)[None]
  codes = codec.encode(x44, 4, sample_rate=44100)
  # The same codes as resampling first with soxr (what the CLI does).
  np.testing.assert_array_equal(codes, codec.encode(at48, 4))
  assert codes.shape == (1, -(-at48.shape[1] // 1920), 4)
  # Without sample_rate the array is taken as 48 kHz: other codes.
  assert codec.encode(x44, 4).shape != codes.shape or not np.array_equal(
    codec.encode(x44, 4), codes
  )
  np.testing.assert_array_equal(
    codec.encode(at48, 4, sample_rate=48000), codec.encode(at48, 4)
  )


def test_decode_and_reconstruct_at_a_sample_rate(codec):
  x = clip(t=8 * 1920)
  codes = codec.encode(x, 4)
  at48 = codec.decode(codes)
  at24 = codec.decode(codes, sample_rate=24000)
  assert at24.shape == (1, at48.shape[1] // 2, 2) and at24.dtype == np.float32
  np.testing.assert_allclose(
    at24, soxr.resample(at48[0], 48000, 24000)[None], atol=1e-6
  )
  x22 = soxr.resample(x[0], 48000, 22050)[None]
  out = codec.reconstruct(x22, 4, sample_rate=22050)
  assert out.shape == x22.shape and out.dtype == np.float32


@pytest.mark.parametrize('rate', [0, -1, 44100.0, True])
def test_bad_sample_rate(codec, rate):
  with pytest.raises(ValueError, match='sample_rate must be a positive int'):
    codec.encode(clip(), 4, sample_rate=rate)


def test_encode_file_and_decode_to_file(codec, tmp_path):
  song = tmp_path / 'song.flac'
  x44 = soxr.resample(clip()[0], 48000, 44100)
  sf.write(song, x44, 44100, subtype='PCM_24')
  codes = codec.encode_file(song, 4)
  read = sf.read(song, dtype='float32', always_2d=True)[0]
  np.testing.assert_array_equal(
    codes, codec.encode(read[None], 4, sample_rate=44100)
  )
  out = tmp_path / 'out.wav'
  codec.decode_to_file(codes, out)
  info = sf.info(out)
  assert (info.samplerate, info.channels, info.subtype) == (48000, 2, 'FLOAT')
  np.testing.assert_array_equal(
    sf.read(out, dtype='float32')[0], codec.decode(codes)[0]
  )
  # [N, n] codes, another rate, a format chosen by the extension.
  codec.decode_to_file(codes[0], tmp_path / 'out.flac', sample_rate=44100)
  info = sf.info(tmp_path / 'out.flac')
  assert (info.format, info.samplerate) == ('FLAC', 44100)
  assert sorted(p.name for p in tmp_path.iterdir()) == [
    'out.flac',
    'out.wav',
    'song.flac',
  ]


def test_file_errors_leave_nothing(codec, tmp_path):
  codes = codec.encode(clip(), 4)
  with pytest.raises(ValueError, match='from the extension .xyz'):
    codec.decode_to_file(codes, tmp_path / 'out.xyz')
  with pytest.raises(ValueError, match='one item; codes have batch 2'):
    codec.decode_to_file(np.concatenate([codes, codes]), tmp_path / 'o.wav')
  with pytest.raises(ValueError, match='FLAC cannot hold subtype FLOAT'):
    codec.decode_to_file(codes, tmp_path / 'o.flac', subtype='FLOAT')
  with pytest.raises(ValueError, match='cannot read'):
    codec.encode_file(tmp_path / 'missing.wav')
  assert not list(tmp_path.iterdir())
  # A failed write leaves an older file as it was.
  old = tmp_path / 'old.wav'
  old.write_bytes(b'previous')
  with pytest.raises(ValueError):
    codec.decode_to_file(codes, old, subtype='VORBIS')
  assert old.read_bytes() == b'previous'
  assert [p.name for p in tmp_path.iterdir()] == ['old.wav']
