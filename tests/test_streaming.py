"""Streaming encode/decode equals the whole-sequence path."""

import dataclasses

import jax
import numpy as np
import pytest

from spectrostream_jax import streaming
from spectrostream_jax.inference import Codec
from spectrostream_jax.models import codec as codec_lib
from spectrostream_jax.models import layers


@pytest.fixture(scope='module')
def tiny():
  return Codec.random(codec_lib.tiny(), seed=3)


def _music(samples: int, channels: int = 2, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  t = np.arange(samples) / 48_000
  tones = sum(
    np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f in (110, 440, 1375)
  )
  noise = rng.standard_normal((samples, channels))
  wav = 0.2 * tones[:, None] + 0.05 * noise
  return wav[None].astype(np.float32)


def _push_in_chunks(stream, wav, rng, max_chunk):
  outs, pos = [], 0
  while pos < wav.shape[1]:
    n = int(rng.integers(1, max_chunk))
    outs.append(stream.push(wav[:, pos : pos + n]))
    pos += n
  return outs


@pytest.mark.parametrize('samples', [1920 * 6, 1920 * 7 + 481, 700])
@pytest.mark.parametrize('frames_per_step', [1, 3])
def test_encoder_equals_whole_sequence_for_any_chunking(
  tiny, samples, frames_per_step
):
  wav = _music(samples, seed=samples)
  want_codes = tiny.encode(wav)
  want_emb = tiny.embed(wav)
  rng = np.random.default_rng(samples + frames_per_step)
  enc = streaming.StreamingEncoder(tiny, frames_per_step=frames_per_step)
  outs = _push_in_chunks(enc, wav, rng, 3000)
  outs.append(enc.flush())
  codes = np.concatenate(outs, axis=1)
  np.testing.assert_array_equal(codes, want_codes)
  emb_stream = streaming.StreamingEncoder(
    tiny, quantize=False, frames_per_step=frames_per_step
  )
  outs = _push_in_chunks(emb_stream, wav, rng, 5000)
  emb = np.concatenate(outs + [emb_stream.flush()], axis=1)
  assert emb.shape == want_emb.shape
  np.testing.assert_allclose(emb, want_emb, atol=1e-5)


def test_encoder_emits_frame_once_its_samples_are_in(tiny):
  """Frame m appears once sample 1920·m + 2399 has been pushed."""
  wav = _music(1920 * 4)
  enc = streaming.StreamingEncoder(tiny)
  assert enc.push(wav[:, :2399]).shape[1] == 0
  assert enc.push(wav[:, 2399:2400]).shape[1] == 1
  assert enc.push(wav[:, 2400 : 1920 + 2399]).shape[1] == 0
  assert enc.push(wav[:, 1920 + 2399 :]).shape[1] == 2
  assert enc.flush().shape[1] == 1
  assert (enc.latency_frames, enc.latency_ms) == (1, 50.0)


def test_mono_input_and_reset(tiny):
  wav = _music(1920 * 3 + 100, channels=1)
  want = tiny.encode(wav, num_levels=4)
  enc = streaming.StreamingEncoder(tiny, 4)
  for _ in range(2):  # flush() resets, so a second stream starts clean.
    got = np.concatenate([enc.push(wav), enc.flush()], axis=1)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('lookahead', [0, 1, 2])
@pytest.mark.parametrize('frames_per_step', [1, 4])
def test_decoder_equals_whole_sequence_for_any_chunking(
  lookahead, frames_per_step
):
  cfg = dataclasses.replace(codec_lib.tiny(), lookahead=lookahead)
  codec = Codec.random(cfg, seed=lookahead)
  rng = np.random.default_rng(lookahead)
  codes = rng.integers(0, 64, (1, 9, 5)).astype(np.int32)
  want = codec.decode(codes)
  assert want.shape == (1, (9 - lookahead) * 1920, 2)
  dec = streaming.StreamingDecoder(codec, frames_per_step=frames_per_step)
  outs = _push_in_chunks(dec, codes, rng, 4)
  got = np.concatenate(outs + [dec.flush()], axis=1)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert dec.latency_frames == lookahead
  assert dec.latency_ms == 40.0 * lookahead


def test_functional_steps_with_explicit_state(tiny):
  """The pure steps, driven by hand, give the wrappers' results."""
  cfg = tiny.config
  weights = streaming.prepare_weights(cfg, tiny.params)
  wav = _music(1920 * 5)
  state = streaming.init_encoder_state(cfg, weights)
  leaves = jax.tree.leaves(state)
  assert leaves and all(not np.any(x) for x in leaves)
  codes = []
  for k in range(4):  # Frame k needs samples [1920k, 1920k + 2400).
    window = wav[:, 1920 * k : 1920 * k + 2400]
    state, _, c = streaming.encode_step(cfg, weights, state, window, 8)
    codes.append(np.asarray(c))
  np.testing.assert_array_equal(
    np.concatenate(codes, axis=1), tiny.encode(wav)[:, :4]
  )
  dstate = streaming.init_decoder_state(cfg, weights)
  full = tiny.encode(wav)
  audio = []
  for k in range(5):
    dstate, a = streaming.decode_step(cfg, weights, dstate, full[:, k : k + 1])
    audio.append(np.asarray(a))
  assert int(dstate['frames']) == 20
  # Block 0 is the look-ahead (zeros); blocks 1.. are output blocks 0...
  np.testing.assert_array_equal(audio[0], 0.0)
  got = np.concatenate(audio[1:], axis=1)
  np.testing.assert_allclose(got, tiny.decode(full), atol=1e-6)


def test_bad_input_is_a_value_error(tiny):
  enc = streaming.StreamingEncoder(tiny)
  with pytest.raises(ValueError, match='float32'):
    enc.push(np.zeros((1, 10, 2)))
  with pytest.raises(ValueError, match='NaN'):
    enc.push(np.full((1, 10, 2), np.nan, np.float32))
  enc.push(np.zeros((1, 10, 2), np.float32))
  with pytest.raises(ValueError, match='channel count changed'):
    enc.push(np.zeros((1, 10, 1), np.float32))
  with pytest.raises(ValueError, match='num_levels'):
    streaming.StreamingEncoder(tiny, 9)
  dec = streaming.StreamingDecoder(tiny)
  with pytest.raises(ValueError, match=r'\[0, 64\)'):
    dec.push(np.full((1, 2, 3), 64))
  with pytest.raises(ValueError, match='integers'):
    dec.push(np.zeros((1, 2, 3), np.float32))
  with pytest.raises(ValueError, match=r'float32 \[1, N, 16\]'):
    dec.push_embeddings(np.zeros((2, 2, 16), np.float32))


def test_streams_share_the_codecs_prepared_weights(tiny):
  """Prepared once per codec (the CLI opens a stream per file), not per
  stream, and owned by the codec: a new codec gets its own."""
  enc = streaming.StreamingEncoder(tiny)
  dec = streaming.StreamingDecoder(tiny, frames_per_step=2)
  assert enc._weights is dec._weights is tiny.streaming_weights
  other = Codec(tiny.params, tiny.config)
  assert other.streaming_weights is not tiny.streaming_weights


def test_matches_official_step_mode(parity_weights, shared_dir):
  """Against Google's own step-mode outputs (vectors/mrt_parity_A)."""
  v = np.load(shared_dir / 'vectors' / 'mrt_parity_A' / 'vectors.npz')
  v = {k.removeprefix('L96000_'): v[k] for k in v.files}
  codec = Codec.from_safetensors(
    str(parity_weights / 'encoder.safetensors'),
    str(parity_weights / 'soundstream.safetensors'),
  )
  wav = v['wave_in']
  # Google's step k consumes block k and emits frame k - 1.
  enc = streaming.StreamingEncoder(codec, 64)
  codes = np.concatenate(
    [enc.push(wav[:, 1920 * k : 1920 * (k + 1)]) for k in range(50)]
    + [enc.flush()],
    axis=1,
  )
  np.testing.assert_array_equal(codes, v['stream_codes'][:, 1:51])
  emb_enc = streaming.StreamingEncoder(codec, quantize=False)
  emb = np.concatenate([emb_enc.push(wav), emb_enc.flush()], axis=1)
  err = np.abs(emb - v['stream_emb'][:, 1:51]).max()
  print(f'stream emb max|err| {err:.2e}')
  assert err <= 1e-4
  # Decoder step k consumes frame k and emits block k - 1.
  ref = slice(1920, 1920 + 94080)
  dec = streaming.StreamingDecoder(codec)
  wav64 = np.concatenate(
    [dec.push(v['codes'][:, k : k + 1]) for k in range(50)], axis=1
  )
  err64 = np.abs(wav64 - v['stream_wav64'][:, ref]).max()
  dec = streaming.StreamingDecoder(codec, frames_per_step=7)
  unq = np.concatenate([dec.push_embeddings(v['emb']), dec.flush()], axis=1)
  err_unq = np.abs(unq - v['stream_wav_unq'][:, ref]).max()
  print(f'stream wav64 max|err| {err64:.2e}, wav_unq {err_unq:.2e}')
  assert err64 <= 2e-5 and err_unq <= 2e-5
  assert (enc.latency_ms, dec.latency_ms) == (50.0, 40.0)


def test_output_slices_change_no_code_and_no_sample(monkeypatch):
  """`prepare_weights` cuts big kernels into output-channel slices (the
  production decoder's biggest); here every tiny kernel is cut."""
  monkeypatch.setattr(layers, 'OUTPUT_SLICING', ((0, 4),))
  jax.clear_caches()  # prepare_weights was traced with the default rule.
  try:
    codec = Codec.random(codec_lib.tiny(), seed=5)
    weights = codec.streaming_weights
    for net in ('prepared_encoder', 'prepared_decoder'):
      paths = [
        jax.tree_util.keystr(p)
        for p, _ in jax.tree_util.tree_leaves_with_path(weights[net])
      ]
      assert any('kernel_slices' in p for p in paths), net
    wav = _music(1920 * 5 + 300)
    enc = streaming.StreamingEncoder(codec)
    codes = np.concatenate([enc.push(wav), enc.flush()], axis=1)
    np.testing.assert_array_equal(codes, codec.encode(wav))
    dec = streaming.StreamingDecoder(codec)
    audio = np.concatenate([dec.push(codes), dec.flush()], axis=1)
    np.testing.assert_allclose(audio, codec.decode(codes), atol=1e-6)
  finally:
    jax.clear_caches()
