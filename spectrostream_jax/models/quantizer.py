"""Residual vector quantizer: inference, training losses and EMA codebooks.

Inference follows SPEC §6: level i picks the nearest code of its own codebook
to the running residual. Training (SoundStream recipe) runs all levels on the
unmasked residual chain so every level gets its loss every step, while the
decoder sees only the first n levels per example (biased level dropout) or
the continuous embedding (bypass). Codebooks learn by EMA of assignments, are
initialised by k-means (a separate program the trainer runs once) and
restart dead codes from the current batch. All statistics are global over
devices and hosts: reductions over global arrays, or per-device partial
sums reduced once after the level loop.
"""

import dataclasses
import functools
import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


@dataclasses.dataclass(frozen=True)
class QuantizerConfig:
  """RVQ shape and training behaviour (SPEC defaults; loss weights: losses)."""

  num_levels: int = 64
  codebook_size: int = 1024
  dim: int = 256
  # 'ema' (SoundStream) or 'gradient' (codebook loss, learned by optimizer).
  codebook_learning: str = 'ema'
  ema_decay: float = 0.99
  ema_epsilon: float = 1e-5
  # A code whose EMA count (assignments per batch) falls below this restarts.
  dead_code_threshold: float = 1.0
  kmeans_iters: int = 10
  bypass_prob: float = 0.5
  # Levels the decoder may see during training; None derives SPEC's list.
  dropout_levels: tuple[int, ...] | None = None

  def training_levels(self) -> tuple[int, ...]:
    if self.dropout_levels is not None:
      return self.dropout_levels
    return default_dropout_levels(self.num_levels)


def default_dropout_levels(num_levels: int) -> tuple[int, ...]:
  """SPEC §6 list, generalised: dense to L/4, step 2 to L/2, step 4 to L.

  For 64 levels: 1..16, 18..32 step 2, 36..64 step 4 (half of them <= 16).
  """
  q, h = max(num_levels // 4, 1), max(num_levels // 2, 1)
  levels = list(range(1, q + 1))
  levels += range(q + 2, h + 1, 2)
  levels += range(h + 4, num_levels + 1, 4)
  if levels[-1] != num_levels:
    levels.append(num_levels)
  return tuple(levels)


def code_norms(codebook: jax.Array) -> jax.Array:
  """||c||² of every code, [..., K, D] -> [..., K]."""
  return jnp.sum(codebook * codebook, axis=-1)


def nearest_code(
  residual: jax.Array, codebook: jax.Array, sq_norms: jax.Array | None = None
) -> jax.Array:
  """Index of the nearest code (squared Euclidean) for each row, [..., D].

  `sq_norms`: `code_norms(codebook)` when the caller has it already.
  """
  # ||r||² is constant per row and does not change the argmin.
  if sq_norms is None:
    sq_norms = code_norms(codebook)
  scores = sq_norms - 2.0 * jnp.einsum(
    '...d,kd->...k', residual, codebook, precision='highest'
  )
  return jnp.argmin(scores, axis=-1).astype(jnp.int32)


def encode(
  codebooks: jax.Array,
  z: jax.Array,
  num_levels: int,
  sq_norms: jax.Array | None = None,
) -> jax.Array:
  """Codes [..., num_levels] (int32) of embeddings z [..., D].

  `sq_norms` [levels, K]: precomputed `code_norms(codebooks)`, which saves a
  pass over the codebooks when encoding one frame at a time.
  """
  if sq_norms is None:
    sq_norms = code_norms(codebooks)

  def level(residual, level_args):
    codebook, norms = level_args
    code = nearest_code(residual, codebook, norms)
    return residual - jnp.take(codebook, code, axis=0), code

  _, codes = jax.lax.scan(
    level, z, (codebooks[:num_levels], sq_norms[:num_levels])
  )
  return jnp.moveaxis(codes, 0, -1)


def decode(codebooks: jax.Array, codes: jax.Array) -> jax.Array:
  """Sum of the selected codes of the first codes.shape[-1] levels."""
  levels = codes.shape[-1]
  picked = jax.vmap(
    lambda cb, c: jnp.take(cb, c, axis=0), in_axes=(0, -1), out_axes=0
  )(codebooks[:levels], codes)
  return jnp.sum(picked, axis=0)


class ResidualVectorQuantizer(nn.Module):
  """Holds `quantizer/embedding` [levels, codebook_size, dim]."""

  config: QuantizerConfig

  def setup(self):
    c = self.config
    self.embedding = self.param(
      'embedding',
      nn.initializers.normal(stddev=1.0),
      (c.num_levels, c.codebook_size, c.dim),
      jnp.float32,
    )

  def encode(self, z: jax.Array, num_levels: int | None = None) -> jax.Array:
    n = self.config.num_levels if num_levels is None else num_levels
    return encode(self.embedding, z.astype(jnp.float32), n)

  def decode(self, codes: jax.Array) -> jax.Array:
    return decode(self.embedding, codes)

  def __call__(self, z: jax.Array, rng: jax.Array) -> 'QuantizerOutput':
    return quantize_for_training(self.embedding, z, rng, self.config)


@flax.struct.dataclass
class QuantizerOutput:
  """What one training forward pass of the RVQ produces."""

  decoder_input: jax.Array  # [B, N, D] what the decoder sees
  codes: jax.Array  # [B, N, L] all levels, unmasked chain
  num_levels: jax.Array  # [B] levels the decoder saw (0 when bypassed)
  bypassed: jax.Array  # [B] bool
  commitment: jax.Array  # [L] per-level ||r - sg(e)||² means
  codebook_loss: jax.Array  # [L] per-level ||sg(r) - e||² means
  counts: jax.Array  # [L, K] assignments in this batch
  sums: jax.Array  # [L, K, D] sum of residuals assigned to each code
  candidates: jax.Array  # [L, K, D] random residuals, for dead-code restart


def sample_training_levels(
  rng: jax.Array, batch: int, config: QuantizerConfig
) -> tuple[jax.Array, jax.Array]:
  """Per example: levels n the decoder sees, and whether RVQ is bypassed."""
  rng_n, rng_b = jax.random.split(rng)
  choices = jnp.asarray(config.training_levels(), jnp.int32)
  n = jax.random.choice(rng_n, choices, (batch,))
  bypass = jax.random.bernoulli(rng_b, config.bypass_prob, (batch,))
  return n, bypass


def quantize_for_training(
  codebooks: jax.Array,
  z: jax.Array,
  rng: jax.Array,
  config: QuantizerConfig,
  mesh: jax.sharding.Mesh | None = None,
  batch_axes: tuple[str, ...] = (),
) -> QuantizerOutput:
  """Runs all levels on the unmasked chain; see the module docstring.

  With a `mesh`, z's batch is split over `batch_axes` and each device runs
  the level loop on its own rows under `shard_map`; the statistics are
  summed over devices once, after the loop. No collective runs inside the
  loop: docs/training.md, "Collectives and the order of programs", says
  why that matters on several processes.
  """
  z = z.astype(jnp.float32)
  b = z.shape[0]
  num_levels, k = codebooks.shape[:2]
  rng_levels, rng_cand = jax.random.split(rng)
  n, bypass = sample_training_levels(rng_levels, b, config)
  rows = z.reshape(-1, z.shape[-1]).shape[0]
  cand_idx = jax.random.randint(rng_cand, (num_levels, k), 0, rows)
  loop = functools.partial(_level_loop, elements=z.size)
  shards = 1 if mesh is None else math.prod(mesh.shape[a] for a in batch_axes)
  if shards > 1:
    batch = P(batch_axes)
    loop = jax.shard_map(
      functools.partial(loop, batch_axes=batch_axes),
      mesh=mesh,
      in_specs=(P(), batch, batch, P()),
      out_specs=(batch, batch, P(), P(), P(), P(), P()),
    )
  quantized, codes, commit, cb_loss, counts, sums, cands = loop(
    codebooks, z, n, cand_idx
  )
  straight_through = z + jax.lax.stop_gradient(quantized - z)
  decoder_input = jnp.where(bypass[:, None, None], z, straight_through)
  return QuantizerOutput(
    decoder_input=decoder_input,
    codes=codes,
    num_levels=jnp.where(bypass, 0, n),
    bypassed=bypass,
    commitment=commit,
    codebook_loss=cb_loss,
    counts=counts,
    sums=sums,
    candidates=cands,
  )


def _level_loop(
  codebooks: jax.Array,
  z: jax.Array,
  n: jax.Array,
  cand_idx: jax.Array,
  elements: int,
  batch_axes: tuple[str, ...] = (),
):
  """The level loop over this device's rows of z [b, N, D].

  Returns (quantized [b, N, D], codes [b, N, L], commitment [L],
  codebook loss [L], counts [L, K], sums [L, K, D], candidates [L, K, D]);
  the last five are global: partial sums reduced over `batch_axes` after
  the loop. `cand_idx` [L, K] indexes the global rows; `elements` is the
  global size of z.
  """
  k = codebooks.shape[1]
  flat_rows = z.shape[0] * z.shape[1]
  first_row = 0
  if batch_axes:
    first_row = jax.lax.axis_index(batch_axes) * flat_rows
    # Per-device from here on: the gradient's sum over devices is then
    # one psum at this cast, not one per level inside the loop.
    codebooks = jax.lax.pcast(codebooks, batch_axes, to='varying')

  def level(carry, xs):
    residual, acc = carry
    codebook, index, cand = xs
    chain = jax.lax.stop_gradient(residual)
    code = nearest_code(chain, jax.lax.stop_gradient(codebook))
    chosen = jnp.take(codebook, code, axis=0)
    commit = jnp.sum(jnp.square(residual - jax.lax.stop_gradient(chosen)))
    cb_loss = jnp.sum(jnp.square(chain - chosen))
    keep = (index < n)[:, None, None]
    acc = acc + jnp.where(keep, jax.lax.stop_gradient(chosen), 0.0)
    onehot = jax.nn.one_hot(code.reshape(-1), k, dtype=jnp.float32)
    flat = chain.reshape(-1, chain.shape[-1])
    local = cand - first_row
    mine = (local >= 0) & (local < flat_rows)
    picked = jnp.take(flat, jnp.clip(local, 0, flat_rows - 1), axis=0)
    stats = (
      onehot.sum(0),
      jnp.einsum('mk,md->kd', onehot, flat, precision='highest'),
      jnp.where(mine[:, None], picked, 0.0),
    )
    residual = residual - jax.lax.stop_gradient(chosen)
    return (residual, acc), (code, commit, cb_loss, *stats)

  levels = jnp.arange(codebooks.shape[0])
  (_, quantized), (codes, *partial) = jax.lax.scan(
    level, (z, jnp.zeros_like(z)), (codebooks, levels, cand_idx)
  )
  if batch_axes:
    partial = jax.lax.psum(partial, batch_axes)
  commit, cb_loss, counts, sums, cands = partial
  return (
    quantized,
    jnp.moveaxis(codes, 0, -1),
    commit / elements,
    cb_loss / elements,
    counts,
    sums,
    cands,
  )


class CodebookState(flax.struct.PyTreeNode):
  """EMA statistics of the codebooks (per level, per code)."""

  counts: jax.Array  # [L, K] EMA of assignments per batch
  sums: jax.Array  # [L, K, D] EMA of assigned residual sums
  initialized: jax.Array  # [] bool: codebooks were set from data

  @classmethod
  def create(cls, config: QuantizerConfig) -> 'CodebookState':
    lk = (config.num_levels, config.codebook_size)
    return cls(
      counts=jnp.zeros(lk, jnp.float32),
      sums=jnp.zeros((*lk, config.dim), jnp.float32),
      initialized=jnp.zeros((), bool),
    )


def ema_update(
  state: CodebookState,
  out: QuantizerOutput,
  config: QuantizerConfig,
) -> tuple[jax.Array, CodebookState, jax.Array]:
  """EMA codebook step plus dead-code restart; returns restarts per level."""
  d = config.ema_decay
  counts = d * state.counts + (1.0 - d) * out.counts
  sums = d * state.sums + (1.0 - d) * out.sums
  total = jnp.sum(counts, axis=-1, keepdims=True)
  k = counts.shape[-1]
  eps = config.ema_epsilon
  smoothed = (counts + eps) / (total + k * eps) * total
  new = sums / jnp.maximum(smoothed, 1e-12)[..., None]
  dead = counts < config.dead_code_threshold
  new = jnp.where(dead[..., None], out.candidates, new)
  # A restarted code starts with the threshold's worth of evidence.
  counts = jnp.where(dead, config.dead_code_threshold, counts)
  sums = jnp.where(dead[..., None], new * counts[..., None], sums)
  state = CodebookState(counts=counts, sums=sums, initialized=state.initialized)
  return new, state, jnp.sum(dead, axis=-1).astype(jnp.int32)


def _kmeans_plus_plus(x: jax.Array, k: int, key: jax.Array) -> jax.Array:
  """k-means++ seeding: each new centre drawn with probability ∝ d²."""
  first_key, key = jax.random.split(key)
  first = x[jax.random.randint(first_key, (), 0, x.shape[0])]
  centers = jnp.zeros((k, x.shape[-1]), x.dtype).at[0].set(first)
  d2 = jnp.sum(jnp.square(x - first), axis=-1)

  def pick(i, carry):
    centers, d2 = carry
    logits = jnp.log(jnp.maximum(d2, 1e-30))
    c = x[jax.random.categorical(jax.random.fold_in(key, i), logits)]
    d2 = jnp.minimum(d2, jnp.sum(jnp.square(x - c), axis=-1))
    return centers.at[i].set(c), d2

  centers, _ = jax.lax.fori_loop(1, k, pick, (centers, d2))
  return centers


def kmeans_init(
  z: jax.Array, rng: jax.Array, config: QuantizerConfig
) -> tuple[jax.Array, CodebookState]:
  """Codebooks from data: k-means++ and Lloyd per level on the residuals."""
  x = z.reshape(-1, z.shape[-1]).astype(jnp.float32)
  k = config.codebook_size
  rngs = jax.random.split(rng, config.num_levels)

  def level(residual, key):
    centers = _kmeans_plus_plus(residual, k, key)

    def lloyd(_, c):
      onehot = jax.nn.one_hot(nearest_code(residual, c), k)
      cnt = onehot.sum(0)
      s = jnp.einsum('mk,md->kd', onehot, residual, precision='highest')
      return jnp.where(cnt[:, None] > 0, s / jnp.maximum(cnt, 1)[:, None], c)

    centers = jax.lax.fori_loop(0, config.kmeans_iters, lloyd, centers)
    code = nearest_code(residual, centers)
    cnt = jax.nn.one_hot(code, k).sum(0)
    return residual - centers[code], (centers, cnt)

  _, (codebooks, counts) = jax.lax.scan(level, x, rngs)
  state = CodebookState(
    counts=counts,
    sums=codebooks * counts[..., None],
    initialized=jnp.ones((), bool),
  )
  return codebooks, state


def codebook_metrics(counts: jax.Array) -> dict[str, jax.Array]:
  """Per-level usage (fraction of codes hit) and perplexity of assignments."""
  p = counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1e-9)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(p), 0.0), axis=-1)
  return {
    'usage': jnp.mean(counts > 0, axis=-1),
    'perplexity': jnp.exp(entropy),
  }
