"""One GAN training step of SpectroStream, and the in-loop evaluation.

Pure functions of (config, state, batch): `train.py` jits them with
shardings. Both networks are updated from the same forward pass
(simultaneous updates, both losses see the discriminators as they were at
the start of the step):

1. codec forward: reconstruction x̂ of the input's aligned prefix x;
2. discriminators on x and on x̂, once each; the generator loss (hinge,
   feature matching, multi-scale mel, commitment) and the discriminator
   hinge loss are functions of those outputs;
3. gradients by hand-wired VJPs: the discriminator pass on x̂ is
   differentiated twice, w.r.t. its input under the generator loss and
   w.r.t. its parameters under the discriminator loss (which is what
   running it on stop_gradient(x̂) gives), so the discriminators run
   forward on 2B examples per step instead of the 4B of separate passes;
4. the RVQ codebooks follow their EMA (after `init_codebooks`, k-means,
   which the trainer runs once as a program of its own), the optimizers
   step, the generator's parameter EMA follows;
5. if any loss or gradient is not finite, nothing but the step counter
   changes and `skipped` counts it.

The key is `fold_in(state.rng, state.step)`, so a step's randomness depends
only on the run's seed and the step number.
"""

from collections.abc import Sequence
import dataclasses

import jax
import jax.numpy as jnp
import optax

from spectrostream_jax import losses
from spectrostream_jax import optim
from spectrostream_jax import sharding
from spectrostream_jax import state as train_state
from spectrostream_jax.models import codec as codec_lib
from spectrostream_jax.models import discriminator as disc_lib
from spectrostream_jax.models import quantizer as rvq


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Everything the step computes with (hashable: a static jit argument)."""

  codec: codec_lib.CodecConfig = codec_lib.CodecConfig()
  discriminator: disc_lib.DiscriminatorConfig = disc_lib.DiscriminatorConfig()
  loss: losses.LossConfig = losses.LossConfig()
  generator_optimizer: optim.OptimizerConfig = optim.OptimizerConfig()
  discriminator_optimizer: optim.OptimizerConfig = optim.OptimizerConfig()
  # Decay of the codec parameters' EMA, ramped up as (1 + t) / (10 + t).
  ema_decay: float = 0.999

  def __post_init__(self):
    if self.discriminator.num_channels != self.codec.num_channels:
      raise ValueError('codec and discriminator channel counts differ')
    if self.loss.sample_rate != self.codec.sample_rate:
      raise ValueError('loss and codec sample rates differ')

  @property
  def ema_codebooks(self) -> bool:
    return self.codec.quantizer.codebook_learning == 'ema'


# Parameters the generator optimizer leaves alone when codebooks are EMA.
EMA_CODEBOOK = 'quantizer/embedding'


def optimizers(
  config: StepConfig,
) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
  """(codec optimizer, discriminator optimizer)."""
  frozen = (EMA_CODEBOOK,) if config.ema_codebooks else ()
  return (
    optim.make(config.generator_optimizer, frozen),
    optim.make(config.discriminator_optimizer),
  )


def init_state(
  config: StepConfig, seed: int | jax.Array
) -> train_state.TrainState:
  """A fresh train state (jit it with out_shardings to create it sharded)."""
  rng_codec, rng_disc, rng = jax.random.split(jax.random.key(seed), 3)
  tx, disc_tx = optimizers(config)
  return train_state.TrainState.create(
    codec_lib.init_params(config.codec, rng_codec),
    disc_lib.init_params(config.discriminator, rng_disc),
    tx,
    disc_tx,
    config.codec.quantizer,
    rng,
  )


def _level_metrics(counts: jax.Array) -> dict[str, jax.Array]:
  stats = rvq.codebook_metrics(counts)
  return {
    f'vq/{name}/L{level:02d}': values[level]
    for name, values in stats.items()
    for level in range(values.shape[0])
  }


def replicate(x, mesh: jax.sharding.Mesh | None):
  """The arrays of x on every device of `mesh` (a no-op without one).

  Loops that read x (the RVQ's level loop) then need no collective.
  """
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, sharding.replicated(mesh))


def init_codebooks(
  config: StepConfig,
  state: train_state.TrainState,
  batch: dict[str, jax.Array],
  mesh: jax.sharding.Mesh | None = None,
) -> train_state.TrainState:
  """k-means codebooks from the encoder's embeddings of `batch['audio']`.

  The trainer runs this once, as its own program, before the first step.
  Live and EMA parameters get the same codebooks.
  """
  codec = codec_lib.SpectroStream(config.codec)
  qc = config.codec.quantizer
  emb = codec.apply(
    {'params': state.params}, batch['audio'], method=codec.embed
  )
  rng = jax.random.split(jax.random.fold_in(state.key(), state.step))[1]
  codebook, codebooks = rvq.kmeans_init(replicate(emb, mesh), rng, qc)
  # Replicated results keep the state's sharding from reaching into the
  # k-means loops (which would then need collectives).
  codebook, codebooks = replicate((codebook, codebooks), mesh)
  if not config.ema_codebooks:
    codebooks = codebooks.replace(
      counts=jnp.zeros_like(codebooks.counts),
      sums=jnp.zeros_like(codebooks.sums),
    )

  def with_codebook(params):
    return {**params, 'quantizer': {'embedding': codebook}}

  return state.replace(
    params=with_codebook(state.params),
    ema_params=with_codebook(state.ema_params),
    codebooks=codebooks,
  )


def train_step(
  config: StepConfig,
  state: train_state.TrainState,
  batch: dict[str, jax.Array],
  mesh: jax.sharding.Mesh | None = None,
) -> tuple[train_state.TrainState, dict[str, jax.Array]]:
  """One update of both networks on `batch['audio']` [B, T, C].

  `mesh`: the batch is split over its `sharding.BATCH_AXES`; the RVQ's
  level loop then runs per device (see `quantizer.quantize_for_training`).
  """
  codec = codec_lib.SpectroStream(config.codec)
  disc = disc_lib.MultiScaleSTFTDiscriminator(config.discriminator)
  tx, disc_tx = optimizers(config)
  wav = batch['audio']
  rng_quantizer = jax.random.fold_in(state.key(), state.step)

  qc = config.codec.quantizer

  # Codec forward; the RVQ losses are outputs so their gradients flow back.
  def generate(params):
    variables = {'params': params}
    emb = codec.apply(variables, wav, method=codec.embed)
    codebooks = replicate(params['quantizer']['embedding'], mesh)
    q = rvq.quantize_for_training(
      codebooks, emb, rng_quantizer, qc, mesh, sharding.BATCH_AXES
    )
    rec = codec.apply(
      variables, q.decoder_input, method=codec.decode_embeddings
    )
    return (rec, q.commitment, q.codebook_loss), (emb, q)

  (rec, commitment, codebook_loss), codec_vjp, (emb, q) = jax.vjp(
    generate, state.params, has_aux=True
  )
  target = losses.align_to_reconstruction(wav, rec)

  def discriminate(disc_params, x):
    return disc.apply({'params': disc_params}, x)

  real, real_vjp = jax.vjp(lambda p: discriminate(p, target), state.disc_params)
  fake, fake_vjp = jax.vjp(discriminate, state.disc_params, rec)

  def generator_loss(fake, rec, commitment, codebook_loss):
    out = q.replace(commitment=commitment, codebook_loss=codebook_loss)
    return losses.generator_losses(config.loss, wav, rec, real, fake, out)

  g_cts, g_metrics = jax.grad(generator_loss, (0, 1, 2, 3), has_aux=True)(
    fake, rec, commitment, codebook_loss
  )
  ct_fake, ct_rec, ct_commitment, ct_codebook = g_cts
  (grads,) = codec_vjp(
    (ct_rec + fake_vjp(ct_fake)[1], ct_commitment, ct_codebook)
  )

  (ct_real, ct_fake), d_metrics = jax.grad(
    losses.discriminator_loss, (0, 1), has_aux=True
  )(real, fake)
  disc_grads = optax.tree.add(real_vjp(ct_real)[0], fake_vjp(ct_fake)[0])

  grad_norm = optax.tree.norm(grads)
  disc_grad_norm = optax.tree.norm(disc_grads)
  finite = jnp.all(
    jnp.isfinite(
      jnp.stack(
        [g_metrics['g/total'], d_metrics['d/loss'], grad_norm, disc_grad_norm]
      )
    )
  )

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  disc_updates, disc_opt_state = disc_tx.update(
    disc_grads, state.disc_opt_state, state.disc_params
  )
  disc_params = optax.apply_updates(state.disc_params, disc_updates)

  if config.ema_codebooks:
    # Until `init_codebooks` has run, the codebooks stay as they are.
    codebook, codebooks, restarts = rvq.ema_update(state.codebooks, q, qc)
    ready = state.codebooks.initialized
    codebook = jnp.where(ready, codebook, params['quantizer']['embedding'])
    codebooks = jax.tree.map(
      lambda new, old: jnp.where(ready, new, old), codebooks, state.codebooks
    )
    restarts = jnp.where(ready, restarts, 0)
    params = {**params, 'quantizer': {'embedding': codebook}}
  else:
    codebooks = state.codebooks
    restarts = jnp.zeros((qc.num_levels,), jnp.int32)

  decay = jnp.minimum(
    config.ema_decay, (1.0 + state.step) / (10.0 + state.step)
  )
  ema_params = jax.tree.map(
    lambda e, p: e + (1.0 - decay) * (p - e), state.ema_params, params
  )

  def keep_if_finite(new, old):
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

  updated = keep_if_finite(
    (params, disc_params, opt_state, disc_opt_state, ema_params, codebooks),
    (
      state.params,
      state.disc_params,
      state.opt_state,
      state.disc_opt_state,
      state.ema_params,
      state.codebooks,
    ),
  )
  new_state = state.replace(
    step=state.step + 1,
    params=updated[0],
    disc_params=updated[1],
    opt_state=updated[2],
    disc_opt_state=updated[3],
    ema_params=updated[4],
    codebooks=updated[5],
    skipped=state.skipped + jnp.where(finite, 0, 1),
  )
  metrics = {
    **g_metrics,
    **d_metrics,
    'g/grad_norm': grad_norm,
    'd/grad_norm': disc_grad_norm,
    'g/lr': optim.learning_rate(config.generator_optimizer)(state.step),
    'd/lr': optim.learning_rate(config.discriminator_optimizer)(state.step),
    'vq/restarts': jnp.sum(restarts),
    'vq/bypassed': jnp.mean(q.bypassed.astype(jnp.float32)),
    'train/skipped': new_state.skipped,
    **_level_metrics(q.counts),
  }
  return new_state, metrics


def evaluate(
  config: StepConfig,
  params,
  wav: jax.Array,
  levels: Sequence[int],
  mesh: jax.sharding.Mesh | None = None,
) -> tuple[dict[str, jax.Array], jax.Array]:
  """Per-example mel distance and SI-SDR at each number of RVQ levels.

  Encodes once with max(levels) levels and decodes each prefix. Returns
  ({'mel_distance/<n>': [B], 'si_sdr/<n>': [B]}, reconstructions
  [len(levels), B, T', C]).
  """
  codec = codec_lib.SpectroStream(config.codec)
  codebooks = replicate(params['quantizer']['embedding'], mesh)
  variables = {'params': {**params, 'quantizer': {'embedding': codebooks}}}
  codes = codec.apply(variables, wav, max(levels), method=codec.encode)
  recs, metrics = [], {}
  for n in levels:
    rec = codec.apply(variables, codes[..., :n], method=codec.decode)
    ref = losses.align_to_reconstruction(wav, rec)
    metrics[f'mel_distance/{n}'] = losses.mel_distance(
      ref,
      rec,
      config.loss.sample_rate,
      config.loss.mel_windows,
      config.loss.mel_hops_per_window,
      config.loss.num_mels,
      config.loss.log_eps,
    )
    metrics[f'si_sdr/{n}'] = losses.si_sdr(ref, rec)
    recs.append(rec)
  return metrics, jnp.stack(recs)
