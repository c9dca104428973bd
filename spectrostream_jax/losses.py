"""Training losses of the codec and its discriminators, and eval metrics.

Everything is a pure function of arrays (SPEC §7): the train step runs the
models and hands their outputs here. Losses follow SoundStream: hinge
adversarial terms averaged over the discriminator scales, L1 feature
matching, a multi-scale mel reconstruction loss and the RVQ commitment.
Reconstructions are shorter than their input (the decoder look-ahead drops
one frame), so the input is always cut to the reconstruction's length first.
"""

from collections.abc import Sequence
import dataclasses
import math

import jax
import jax.numpy as jnp

from spectrostream_jax import signal
from spectrostream_jax.models import discriminator
from spectrostream_jax.models import quantizer as rvq


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Loss weights and mel settings. Defaults: SPEC §7."""

  adversarial_weight: float = 1.0
  feature_weight: float = 100.0
  mel_weight: float = 1.0
  # β, on the sum over RVQ levels of each level's mean squared commitment:
  # the first level then gets full β as in one-level VQ (a mean over 64
  # levels would scale it by 1/64).
  commitment_weight: float = 1.0
  # Only for gradient-learned codebooks; EMA codebooks (default) need none.
  codebook_weight: float = 0.0
  # Feature matching as L1 relative to mean |f_real| per layer (else plain).
  normalize_features: bool = True
  sample_rate: int = 48_000
  mel_windows: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)
  # hop = window // mel_hops_per_window.
  mel_hops_per_window: int = 4
  num_mels: int = 64
  log_eps: float = 1e-5


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
) -> tuple[jax.Array, jax.Array]:
  """Mel magnitudes [B, C, frames, mels] of both signals in one pass.

  Stacked on the channel axis, not the batch axis: a batch split over
  devices stays where it is.
  """
  both = jnp.concatenate(
    [wav.astype(jnp.float32), reconstruction.astype(jnp.float32)], axis=-1
  )
  mel = signal.mel_spectrogram(both, sample_rate, window, hop, num_mels)
  return jnp.split(mel, 2, axis=1)


def multiscale_mel_loss(
  wav: jax.Array,
  reconstruction: jax.Array,
  sample_rate: int = 48_000,
  windows: Sequence[int] = (64, 128, 256, 512, 1024, 2048),
  hops_per_window: int = 4,
  num_mels: int = 64,
  log_eps: float = 1e-5,
) -> jax.Array:
  """SoundStream's reconstruction loss, summed over the window sizes w.

  With S, Ŝ the mel magnitude spectrograms (window w, hop w / 4) of the
  reference and of the reconstruction, and per frame t the norms taken over
  the mel bins m:

    L_w = mean_t Σ_m |S_tm − Ŝ_tm|
          + sqrt(w / 2) · mean_t sqrt(Σ_m (log(S_tm + eps) − log(Ŝ_tm + eps))²)

  where mean_t runs over batch, audio channels and frames (SoundStream sums
  over frames; the mean keeps the loss independent of the crop length).
  Both signals must have the same shape [B, T, C] with T > max(windows) / 2.
  """
  total = 0.0
  for window in windows:
    s, s_hat = _mel_pair(
      wav,
      reconstruction,
      sample_rate,
      window,
      window // hops_per_window,
      num_mels,
    )
    linear = jnp.mean(jnp.sum(jnp.abs(s - s_hat), axis=-1))
    log_diff = jnp.log(s + log_eps) - jnp.log(s_hat + log_eps)
    log = jnp.mean(_safe_sqrt(jnp.sum(jnp.square(log_diff), axis=-1)))
    total = total + linear + math.sqrt(window / 2) * log
  return total


def generator_losses(
  config: LossConfig,
  wav: jax.Array,
  reconstruction: jax.Array,
  real: Sequence[discriminator.DiscriminatorOutput],
  fake: Sequence[discriminator.DiscriminatorOutput],
  quantizer: rvq.QuantizerOutput | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The codec's total loss and its parts.

  Args:
    config: weights and mel settings.
    wav: input audio [B, T, C]; only its aligned prefix is compared.
    reconstruction: decoder output [B, T', C], T' <= T.
    real: discriminator outputs on the aligned input (for feature matching).
    fake: discriminator outputs on `reconstruction`.
    quantizer: the RVQ's training output; omit for a model without RVQ.

  Returns:
    (total, metrics) with metrics `g/adv`, `g/feat`, `g/mel`, `g/total` and,
    with a quantizer, `vq/commit` and `vq/codebook` (sums over levels).
  """
  wav = align_to_reconstruction(wav, reconstruction)
  metrics = {
    'g/adv': hinge_generator_loss([logits for logits, _ in fake]),
    'g/feat': feature_matching_loss(
      [features for _, features in real],
      [features for _, features in fake],
      config.normalize_features,
    ),
    'g/mel': multiscale_mel_loss(
      wav,
      reconstruction,
      config.sample_rate,
      config.mel_windows,
      config.mel_hops_per_window,
      config.num_mels,
      config.log_eps,
    ),
  }
  total = (
    config.adversarial_weight * metrics['g/adv']
    + config.feature_weight * metrics['g/feat']
    + config.mel_weight * metrics['g/mel']
  )
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
  reference: jax.Array, estimate: jax.Array, eps: float = 1e-8
) -> jax.Array:
  """Scale-invariant SDR in dB of [B, T, C] signals, per example [B].

  Computed per audio channel on zero-mean signals and averaged over
  channels: with α = <ŝ, s> / ||s||², SI-SDR = 10 log10(||αs||² / ||ŝ − αs||²).
  A silent reference channel gives a meaningless value.
  """
  s = reference.astype(jnp.float32)
  s_hat = estimate.astype(jnp.float32)
  s = s - jnp.mean(s, axis=1, keepdims=True)
  s_hat = s_hat - jnp.mean(s_hat, axis=1, keepdims=True)
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
  sample_rate: int = 48_000,
  windows: Sequence[int] = (64, 128, 256, 512, 1024, 2048),
  hops_per_window: int = 4,
  num_mels: int = 64,
  log_eps: float = 1e-5,
) -> jax.Array:
  """Mean |log10(S + eps) − log10(Ŝ + eps)| over scales and bins, per example.

  An eval metric of [B, T, C] signals, [B]: unlike the training loss it has
  no window-dependent weights, so it reads as an average level error
  (0.05 ≈ 1 dB).
  """
  per_scale = []
  for window in windows:
    s, s_hat = _mel_pair(
      reference,
      estimate,
      sample_rate,
      window,
      window // hops_per_window,
      num_mels,
    )
    diff = jnp.abs(jnp.log10(s + log_eps) - jnp.log10(s_hat + log_eps))
    # Small windows leave some mel filters without an FFT bin; skip them.
    used = signal.mel_filterbank(num_mels, window, sample_rate).any(axis=0)
    per_scale.append(jnp.mean(diff[..., used], axis=(1, 2, 3)))
  return jnp.mean(jnp.stack(per_scale), axis=0)
