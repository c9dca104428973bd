"""GAN and reconstruction losses, and the eval metrics, on known values."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gin
from spectrostream_jax import losses
from spectrostream_jax import signal
from spectrostream_jax.models import discriminator as disc
from spectrostream_jax.models import quantizer as rvq
from spectrostream_jax.training import train

SR = 48_000


def noise(shape, seed=0, scale=0.1):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)


def sine(num_samples, channels=2, freq=440.0):
  t = np.arange(num_samples) / SR
  wave = 0.5 * np.sin(2 * np.pi * freq * t)
  return jnp.asarray(
    np.tile(wave[None, :, None], (1, 1, channels)), jnp.float32
  )


def numpy_mel(wav, window, hop, num_mels=64):
  """Centred, reflect-padded |STFT| times Slaney mel filters: [B, C, T, M]."""
  x = np.moveaxis(np.asarray(wav, np.float64), 1, -1)
  pad = window // 2
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad)), mode='reflect')
  starts = range(0, x.shape[-1] - window + 1, hop)
  frames = np.stack([x[..., s : s + window] for s in starts], axis=-2)
  mag = np.abs(np.fft.rfft(frames * signal.hann_window(window), axis=-1))
  return mag @ signal.mel_filterbank(num_mels, window, SR)


def numpy_mel_loss(wav, rec, windows, eps=1e-5):
  total = 0.0
  for w in windows:
    s, s_hat = numpy_mel(wav, w, w // 4), numpy_mel(rec, w, w // 4)
    linear = np.mean(np.sum(np.abs(s - s_hat), axis=-1))
    log_diff = np.log(s + eps) - np.log(s_hat + eps)
    log = np.mean(np.sqrt(np.sum(log_diff**2, axis=-1)))
    total += linear + np.sqrt(w / 2) * log
  return total


def test_hinge_generator_hand_computed():
  fake = [jnp.array([[2.0, 0.5, -1.0]]), jnp.array([[0.0, 3.0]])]
  # relu(1 - x): [0, 0.5, 2] -> 5/6; [1, 0] -> 1/2; mean over scales.
  np.testing.assert_allclose(
    losses.hinge_generator_loss(fake), (5 / 6 + 1 / 2) / 2, rtol=1e-6
  )


def test_discriminator_loss_hand_computed():
  real = [(jnp.array([[2.0, 0.5, -1.0]]), []), (jnp.array([[1.5]]), [])]
  fake = [(jnp.array([[-2.0, 0.0, 1.0]]), []), (jnp.array([[-0.5]]), [])]
  loss, metrics = losses.discriminator_loss(real, fake)
  # real: relu(1 - x) -> 5/6 and 0; fake: relu(1 + x) -> 1 and 1/2.
  expected_real, expected_fake = (5 / 6 + 0) / 2, (1 + 0.5) / 2
  np.testing.assert_allclose(metrics['d/real'], expected_real, rtol=1e-6)
  np.testing.assert_allclose(metrics['d/fake'], expected_fake, rtol=1e-6)
  np.testing.assert_allclose(loss, expected_real + expected_fake, rtol=1e-6)
  assert metrics['d/loss'] == loss
  np.testing.assert_allclose(metrics['d/logits_real'], (0.5 + 1.5) / 2)
  np.testing.assert_allclose(metrics['d/logits_fake'], (-1 / 3 - 0.5) / 2)


def test_feature_matching_values():
  real = [[jnp.array([1.0, -1.0, 2.0, -2.0])], [jnp.array([[4.0, 4.0]])]]
  fake = [[real[0][0] + 0.5], [jnp.array([[3.0, 5.0]])]]
  # Per layer: mean |diff| = 0.5 and 1; mean |real| = 1.5 and 4.
  np.testing.assert_allclose(
    losses.feature_matching_loss(real, fake), (0.5 / 1.5 + 1 / 4) / 2
  )
  np.testing.assert_allclose(
    losses.feature_matching_loss(real, fake, normalize=False), (0.5 + 1) / 2
  )
  assert losses.feature_matching_loss(real, real) == 0.0
  grad_real = jax.grad(
    lambda r: losses.feature_matching_loss([[r]], [fake[0]])
  )(real[0][0])
  np.testing.assert_array_equal(grad_real, 0.0)


def test_mel_loss_matches_numpy_formula():
  wav, rec = noise((2, 1200, 2), seed=1), noise((2, 1200, 2), seed=2)
  ours = losses.multiscale_mel_loss(
    wav, rec, losses.MelConfig(SR, windows=(64, 256))
  )
  ref = numpy_mel_loss(wav, rec, (64, 256))
  np.testing.assert_allclose(ours, ref, rtol=1e-4)


def test_mel_loss_zero_for_identical_and_grows_with_noise():
  mel = jax.jit(losses.multiscale_mel_loss)
  wav = sine(4800) + noise((1, 4800, 2), seed=3, scale=0.01)
  assert mel(wav, wav) == 0.0
  values = [
    float(mel(wav, wav + noise(wav.shape, seed=4, scale=level)))
    for level in (1e-3, 1e-2, 1e-1)
  ]
  assert 0 < values[0] < values[1] < values[2]
  grad = jax.jit(jax.grad(losses.multiscale_mel_loss, argnums=1))
  assert np.all(np.isfinite(grad(wav, wav)))
  silent = jnp.zeros_like(wav)
  assert np.all(np.isfinite(grad(silent, silent)))


def test_log_mel_loss_is_a_mean_log_error_per_bin():
  wav = sine(4800) + noise((1, 4800, 2), seed=3, scale=0.01)
  assert float(losses.log_mel_loss(wav, wav)) == 0.0
  # A gain of g is |log10 g| in every bin well above the floor.
  np.testing.assert_allclose(
    losses.log_mel_loss(wav, 0.5 * wav, losses.MelConfig(windows=(256, 1024))),
    np.log10(2.0),
    rtol=0.02,
  )
  # Amplitude scale: a full-scale sine reads about 1 in its mel band.
  fb, scale = losses._amplitude_filterbank(64, 1024, SR)
  mag = signal.magnitude_spectrogram(sine(9600) * 2.0, 1024, 256)
  peak = float(jnp.max((mag * scale) @ jnp.asarray(fb)))
  assert 0.5 < peak < 1.5


def test_phase_terms_see_phase_and_not_the_level():
  x = sine(9600, freq=440.0) + noise((1, 9600, 2), seed=8, scale=0.05)
  late = jnp.roll(x, 37, axis=1)
  for loss in (
    lambda a, b: losses.phase_loss(a, b, (256, 1024)),
    losses.waveform_loss,
  ):
    assert float(loss(x, x)) == pytest.approx(0.0, abs=1e-5)
    assert float(loss(x, late)) > 0.1
  # A quieter or louder copy costs nothing in the waveform term and little
  # in the phase term (its phasor saturates at 0.1 of the reference bin's
  # magnitude: 12 dB down costs 0.067): levels are the mel's job.
  for gain in (0.25, 3.0):
    assert float(losses.waveform_loss(x, gain * x)) == pytest.approx(
      0.0, abs=1e-5
    )
  phase = functools.partial(losses.phase_loss, windows=(256, 1024))
  assert float(phase(x, 3.0 * x)) < 0.01
  assert 0.03 < float(phase(x, 0.25 * x)) < 0.1
  # Random phases cost about 1.26 of the level; a copy 60 dB down costs
  # about 1 in the phase term and 1 in the waveform term: there is no
  # going quiet to escape them (the mel term punishes that on its own).
  other = noise((1, 9600, 2), seed=9)
  value = float(losses.phase_loss(other, noise((1, 9600, 2), seed=10)))
  assert 1.15 < value < 1.4
  quiet = 1e-3 * noise((1, 9600, 2), seed=10)
  assert 0.9 < float(losses.phase_loss(other, quiet)) < 1.05
  assert float(losses.waveform_loss(other, jnp.zeros_like(other))) >= 1.0 - 1e-6
  # Bounded gradients at silence: each bin's at most 1 / softness times a
  # bin's share of the reference.
  grads = jax.grad(lambda r: losses.phase_loss(x, r, (256,)))(jnp.zeros_like(x))
  assert np.all(np.isfinite(grads))
  at_x = jax.grad(lambda r: losses.phase_loss(x, r, (256,)))(
    x + noise(x.shape, seed=11, scale=0.01)
  )
  assert float(jnp.linalg.norm(grads)) < 30 * float(jnp.linalg.norm(at_x))


def test_align_to_reconstruction():
  wav = noise((2, 5000, 2))
  rec = noise((2, 3840, 2), seed=1)
  np.testing.assert_array_equal(
    losses.align_to_reconstruction(wav, rec), wav[:, :3840]
  )
  with pytest.raises(ValueError, match='align'):
    losses.align_to_reconstruction(rec, wav)
  with pytest.raises(ValueError, match='align'):
    losses.align_to_reconstruction(wav, rec[..., :1])


def quantizer_output(commitment, codebook_loss):
  zeros = jnp.zeros((1,))
  return rvq.QuantizerOutput(
    decoder_input=zeros,
    codes=zeros,
    num_levels=zeros,
    bypassed=zeros,
    commitment=jnp.asarray(commitment),
    codebook_loss=jnp.asarray(codebook_loss),
    counts=zeros,
    sums=zeros,
    candidates=zeros,
  )


def test_generator_losses_weights_and_metrics():
  config = losses.LossConfig(
    mel=losses.MelConfig(windows=(64, 128)),
    phase_windows=(64, 128),
    phase_weight=2.0,
    wav_weight=3.0,
  )
  ref = noise((1, 1920, 2), seed=5)
  rec = noise((1, 1920, 2), seed=6)
  real = [(jnp.array([[0.0]]), [jnp.array([1.0, -1.0])])]
  fake = [(jnp.array([[-1.0]]), [jnp.array([2.0, -1.0])])]
  q = quantizer_output([0.5, 0.25], [1.0, 2.0])
  total, metrics = losses.generator_losses(config, ref, rec, real, fake, q)
  assert set(metrics) == {
    'g/adv',
    'g/feat',
    'g/mel',
    'g/phase',
    'g/wav',
    'vq/commit',
    'vq/codebook',
    'g/total',
  }
  np.testing.assert_allclose(metrics['g/adv'], 2.0)
  np.testing.assert_allclose(metrics['g/feat'], 0.5 / 1.0)
  np.testing.assert_allclose(
    metrics['g/mel'],
    losses.log_mel_loss(ref, rec, losses.MelConfig(SR, (64, 128))),
    rtol=1e-6,
  )
  np.testing.assert_allclose(
    metrics['g/phase'],
    losses.phase_loss(ref, rec, (64, 128), 4),
    rtol=1e-6,
  )
  np.testing.assert_allclose(metrics['g/wav'], losses.waveform_loss(ref, rec))
  np.testing.assert_allclose(metrics['vq/commit'], 0.75)
  np.testing.assert_allclose(metrics['vq/codebook'], 3.0)
  expected = (
    2.0
    + 100 * 0.5
    + metrics['g/mel']
    + 2.0 * metrics['g/phase']
    + 3.0 * metrics['g/wav']
    + 0.75
  )
  np.testing.assert_allclose(total, expected, rtol=1e-6)
  assert metrics['g/total'] == total
  weighted = dataclasses.replace(
    config,
    adversarial_weight=3.0,
    mel_weight=0.0,
    phase_weight=0.0,
    wav_weight=0.0,
    codebook_weight=0.5,
  )
  total, metrics = losses.generator_losses(weighted, ref, rec, real, fake, q)
  np.testing.assert_allclose(total, 3 * 2.0 + 50 + 0.75 + 0.5 * 3.0, rtol=1e-6)
  assert 'g/phase' not in metrics and 'g/wav' not in metrics
  _, metrics = losses.generator_losses(config, ref, rec, real, fake)
  assert 'vq/commit' not in metrics
  # Warm-up: no discriminator outputs, no adversarial terms.
  _, metrics = losses.generator_losses(config, ref, rec, None, None)
  assert 'g/adv' not in metrics and 'g/feat' not in metrics
  soundstream = dataclasses.replace(config, mel_form='soundstream')
  _, metrics = losses.generator_losses(soundstream, ref, rec, None, None)
  np.testing.assert_allclose(
    metrics['g/mel'],
    losses.multiscale_mel_loss(ref, rec, losses.MelConfig(SR, (64, 128))),
  )


def test_mel_settings_are_one_config_that_gin_binds():
  assert losses.LossConfig().mel == losses.MelConfig()
  gin.clear_config()
  try:
    train.parse_gin(
      ['experiments/quickstart.gin'],
      [
        'losses.MelConfig.windows = (128, 256)',
        'losses.MelConfig.num_mels = 32',
      ],
    )
    model = gin.query_parameter('train.model').scoped_configurable_fn()
  finally:
    gin.clear_config()
  assert model.loss.mel == losses.MelConfig(windows=(128, 256), num_mels=32)


def test_trim_drops_the_fade_in_and_the_look_ahead_tail():
  wav = jnp.arange(2 * 3000 * 2, dtype=jnp.float32).reshape(2, 3000, 2)
  rec = wav[:, :1920] + 1.0
  ref, out = losses.trim(wav, rec, 480)
  np.testing.assert_array_equal(ref, wav[:, 480:1920])
  np.testing.assert_array_equal(out, rec[:, 480:])
  with pytest.raises(ValueError, match='leave none'):
    losses.trim(wav, rec, 1920)


def random_params(config, seed=0):
  """Fan-in scaled normal weights, built in numpy (compiling RNG is slow)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: disc.init_params(config, jax.random.key(0)))

  def fill(x):
    fan_in = int(np.prod(x.shape[:-1])) if len(x.shape) > 1 else 1
    return jnp.asarray(rng.standard_normal(x.shape) / np.sqrt(fan_in), x.dtype)

  return jax.tree.map(fill, shapes)


def test_gradients_through_discriminator_are_finite():
  d_config = disc.DiscriminatorConfig(
    windows=(16, 32),
    base_channels=4,
    channel_multipliers=(1, 2),
    strides=((1, 2), (1, 2)),
  )
  # Every term, at a reference that is silent for its first 100 samples.
  config = losses.LossConfig(
    mel=losses.MelConfig(windows=(32, 64)),
    phase_windows=(32, 64),
    phase_weight=1.0,
    wav_weight=1.0,
  )
  model = disc.MultiScaleSTFTDiscriminator(d_config)
  d_params = random_params(d_config)
  wav = jnp.concatenate([jnp.zeros((2, 100, 2)), noise((2, 300, 2))], axis=1)
  rec = wav[:, :320] + noise((2, 320, 2), seed=7, scale=0.05)

  @jax.jit
  def grads(rec, d_params):
    def g_loss(rec):
      real = model.apply({'params': d_params}, wav[:, :320])
      fake = model.apply({'params': d_params}, rec)
      return losses.generator_losses(config, wav[:, :320], rec, real, fake)[0]

    def d_loss(d_params):
      real = model.apply({'params': d_params}, wav[:, :320])
      fake = model.apply({'params': d_params}, jax.lax.stop_gradient(rec))
      return losses.discriminator_loss(real, fake)[0]

    return jax.grad(g_loss)(rec), jax.grad(d_loss)(d_params)

  g_rec, g_d = grads(rec, d_params)
  for g in [g_rec, *jax.tree.leaves(g_d)]:
    assert np.all(np.isfinite(g))
  assert np.max(np.abs(g_rec)) > 0
  assert np.max(np.abs(g_d['stft_16']['stem']['kernel'])) > 0


def orthogonal_noise(s, snr_db, seed):
  """Zero-mean noise orthogonal to each channel of s, at the given SNR."""
  n = np.asarray(noise(s.shape, seed=seed), np.float64)
  s = np.asarray(s, np.float64)
  energy = np.sum(s * s, axis=1, keepdims=True)
  n -= n.mean(axis=1, keepdims=True)
  n -= np.sum(n * s, axis=1, keepdims=True) / energy * s
  power = energy / 10 ** (snr_db / 10)
  return n * np.sqrt(power / np.sum(n * n, axis=1, keepdims=True))


def test_si_sdr_known_snr_and_scale_invariance():
  s = noise((3, 4000, 2), seed=8)
  s = s - jnp.mean(s, axis=1, keepdims=True)
  for snr in (0.0, 10.0, 25.0):
    est = s + jnp.asarray(orthogonal_noise(s, snr, seed=9), jnp.float32)
    value = losses.si_sdr(s, est)
    assert value.shape == (3,)
    np.testing.assert_allclose(value, snr, atol=1e-3)
    np.testing.assert_allclose(losses.si_sdr(s, 3.0 * est), value, atol=1e-3)
    np.testing.assert_allclose(losses.si_sdr(s, 0.2 * est), value, atol=1e-3)
  # An offset does not count as error (zero-mean SI-SDR).
  est = s + jnp.asarray(orthogonal_noise(s, 10.0, seed=10), jnp.float32)
  np.testing.assert_allclose(losses.si_sdr(s, est + 0.3), 10.0, atol=1e-3)


def test_mel_distance_values():
  wav = noise((2, 4800, 2), seed=11)
  np.testing.assert_array_equal(losses.mel_distance(wav, wav), [0.0, 0.0])
  # A 2x gain shifts every used log10 mel bin by log10(2), at every scale
  # (up to log_eps, which matters most for the quiet small-window bins).
  np.testing.assert_allclose(
    losses.mel_distance(wav, 2.0 * wav), np.log10(2.0), rtol=1e-2
  )
  np.testing.assert_allclose(
    losses.mel_distance(wav, 2.0 * wav, losses.MelConfig(windows=(1024, 2048))),
    np.log10(2.0),
    rtol=1e-3,
  )
  small = losses.mel_distance(wav, wav + noise(wav.shape, seed=12, scale=0.01))
  large = losses.mel_distance(wav, wav + noise(wav.shape, seed=12, scale=0.1))
  assert small.shape == (2,)
  assert np.all(small > 0) and np.all(small < large)
