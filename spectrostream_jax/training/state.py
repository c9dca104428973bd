"""The train state: everything a GAN run carries from one step to the next.

One pytree, so it is sharded, donated, checkpointed and restored as a
whole. The random key is stored as raw key data (uint32) so that it
checkpoints like any other array; `key()` wraps it back.
"""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from spectrostream_jax.models import quantizer as rvq


class BalancerState(flax.struct.PyTreeNode):
  """Running norms of the generator terms' gradients at x̂ (losses.TERMS)."""

  norms: jax.Array  # [terms] EMA of the unweighted gradient norms
  weight: jax.Array  # [] EMA of 1: norms / weight is the bias-corrected mean


class TrainState(flax.struct.PyTreeNode):
  """Codec and discriminator parameters, their optimizers, EMAs and key."""

  step: jax.Array  # [] int32: batches consumed so far
  params: Any  # codec {'encoder', 'decoder', 'quantizer'}
  disc_params: Any  # multi-scale discriminator
  opt_state: optax.OptState
  disc_opt_state: optax.OptState
  ema_params: Any  # exponential moving average of `params`
  codebooks: rvq.CodebookState  # EMA statistics of the RVQ codebooks
  balance: BalancerState  # the gradient balancer's running norms
  rng: jax.Array  # [2] uint32 raw key data; folded with `step` each step
  skipped: jax.Array  # [] int32: updates skipped for non-finite values

  @classmethod
  def create(
    cls,
    params: Any,
    disc_params: Any,
    tx: optax.GradientTransformation,
    disc_tx: optax.GradientTransformation,
    quantizer: rvq.QuantizerConfig,
    num_terms: int,
    rng: jax.Array,
  ) -> 'TrainState':
    return cls(
      step=jnp.zeros((), jnp.int32),
      params=params,
      disc_params=disc_params,
      opt_state=tx.init(params),
      disc_opt_state=disc_tx.init(disc_params),
      ema_params=params,
      codebooks=rvq.CodebookState.create(quantizer),
      balance=BalancerState(
        norms=jnp.zeros((num_terms,), jnp.float32),
        weight=jnp.zeros((), jnp.float32),
      ),
      rng=jax.random.key_data(rng),
      skipped=jnp.zeros((), jnp.int32),
    )

  def key(self) -> jax.Array:
    return jax.random.wrap_key_data(self.rng)
