"""Training losses of the codec and its discriminators, and eval metrics.

Everything is a pure function of arrays: the train step runs the models and
hands their outputs here. The generator's terms (`TERMS`) are a log-mel
loss (or SoundStream's mel loss), two terms that see phase and not the
level (a magnitude-weighted multi-resolution phase error and one minus the
waveforms' normalised correlation), L1 feature matching and the hinge
adversarial term averaged over the discriminator scales; plus the RVQ
commitment. docs/training.md ("The recipe") says why and with which
weights. Reconstructions are shorter than their input (the decoder
look-ahead drops one frame), and their first STFT hop cannot be
reconstructed: `trim` cuts both before any loss. With a batch split over
devices (`batch_sharding`), every spectrum is computed by the device that
holds its example (`signal.per_device`).
"""

from collections.abc import Sequence
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from spectrostream_jax import signal
from spectrostream_jax.models import discriminator
from spectrostream_jax.models import quantizer as rvq

# How a batch is split over devices; None: not split.
BatchSharding = jax.sharding.NamedSharding | None

MEL_FORMS = ('log', 'soundstream')
# Generator terms that act on the reconstruction x̂, in a fixed order (the
# gradient balancer keeps one running norm per term).
TERMS = ('mel', 'phase', 'wav', 'feat', 'adv')


@dataclasses.dataclass(frozen=True)
class MelConfig:
  """The mel spectrograms of the mel losses and of `mel_distance`.

  One object rather than loose arguments with defaults, so that the loss,
  the eval during training and the eval metrics cannot silently differ.
  """

  sample_rate: int = 48_000
  windows: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)
  # hop = window // hops_per_window.
  hops_per_window: int = 4
  num_mels: int = 64
  # Floor before the log; with the log loss's amplitude scale, −100 dB.
  log_eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Loss weights and spectral settings.

  The defaults are the measured recipe of docs/training.md ("The recipe");
  gin/recipes/soundstream.gin sets SoundStream's (docs/training.md, "The
  published settings").
  """

  adversarial_weight: float = 1.0
  feature_weight: float = 100.0
  mel_weight: float = 1.0
  # 'log': mean |log10(S + eps) − log10(Ŝ + eps)| over bins and scales on
  # an amplitude-scaled mel spectrogram (a full-scale sine reads about 1 at
  # every window). 'soundstream': SoundStream's sum over scales of an L1
  # plus a sqrt(w / 2)-weighted log L2 on the Slaney mel spectrogram.
  mel_form: str = 'log'
  # Multi-resolution phase error weighted by the reference's magnitude
  # (`phase_loss`), and 1 − the normalised correlation of the waveforms
  # (`waveform_loss`): both see phase and neither the level.
  phase_weight: float = 5.0
  phase_windows: tuple[int, ...] = (256, 512, 1024, 2048)
  phase_hops_per_window: int = 4
  wav_weight: float = 10.0
  # β, on the sum over RVQ levels of each level's mean squared commitment:
  # the first level then gets full β as in one-level VQ (a mean over 64
  # levels would scale it by 1/64).
  commitment_weight: float = 1.0
  # Only for gradient-learned codebooks; EMA codebooks (default) need none.
  codebook_weight: float = 0.0
  # Feature matching as L1 relative to mean |f_real| per layer (else plain).
  normalize_features: bool = True
  # The mel term's spectrograms; `step.evaluate` measures with them too.
  mel: MelConfig = MelConfig()
  # Samples at the start of a reconstruction that no loss and no
  # discriminator sees: the first STFT hop is covered by one analysis
  # frame only and cannot be reconstructed (docs/architecture.md, "The
  # model": the STFT row).
  skip_samples: int = 480
  # EnCodec's balancer: each term's gradient at x̂ is scaled to a norm
  # proportional to its weight (running norms with this decay).
  balancer: bool = False
  balancer_decay: float = 0.999

  def __post_init__(self):
    if self.mel_form not in MEL_FORMS:
      raise ValueError(f'mel_form {self.mel_form!r} not in {MEL_FORMS}')
    if self.skip_samples < 0:
      raise ValueError('skip_samples must be >= 0')

  def weights(self) -> dict[str, float]:
    """The weight of each term of `TERMS`."""
    return {
      'mel': self.mel_weight,
      'phase': self.phase_weight,
      'wav': self.wav_weight,
      'feat': self.feature_weight,
      'adv': self.adversarial_weight,
    }


def align_to_reconstruction(
  wav: jax.Array, reconstruction: jax.Array
) -> jax.Array:
  """The prefix of `wav` [B, T, C] that `reconstruction` reproduces."""
  n = reconstruction.shape[1]
  if wav.shape[1] < n or wav.shape[2] != reconstruction.shape[2]:
    raise ValueError(
      f'cannot align input {wav.shape} with reconstruction '
      f'{reconstruction.shape}'
    )
  return wav[:, :n]


def hinge_generator_loss(fake_logits: Sequence[jax.Array]) -> jax.Array:
  """mean(relu(1 − D(x̂))) per scale, averaged over scales."""
  return _mean_over_scales(
    [jnp.mean(jax.nn.relu(1.0 - logits)) for logits in fake_logits]
  )


def hinge_discriminator_loss(
  real_logits: Sequence[jax.Array], fake_logits: Sequence[jax.Array]
) -> tuple[jax.Array, jax.Array]:
  """(mean(relu(1 − D(x))), mean(relu(1 + D(x̂)))), averaged over scales.

  Their sum is the discriminator's hinge loss.
  """
  real = [jnp.mean(jax.nn.relu(1.0 - logits)) for logits in real_logits]
  fake = [jnp.mean(jax.nn.relu(1.0 + logits)) for logits in fake_logits]
  return _mean_over_scales(real), _mean_over_scales(fake)


def feature_matching_loss(
  real_features: Sequence[Sequence[jax.Array]],
  fake_features: Sequence[Sequence[jax.Array]],
  normalize: bool = True,
) -> jax.Array:
  """L1 between feature maps, averaged over every layer of every scale.

  Per layer: mean |f_real − f_fake|, divided by mean |f_real| when
  `normalize` (EnCodec's choice) so that layers whose activations are large
  do not dominate and the loss does not drift as the discriminator's feature
  scale grows. The real features are treated as constants.
  """
  terms = []
  for real_layers, fake_layers in zip(
    real_features, fake_features, strict=True
  ):
    for real, fake in zip(real_layers, fake_layers, strict=True):
      real = jax.lax.stop_gradient(real.astype(jnp.float32))
      term = jnp.mean(jnp.abs(real - fake.astype(jnp.float32)))
      if normalize:
        term = term / (jnp.mean(jnp.abs(real)) + 1e-8)
      terms.append(term)
  return jnp.mean(jnp.stack(terms))


def _mean_over_scales(terms: Sequence[jax.Array]) -> jax.Array:
  return jnp.mean(jnp.stack(list(terms)))


def _safe_sqrt(x: jax.Array) -> jax.Array:
  """sqrt with value 0 and gradient 0 (not NaN) where x == 0."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _mel_pair(
  wav: jax.Array,
  reconstruction: jax.Array,
  sample_rate: int,
  window: int,
  hop: int,
  num_mels: int,
  batch_sharding: BatchSharding = None,
  length: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Mel magnitudes [B, C, frames, mels] of both signals in one pass.

  Stacked on the channel axis, not the batch axis: a batch split over
  devices stays where it is. `length`: see signal.magnitude_spectrogram.
  """
  both = jnp.concatenate(
    [wav.astype(jnp.float32), reconstruction.astype(jnp.float32)], axis=-1
  )
  mel = functools.partial(
    signal.mel_spectrogram,
    sample_rate=sample_rate,
    window=window,
    hop=hop,
    num_mels=num_mels,
    length=length,
  )
  return jnp.split(signal.per_device(mel, batch_sharding)(both), 2, axis=1)


def multiscale_mel_loss(
  wav: jax.Array,
  reconstruction: jax.Array,
  mel: MelConfig = MelConfig(),
  batch_sharding: BatchSharding = None,
) -> jax.Array:
  """SoundStream's reconstruction loss, summed over the window sizes w.

  With S, Ŝ the mel magnitude spectrograms (window w, hop w / 4) of the
  reference and of the reconstruction, and per frame t the norms taken over
  the mel bins m:

    L_w = mean_t Σ_m |S_tm − Ŝ_tm|
          + sqrt(w / 2) · mean_t sqrt(Σ_m (log(S_tm + eps) − log(Ŝ_tm + eps))²)

  where mean_t runs over batch, audio channels and frames (SoundStream sums
  over frames; the mean keeps the loss independent of the crop length).
  Both signals must have the same shape [B, T, C] with
  T > max(mel.windows) / 2.
  """
  total = 0.0
  for window in mel.windows:
    s, s_hat = _mel_pair(
      wav,
      reconstruction,
      mel.sample_rate,
      window,
      window // mel.hops_per_window,
      mel.num_mels,
      batch_sharding,
    )
    linear = jnp.mean(jnp.sum(jnp.abs(s - s_hat), axis=-1))
    log_diff = jnp.log(s + mel.log_eps) - jnp.log(s_hat + mel.log_eps)
    log = jnp.mean(_safe_sqrt(jnp.sum(jnp.square(log_diff), axis=-1)))
    total = total + linear + math.sqrt(window / 2) * log
  return total


def _amplitude_filterbank(num_mels: int, window: int, sample_rate: int):
  """Mel triangles of peak 1 on the rfft bins, and the bins' scale.

  With the scale 2 / Σ hann, a sine of amplitude a gives a peak bin of
  about a at any window, and a mel band holding it about a as well.
  """
  fb = signal.mel_filterbank(num_mels, window, sample_rate)
  peak = fb.max(axis=0)
  used = peak > 0
  fb = fb[:, used] / peak[used]
  return fb, 2.0 / float(np.sum(signal.hann_window(window)))


def log_mel_loss(
  wav: jax.Array,
  reconstruction: jax.Array,
  mel: MelConfig = MelConfig(),
  batch_sharding: BatchSharding = None,
) -> jax.Array:
  """Mean |log10(S + eps) − log10(Ŝ + eps)| over bins, frames and scales.

  S is the amplitude-scaled mel magnitude (`_amplitude_filterbank`): eps
  is then a level relative to full scale (1e-5: −100 dB) at every window,
  and every scale and bin weighs the same. Mel bands without an FFT bin
  (small windows) are left out.
  """
  both = jnp.concatenate(
    [wav.astype(jnp.float32), reconstruction.astype(jnp.float32)], axis=-1
  )
  per_scale = []
  for window in mel.windows:
    fb, scale = _amplitude_filterbank(mel.num_mels, window, mel.sample_rate)
    magnitude = functools.partial(
      signal.magnitude_spectrogram,
      window=window,
      hop=window // mel.hops_per_window,
    )
    mag = signal.per_device(magnitude, batch_sharding)(both)
    spec = (mag * scale) @ jnp.asarray(fb)
    s, s_hat = jnp.split(spec, 2, axis=1)
    diff = jnp.log10(s + mel.log_eps) - jnp.log10(s_hat + mel.log_eps)
    per_scale.append(jnp.mean(jnp.abs(diff)))
  return jnp.mean(jnp.stack(per_scale))


def phase_loss(
  wav: jax.Array,
  reconstruction: jax.Array,
  windows: Sequence[int] = (256, 512, 1024, 2048),
  hops_per_window: int = 4,
  softness: float = 0.1,
  batch_sharding: BatchSharding = None,
) -> jax.Array:
  """Multi-resolution phase error, weighted by the reference's magnitude.

  Per window, Σ |X| · |u(X̂) − u(X)| / Σ |X| over the bins and frames of
  each example, with u(z) = z / sqrt(|z|² + (softness·|X|)²) a phasor that
  saturates once |z| is well above `softness` times the reference bin's
  magnitude. For reconstructions at about the right level that is the
  phase error alone: 0 for the right phase, about 1.26 for random phases;
  a louder bin costs nothing more and a much quieter one about 1, so going
  quiet is no way out. Where the reconstruction is near zero the gradient
  stays bounded (a unit phasor's would grow as 1 / |X̂|). The mel term sets
  the levels.
  """
  both = jnp.concatenate(
    [wav.astype(jnp.float32), reconstruction.astype(jnp.float32)], axis=-1
  )
  per_scale = []
  for window in windows:
    spectrum = functools.partial(
      _centred_spectrum, window=window, hop=window // hops_per_window
    )
    spec = signal.per_device(spectrum, batch_sharding)(both)
    ref, rec = jnp.split(spec, 2, axis=1)
    ref_mag = jnp.abs(ref)
    level = jnp.mean(ref_mag, axis=(1, 2, 3), keepdims=True)
    soft2 = jnp.square(softness * ref_mag) + jnp.square(1e-6 * level) + 1e-30

    def phasor(z, soft2=soft2):
      return z * jax.lax.rsqrt(z.real**2 + z.imag**2 + soft2)

    d = phasor(rec) - phasor(ref)
    err = jnp.sqrt(d.real**2 + d.imag**2 + 1e-12)
    num = jnp.sum(ref_mag * err, axis=(1, 2, 3))
    den = jnp.sum(ref_mag, axis=(1, 2, 3))
    per_scale.append(jnp.mean(num / (den + 1e-12)))
  return jnp.mean(jnp.stack(per_scale))


def _centred_spectrum(wav: jax.Array, window: int, hop: int) -> jax.Array:
  """Complex STFT [B, C, frames, window // 2 + 1] of [B, T, C], centred."""
  x = jnp.moveaxis(wav, -1, 1)
  pad = window // 2
  x = jnp.pad(x, ((0, 0), (0, 0), (pad, pad)), mode='reflect')
  n = 1 + (x.shape[-1] - window) // hop
  frames = signal.frame(x, window, hop)[..., :n, :]
  frames = frames * jnp.asarray(signal.hann_window(window), jnp.float32)
  return jnp.fft.rfft(frames, axis=-1)


def waveform_loss(wav: jax.Array, reconstruction: jax.Array) -> jax.Array:
  """1 − the normalised correlation of the waveforms, per example.

  1 − <x, x̂> / (‖x‖ ‖x̂‖) over samples and channels: 0 for a scaled copy,
  1 for an uncorrelated one. Scale-invariant like SI-SDR (a monotone
  function of it), so it too leaves the level to the mel term.
  """
  x = wav.astype(jnp.float32)
  y = reconstruction.astype(jnp.float32)
  dot = jnp.sum(x * y, axis=(1, 2))
  norms = jnp.sqrt(jnp.sum(x * x, axis=(1, 2)) * jnp.sum(y * y, axis=(1, 2)))
  return jnp.mean(1.0 - dot / (norms + 1e-12))


def trim(
  wav: jax.Array, reconstruction: jax.Array, skip: int
) -> tuple[jax.Array, jax.Array]:
  """(reference, reconstruction) compared by the losses: the reference is
  cut to the reconstruction's length, and both lose their first `skip`
  samples."""
  ref = align_to_reconstruction(wav, reconstruction)
  if skip >= ref.shape[1]:
    raise ValueError(f'{ref.shape[1]} samples leave none after {skip}')
  return ref[:, skip:], reconstruction[:, skip:]


def reconstruction_losses(
  config: LossConfig,
  ref: jax.Array,
  rec: jax.Array,
  batch_sharding: BatchSharding = None,
) -> dict[str, jax.Array]:
  """The terms that compare x̂ with x directly (unweighted): mel, and the
  STFT and waveform terms when their weight is not 0."""
  if config.mel_form == 'log':
    mel = log_mel_loss(ref, rec, config.mel, batch_sharding)
  else:
    mel = multiscale_mel_loss(ref, rec, config.mel, batch_sharding)
  terms = {'mel': mel}
  if config.phase_weight:
    terms['phase'] = phase_loss(
      ref,
      rec,
      config.phase_windows,
      config.phase_hops_per_window,
      batch_sharding=batch_sharding,
    )
  if config.wav_weight:
    terms['wav'] = waveform_loss(ref, rec)
  return terms


def adversarial_losses(
  config: LossConfig,
  real: Sequence[discriminator.DiscriminatorOutput],
  fake: Sequence[discriminator.DiscriminatorOutput],
) -> dict[str, jax.Array]:
  """The terms that judge x̂ through the discriminators (unweighted)."""
  return {
    'adv': hinge_generator_loss([logits for logits, _ in fake]),
    'feat': feature_matching_loss(
      [features for _, features in real],
      [features for _, features in fake],
      config.normalize_features,
    ),
  }


def generator_losses(
  config: LossConfig,
  ref: jax.Array,
  reconstruction: jax.Array,
  real: Sequence[discriminator.DiscriminatorOutput] | None,
  fake: Sequence[discriminator.DiscriminatorOutput] | None,
  quantizer: rvq.QuantizerOutput | None = None,
  batch_sharding: BatchSharding = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The codec's total loss and its parts.

  Args:
    config: weights and spectral settings.
    ref: the reference [B, T, C], trimmed like `reconstruction` (`trim`).
    reconstruction: decoder output [B, T, C], trimmed.
    real: discriminator outputs on `ref` (for feature matching); None
      (with `fake`) leaves the adversarial terms out (warm-up).
    fake: discriminator outputs on `reconstruction`.
    quantizer: the RVQ's training output; omit for a model without RVQ.
    batch_sharding: how the batch is split over devices, if it is.

  Returns:
    (total, metrics): metrics `g/<term>` (unweighted, for each term that
    was computed), `g/total` and, with a quantizer, `vq/commit` and
    `vq/codebook` (sums over levels).
  """
  terms = reconstruction_losses(config, ref, reconstruction, batch_sharding)
  if fake is not None:
    terms.update(adversarial_losses(config, real, fake))
  weights = config.weights()
  total = sum(weights[name] * value for name, value in terms.items())
  metrics = {f'g/{name}': value for name, value in terms.items()}
  if quantizer is not None:
    metrics['vq/commit'] = jnp.sum(quantizer.commitment)
    metrics['vq/codebook'] = jnp.sum(quantizer.codebook_loss)
    total = total + (
      config.commitment_weight * metrics['vq/commit']
      + config.codebook_weight * metrics['vq/codebook']
    )
  metrics['g/total'] = total
  return total, metrics


def discriminator_loss(
  real: Sequence[discriminator.DiscriminatorOutput],
  fake: Sequence[discriminator.DiscriminatorOutput],
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Hinge loss of the discriminators; `fake` should see stop_gradient(x̂).

  Metrics: `d/loss`, its hinge terms `d/real` and `d/fake`, and the mean
  logits `d/logits_real` and `d/logits_fake` (their gap shows how well the
  discriminators separate the two).
  """
  real_logits = [logits for logits, _ in real]
  fake_logits = [logits for logits, _ in fake]
  real_term, fake_term = hinge_discriminator_loss(real_logits, fake_logits)
  loss = real_term + fake_term
  metrics = {
    'd/loss': loss,
    'd/real': real_term,
    'd/fake': fake_term,
    'd/logits_real': _mean_over_scales([jnp.mean(x) for x in real_logits]),
    'd/logits_fake': _mean_over_scales([jnp.mean(x) for x in fake_logits]),
  }
  return loss, metrics


def si_sdr(
  reference: jax.Array,
  estimate: jax.Array,
  eps: float = 1e-8,
  length: jax.Array | None = None,
) -> jax.Array:
  """Scale-invariant SDR in dB of [B, T, C] signals, per example [B].

  Computed per audio channel on zero-mean signals and averaged over
  channels: with α = <ŝ, s> / ||s||², SI-SDR = 10 log10(||αs||² / ||ŝ − αs||²).
  A silent reference channel gives a meaningless value. `length`: only
  the first `length` samples count (a traced scalar).
  """
  s = reference.astype(jnp.float32)
  s_hat = estimate.astype(jnp.float32)
  if length is None:
    s = s - jnp.mean(s, axis=1, keepdims=True)
    s_hat = s_hat - jnp.mean(s_hat, axis=1, keepdims=True)
  else:
    used = (jnp.arange(s.shape[1]) < length)[None, :, None]
    s = jnp.where(used, s - jnp.sum(s * used, 1, keepdims=True) / length, 0.0)
    s_hat = jnp.where(
      used, s_hat - jnp.sum(s_hat * used, 1, keepdims=True) / length, 0.0
    )
  alpha = jnp.sum(s_hat * s, axis=1, keepdims=True) / (
    jnp.sum(s * s, axis=1, keepdims=True) + eps
  )
  target = alpha * s
  noise = s_hat - target
  ratio = (jnp.sum(target**2, axis=1) + eps) / (jnp.sum(noise**2, axis=1) + eps)
  return jnp.mean(10.0 * jnp.log10(ratio), axis=-1)


def mel_distance(
  reference: jax.Array,
  estimate: jax.Array,
  mel: MelConfig = MelConfig(),
  batch_sharding: BatchSharding = None,
  length: jax.Array | None = None,
) -> jax.Array:
  """Mean |log10(S + eps) − log10(Ŝ + eps)| over scales and bins, per example.

  An eval metric of [B, T, C] signals, [B]: unlike the training loss it has
  no window-dependent weights, so it reads as an average level error
  (0.05 ≈ 1 dB). `length`: see signal.magnitude_spectrogram.
  """
  per_scale = []
  for window in mel.windows:
    hop = window // mel.hops_per_window
    s, s_hat = _mel_pair(
      reference,
      estimate,
      mel.sample_rate,
      window,
      hop,
      mel.num_mels,
      batch_sharding,
      length,
    )
    diff = jnp.abs(jnp.log10(s + mel.log_eps) - jnp.log10(s_hat + mel.log_eps))
    # Small windows leave some mel filters without an FFT bin; skip them.
    used = signal.mel_filterbank(mel.num_mels, window, mel.sample_rate)
    used = used.any(axis=0)
    per_scale.append(frame_mean(diff[..., used], hop, length))
  return jnp.mean(jnp.stack(per_scale), axis=0)


def frame_mean(
  x: jax.Array, hop: int, length: jax.Array | None = None
) -> jax.Array:
  """Mean of [B, C, frames, bins] over all but B; with `length`, over the
  frames of a signal that long (signal.valid_frames)."""
  if length is None:
    return jnp.mean(x, axis=(1, 2, 3))
  valid = signal.valid_frames(length, hop, x.shape[2])[None, None, :, None]
  count = jnp.sum(valid) * x.shape[1] * x.shape[3]
  return jnp.sum(jnp.where(valid, x, 0.0), axis=(1, 2, 3)) / count
