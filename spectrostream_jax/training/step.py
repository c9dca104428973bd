"""The training steps of SpectroStream, and the in-loop evaluation.

Pure functions of (config, state, batch): `train.py` jits them with
shardings and runs them in this order (docs/training.md, "The recipe"):

1. `train_step(..., warmup=True)` for the first `warmup_steps` steps: the
   codec as an autoencoder (RVQ bypassed) on the reconstruction terms only;
   the discriminators are not run. Each step's embeddings go to the k-means
   buffer.
2. `init_codebooks` once: k-means on the buffer and the current batch.
3. `train_step` from then on, the GAN step. Both networks are updated from
   the same forward pass (simultaneous updates, both losses see the
   discriminators as they were at the start of the step):

   a. codec forward: reconstruction x̂ of the input's aligned prefix x,
      both without their first `LossConfig.skip_samples` samples;
   b. discriminators on x and on x̂, once each; the generator loss and the
      discriminator hinge loss are functions of those outputs;
   c. gradients by hand-wired VJPs: the discriminator pass on x̂ is
      differentiated twice, w.r.t. its input under the generator loss and
      w.r.t. its parameters under the discriminator loss (which is what
      running it on stop_gradient(x̂) gives), so the discriminators run
      forward on 2B examples per step instead of the 4B of separate passes;
      with `LossConfig.balancer` each term's gradient at x̂ is rescaled
      first;
   d. the RVQ codebooks follow their EMA with dead-code restarts, the
      optimizers step, the codec parameters' EMA follows (the codebooks are
      copied into it, not averaged).

In every step, if any loss or gradient is not finite, nothing but the step
counter changes and `skipped` counts it. `gradient_norms` measures what
each generator term contributes to the gradient at x̂ (a diagnostic the
trainer logs). The key is `fold_in(state.rng, state.step)`, so a step's
randomness depends only on the run's seed and the step number. With a
`mesh`, the batch is split over its `sharding.BATCH_AXES` and every STFT,
inverse STFT and spectral loss runs on the device that holds the example
(`signal.per_device`): XLA would otherwise gather the whole batch for
each FFT on every device.
"""

from collections.abc import Sequence
import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from spectrostream_jax import losses
from spectrostream_jax import precision
from spectrostream_jax.models import codec as codec_lib
from spectrostream_jax.models import discriminator as disc_lib
from spectrostream_jax.models import quantizer as rvq
from spectrostream_jax.training import optim
from spectrostream_jax.training import sharding
from spectrostream_jax.training import state as train_state
from spectrostream_jax.training import trainable as trainable_lib


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Everything the steps compute with (hashable: a static jit argument)."""

  codec: codec_lib.CodecConfig = codec_lib.CodecConfig()
  discriminator: disc_lib.DiscriminatorConfig = disc_lib.DiscriminatorConfig()
  loss: losses.LossConfig = losses.LossConfig()
  generator_optimizer: optim.OptimizerConfig = optim.OptimizerConfig()
  discriminator_optimizer: optim.OptimizerConfig = optim.OptimizerConfig()
  # Decay of the codec parameters' EMA, ramped up as (1 + t) / (10 + t).
  ema_decay: float = 0.999
  # Reconstruction-only steps before k-means and the GAN (see the module
  # docstring); 0 starts the GAN at step 1 with k-means on its batch.
  warmup_steps: int = 0
  # The codec parameters that learn (`trainable` module): set from
  # `train.trainable`; 'all' trains everything.
  trainable: str = trainable_lib.ALL
  # Precision of the float32 products (`precision.MODES`); the hardware
  # gin files bind it (docs/precision.md).
  matmul_precision: str = precision.DEFAULT

  def __post_init__(self):
    if self.discriminator.num_channels != self.codec.num_channels:
      raise ValueError('codec and discriminator channel counts differ')
    if self.loss.mel.sample_rate != self.codec.sample_rate:
      raise ValueError('loss and codec sample rates differ')
    if self.warmup_steps < 0:
      raise ValueError('warmup_steps must be >= 0')
    trainable_lib.parse(self.trainable)
    precision.check(self.matmul_precision)

  @property
  def ema_codebooks(self) -> bool:
    return self.codec.quantizer.codebook_learning == 'ema'

  @property
  def trainable_parts(self) -> tuple[str, ...]:
    return trainable_lib.parse(self.trainable)

  @property
  def learns_codebooks(self) -> bool:
    return trainable_lib.learns(EMA_CODEBOOK, self.trainable_parts)

  def frozen(self, path: str) -> bool:
    """Does the optimizer leave the codec parameter at `path` alone?"""
    if self.ema_codebooks and path == EMA_CODEBOOK:
      return True
    return not trainable_lib.learns(path, self.trainable_parts)


# Parameters the generator optimizer leaves alone when codebooks are EMA.
EMA_CODEBOOK = 'quantizer/embedding'


def _at_config_precision(fn):
  """Traces `fn(config, ...)` at `config.matmul_precision`."""

  @functools.wraps(fn)
  def run(config: StepConfig, *args, **kwargs):
    return precision.traced(fn, config.matmul_precision)(
      config, *args, **kwargs
    )

  return run


def optimizers(
  config: StepConfig,
) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
  """(codec optimizer, discriminator optimizer)."""
  everything_learns = not (config.ema_codebooks or config.trainable_parts)
  return (
    optim.make(
      config.generator_optimizer, None if everything_learns else config.frozen
    ),
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
    len(losses.TERMS),
    rng,
  )


def split_batch(
  mesh: jax.sharding.Mesh | None,
) -> jax.sharding.NamedSharding | None:
  """The batch's sharding over `mesh`, for the shard-local transforms."""
  return None if mesh is None else sharding.batch_sharding(mesh)


def split_like_batch(x, split: jax.sharding.NamedSharding | None):
  """x split by example like the batch (`split_batch`; None: a no-op).

  Left free, the warm-up's embeddings lead XLA to compute the decoder's
  first weight gradients from the whole batch, gathered on every device.
  """
  return x if split is None else jax.lax.with_sharding_constraint(x, split)


def replicate(x, mesh: jax.sharding.Mesh | None):
  """The arrays of x on every device of `mesh` (a no-op without one).

  Loops that read x (the RVQ's level loop, k-means) then need no
  collective.
  """
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, sharding.replicated(mesh))


@_at_config_precision
def init_codebooks(
  config: StepConfig,
  state: train_state.TrainState,
  batch: dict[str, jax.Array],
  mesh: jax.sharding.Mesh | None = None,
) -> train_state.TrainState:
  """k-means codebooks from the warm-up's embeddings and this batch's.

  The trainer runs this once, as its own program, before the first GAN
  step. The buffer holds the newest `min(kmeans_buffer, warm-up steps ×
  rows)` embeddings; the EMA counts are in assignments per step of this
  batch's size. Live and EMA parameters get the same codebooks.
  """
  codec = codec_lib.SpectroStream(
    config.codec, batch_sharding=split_batch(mesh)
  )
  qc = config.codec.quantizer
  emb = codec.apply(
    {'params': state.params}, batch['audio'], method=codec.embed
  )
  rows = emb.shape[0] * emb.shape[1]
  buffer = state.codebooks.buffer
  filled = jnp.minimum(state.step * rows, buffer.shape[0])
  data = jnp.concatenate([buffer, emb.reshape(rows, -1)])
  weights = jnp.concatenate(
    [jnp.arange(buffer.shape[0]) < filled, jnp.ones(rows, bool)]
  )
  rng = jax.random.split(jax.random.fold_in(state.key(), state.step))[1]
  codebook, codebooks = rvq.kmeans_init(
    replicate(data, mesh), rng, qc, replicate(weights, mesh), rows
  )
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


def term_cotangents(
  loss: losses.LossConfig, ref, rec, real, fake, to_rec, batch_sharding=None
) -> dict[str, jax.Array]:
  """Each weighted generator term's gradient at x̂, {term: [B, T, C]}.

  `fake` None: the reconstruction terms only. The discriminator terms go
  back to x̂ through `to_rec` (the VJP of the pass on x̂ w.r.t. its input)
  one at a time: vmapped, the convolutions fold the terms into the batch
  axis, which XLA can only do to a batch split over devices by gathering
  it. `batch_sharding`: see `losses.generator_losses`.
  """
  weights = loss.weights()

  def recon(r):
    return losses.reconstruction_losses(loss, ref, r, batch_sharding)

  out = {}
  for name in recon(rec):
    if weights[name]:
      out[name] = jax.grad(lambda r, n=name: weights[n] * recon(r)[n])(rec)
  if fake is None:
    return out
  names = [n for n in ('feat', 'adv') if weights[n]]
  if names:

    def term(fake, name):
      return weights[name] * losses.adversarial_losses(loss, real, fake)[name]

    for name in names:
      out[name] = to_rec(jax.grad(functools.partial(term, name=name))(fake))
  return out


def _norm(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(x)))


def _grad_metrics(cts: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """`g/grad/<term>`: norms of the weighted terms' gradients at x̂, and of
  their sum."""
  metrics = {f'g/grad/{name}': _norm(ct) for name, ct in cts.items()}
  metrics['g/grad/total'] = _norm(sum(cts.values()))
  return metrics


def _balanced(
  loss: losses.LossConfig,
  cts: dict[str, jax.Array],
  balance: train_state.BalancerState,
) -> tuple[dict[str, jax.Array], train_state.BalancerState]:
  """EnCodec's balancer: term t's part of the gradient at x̂ is
  (w_t / Σw) · g_t / ‖g_t‖, with ‖g_t‖ a running norm.

  g_t is term t's unweighted gradient at x̂; its norm is a bias-corrected
  running mean (decay `loss.balancer_decay`). Returns each term's part
  (their sum is the cotangent of x̂) and the updated running norms.
  """
  weights = loss.weights()
  current = jnp.stack(
    [
      _norm(cts[name]) / weights[name] if name in cts else 0.0
      for name in losses.TERMS
    ]
  )
  d = loss.balancer_decay
  balance = train_state.BalancerState(
    norms=d * balance.norms + (1.0 - d) * current,
    weight=d * balance.weight + (1.0 - d),
  )
  return _balanced_parts(loss, cts, balance), balance


def _balanced_parts(
  loss: losses.LossConfig,
  cts: dict[str, jax.Array],
  balance: train_state.BalancerState,
) -> dict[str, jax.Array]:
  """Each weighted term's gradient rescaled by 1 / (Σw · running ‖g_t‖)."""
  mean = balance.norms / jnp.maximum(balance.weight, 1e-12)
  total_weight = sum(loss.weights()[name] for name in cts)
  return {
    name: cts[name] / (total_weight * jnp.maximum(mean[i], 1e-12))
    for i, name in enumerate(losses.TERMS)
    if name in cts
  }


def _shares(cts: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """`g/share/<term>`: each term's gradient norm over the sum of the norms."""
  norms = {name: _norm(ct) for name, ct in cts.items()}
  total = sum(norms.values())
  return {f'g/share/{name}': n / total for name, n in norms.items()}


@_at_config_precision
def train_step(
  config: StepConfig,
  state: train_state.TrainState,
  batch: dict[str, jax.Array],
  mesh: jax.sharding.Mesh | None = None,
  warmup: bool = False,
) -> tuple[train_state.TrainState, dict[str, jax.Array]]:
  """One update on `batch['audio']` [B, T, C]: a GAN step, or a warm-up one.

  `mesh`: the batch is split over its `sharding.BATCH_AXES`; the RVQ's
  level loop then runs per device (see `quantizer.quantize_for_training`).
  `warmup`: the reconstruction-only step of the module docstring.
  """
  split = split_batch(mesh)
  codec = codec_lib.SpectroStream(config.codec, batch_sharding=split)
  disc = disc_lib.MultiScaleSTFTDiscriminator(config.discriminator, split)
  tx, disc_tx = optimizers(config)
  loss, qc = config.loss, config.codec.quantizer
  wav = batch['audio']
  rng_quantizer, rng_codebooks = jax.random.split(
    jax.random.fold_in(state.key(), state.step)
  )

  parts = config.trainable_parts

  # Codec forward; the RVQ losses are outputs so their gradients flow back.
  def generate(params):
    variables = {'params': trainable_lib.stop_frozen(params, parts)}
    emb = codec.apply(variables, wav, method=codec.embed)
    if warmup:
      q = None
      decoder_input = split_like_batch(emb, split)
      zeros = jnp.zeros((qc.num_levels,))
      vq_losses = (zeros, zeros)
    else:
      codebooks = replicate(variables['params']['quantizer']['embedding'], mesh)
      q = rvq.quantize_for_training(
        codebooks, emb, rng_quantizer, qc, mesh, sharding.BATCH_AXES
      )
      decoder_input = q.decoder_input
      vq_losses = (q.commitment, q.codebook_loss)
    rec = codec.apply(variables, decoder_input, method=codec.decode_embeddings)
    ref, rec = losses.trim(wav, rec, loss.skip_samples)
    return (rec, *vq_losses), (emb, q, ref)

  (rec, commitment, codebook_loss), codec_vjp, (emb, q, ref) = jax.vjp(
    generate, state.params, has_aux=True
  )

  metrics = {}
  disc_params, disc_opt_state = state.disc_params, state.disc_opt_state
  balance = state.balance
  if warmup:
    g_metrics = losses.generator_losses(
      loss, ref, rec, None, None, batch_sharding=split
    )[1]
    cts = term_cotangents(loss, ref, rec, None, None, None, split)
    ct_rec = sum(cts.values())
    ct_vq = (jnp.zeros_like(commitment), jnp.zeros_like(codebook_loss))
    metrics.update(_grad_metrics(cts))
    disc_grad_norm = jnp.zeros(())
  else:

    def discriminate(disc_params, x):
      return disc.apply({'params': disc_params}, x)

    real, real_vjp = jax.vjp(lambda p: discriminate(p, ref), state.disc_params)
    fake, fake_vjp = jax.vjp(discriminate, state.disc_params, rec)

    def generator_loss(fake, rec, commitment, codebook_loss):
      out = q.replace(commitment=commitment, codebook_loss=codebook_loss)
      return losses.generator_losses(loss, ref, rec, real, fake, out, split)

    if loss.balancer:
      g_metrics = generator_loss(fake, rec, commitment, codebook_loss)[1]
      cts = term_cotangents(
        loss, ref, rec, real, fake, lambda ct: fake_vjp(ct)[1], split
      )
      parts, balance = _balanced(loss, cts, state.balance)
      ct_rec = sum(parts.values())
      metrics.update(_grad_metrics(cts))
      # What the codec receives: the shares the balancer aims at.
      metrics.update(_shares(parts))
      ct_vq = (
        jnp.full_like(commitment, loss.commitment_weight),
        jnp.full_like(codebook_loss, loss.codebook_weight),
      )
    else:
      g_cts, g_metrics = jax.grad(generator_loss, (0, 1, 2, 3), has_aux=True)(
        fake, rec, commitment, codebook_loss
      )
      ct_fake, ct_rec, *ct_vq = g_cts
      ct_rec = ct_rec + fake_vjp(ct_fake)[1]

    (ct_real, ct_fake), d_metrics = jax.grad(
      losses.discriminator_loss, (0, 1), has_aux=True
    )(real, fake)
    metrics.update(d_metrics)
    disc_grads = optax.tree.add(real_vjp(ct_real)[0], fake_vjp(ct_fake)[0])
    disc_grad_norm = optax.tree.norm(disc_grads)
    disc_updates, disc_opt_state = disc_tx.update(
      disc_grads, state.disc_opt_state, state.disc_params
    )
    disc_params = optax.apply_updates(state.disc_params, disc_updates)

  (grads,) = codec_vjp((ct_rec, *ct_vq))
  grad_norm = optax.tree.norm(grads)
  finite = jnp.all(
    jnp.isfinite(jnp.stack([g_metrics['g/total'], grad_norm, disc_grad_norm]))
  )
  if not warmup:
    finite = finite & jnp.isfinite(metrics['d/loss'])

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = trainable_lib.keep_frozen(
    optax.apply_updates(state.params, updates), state.params, parts
  )

  rows = emb.shape[0] * emb.shape[1]
  if warmup:
    codebooks = rvq.remember(state.codebooks, replicate(emb, mesh), state.step)
  elif config.ema_codebooks and config.learns_codebooks:
    # Until `init_codebooks` has run, the codebooks stay as they are.
    codebook, codebooks, restarts = rvq.ema_update(
      state.codebooks, q, rng_codebooks, qc
    )
    ready = state.codebooks.initialized
    codebook = jnp.where(ready, codebook, params['quantizer']['embedding'])
    codebooks = jax.tree.map(
      lambda new, old: jnp.where(ready, new, old), codebooks, state.codebooks
    )
    restarts = jnp.where(ready, restarts, 0)
    params = {**params, 'quantizer': {'embedding': codebook}}
    metrics.update(_per_level('restarts', restarts))
    metrics['vq/restarts'] = jnp.sum(restarts)
    metrics.update(
      _per_level('active', rvq.active_fraction(codebooks, rows, qc))
    )
  else:
    codebooks = state.codebooks

  decay = jnp.minimum(
    config.ema_decay, (1.0 + state.step) / (10.0 + state.step)
  )
  ema_params = trainable_lib.keep_frozen(
    jax.tree.map(
      lambda e, p: e + (1.0 - decay) * (p - e), state.ema_params, params
    ),
    state.ema_params,
    parts,
  )

  def keep_if_finite(new, old):
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

  updated = keep_if_finite(
    (
      params,
      disc_params,
      opt_state,
      disc_opt_state,
      ema_params,
      codebooks,
      balance,
    ),
    (
      state.params,
      state.disc_params,
      state.opt_state,
      state.disc_opt_state,
      state.ema_params,
      state.codebooks,
      state.balance,
    ),
  )
  ema_params = updated[4]
  if config.ema_codebooks:
    # The codebooks the decoder was trained with, not an average of them
    # (the same value, not a recomputation XLA might round differently).
    ema_params = {**ema_params, 'quantizer': updated[0]['quantizer']}
  new_state = state.replace(
    step=state.step + 1,
    params=updated[0],
    disc_params=updated[1],
    opt_state=updated[2],
    disc_opt_state=updated[3],
    ema_params=ema_params,
    codebooks=updated[5],
    balance=updated[6],
    skipped=state.skipped + jnp.where(finite, 0, 1),
  )
  metrics.update(g_metrics)
  metrics.update(
    {
      'g/grad_norm': grad_norm,
      'g/lr': optim.learning_rate(config.generator_optimizer)(state.step),
      'train/skipped': new_state.skipped,
    }
  )
  if not warmup:
    metrics.update(
      {
        'd/grad_norm': disc_grad_norm,
        'd/lr': optim.learning_rate(config.discriminator_optimizer)(state.step),
        'vq/bypassed': jnp.mean(q.bypassed.astype(jnp.float32)),
        **_level_metrics(q.counts),
      }
    )
  return new_state, metrics


@_at_config_precision
def gradient_norms(
  config: StepConfig,
  state: train_state.TrainState,
  batch: dict[str, jax.Array],
  mesh: jax.sharding.Mesh | None = None,
  warmup: bool = False,
) -> dict[str, jax.Array]:
  """What each generator term contributes to the gradient at x̂.

  The step's forward pass on `batch` (same key, same RVQ draws), then
  `g/grad/<term>`: the norm of the weighted term's gradient at x̂ over the
  batch, `g/grad/total`: the norm of their sum, and `g/share/<term>`:
  each norm over the sum of the norms (with `LossConfig.balancer`, of the
  balanced parts the codec receives). Read with docs/training.md.
  """
  split = split_batch(mesh)
  codec = codec_lib.SpectroStream(config.codec, batch_sharding=split)
  disc = disc_lib.MultiScaleSTFTDiscriminator(config.discriminator, split)
  loss, qc = config.loss, config.codec.quantizer
  wav = batch['audio']
  rng_quantizer = jax.random.split(jax.random.fold_in(state.key(), state.step))[
    0
  ]
  variables = {'params': state.params}
  emb = codec.apply(variables, wav, method=codec.embed)
  decoder_input = emb
  if not warmup:
    codebooks = replicate(state.params['quantizer']['embedding'], mesh)
    decoder_input = rvq.quantize_for_training(
      codebooks, emb, rng_quantizer, qc, mesh, sharding.BATCH_AXES
    ).decoder_input
  rec = codec.apply(variables, decoder_input, method=codec.decode_embeddings)
  ref, rec = losses.trim(wav, rec, loss.skip_samples)
  real = fake = to_rec = None
  if not warmup:

    def discriminate(x):
      return disc.apply({'params': state.disc_params}, x)

    real = discriminate(ref)
    fake, fake_vjp = jax.vjp(discriminate, rec)

    def to_rec(ct):
      return fake_vjp(ct)[0]

  cts = term_cotangents(loss, ref, rec, real, fake, to_rec, split)
  metrics = _grad_metrics(cts)
  if loss.balancer and not warmup:
    # The balancer's rescaling with the state's running norms: the shares
    # of the gradient the codec would receive.
    metrics.update(_shares(_balanced_parts(loss, cts, state.balance)))
  else:
    metrics.update(_shares(cts))
  return metrics


def _per_level(name: str, values: jax.Array) -> dict[str, jax.Array]:
  return {f'vq/{name}/L{i:02d}': values[i] for i in range(values.shape[0])}


def _level_metrics(counts: jax.Array) -> dict[str, jax.Array]:
  stats = rvq.codebook_metrics(counts)
  out = {}
  for name, values in stats.items():
    out.update(_per_level(name, values))
  return out


@_at_config_precision
def evaluate(
  config: StepConfig,
  params,
  wav: jax.Array,
  levels: Sequence[int],
  mesh: jax.sharding.Mesh | None = None,
) -> tuple[dict[str, jax.Array], jax.Array, jax.Array]:
  """Per-example mel distance and SI-SDR at each number of RVQ levels.

  Encodes once with max(levels) levels and decodes each prefix; metrics
  leave out the first `skip_samples` like the losses. Returns
  ({'mel_distance/<n>': [B], 'si_sdr/<n>': [B]}, reconstructions
  [len(levels), B, T', C], code counts [max(levels), K] of the batch).
  """
  split = split_batch(mesh)
  codec = codec_lib.SpectroStream(config.codec, batch_sharding=split)
  codebooks = replicate(params['quantizer']['embedding'], mesh)
  variables = {'params': {**params, 'quantizer': {'embedding': codebooks}}}
  codes = codec.apply(variables, wav, max(levels), method=codec.encode)
  k = config.codec.quantizer.codebook_size
  flat = codes.reshape(-1, codes.shape[-1])
  counts = (
    jnp.zeros((flat.shape[1], k))
    .at[jnp.arange(flat.shape[1])[None, :], flat]
    .add(1.0)
  )
  recs, metrics = [], {}
  for n in levels:
    rec = codec.apply(variables, codes[..., :n], method=codec.decode)
    ref, trimmed = losses.trim(wav, rec, config.loss.skip_samples)
    metrics[f'mel_distance/{n}'] = losses.mel_distance(
      ref, trimmed, config.loss.mel, split
    )
    metrics[f'si_sdr/{n}'] = losses.si_sdr(ref, trimmed)
    recs.append(rec)
  return metrics, jnp.stack(recs), counts
