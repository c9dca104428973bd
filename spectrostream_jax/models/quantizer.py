"""Residual vector quantizer: inference, training losses and EMA codebooks.

Inference (docs/architecture.md, "Quantizer training"): level i picks the
nearest code of its own codebook to the running residual. Training (SoundStream
recipe) runs all levels on the unmasked residual chain so every level gets its
loss every step, while the decoder sees only the first n levels per example
(biased level dropout) or the continuous embedding (bypass). Codebooks learn by
EMA of assignments, are initialised by k-means (a separate program the trainer
runs once) and restart dead codes from the current batch. All statistics are
global over devices and hosts: reductions over global arrays, or per-device
partial sums reduced once after the level loop.
"""

import dataclasses
import functools
import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

# The fields that shape the codebooks; the rest say how they learn.
NETWORK_FIELDS = ('num_levels', 'codebook_size', 'dim')


@dataclasses.dataclass(frozen=True)
class QuantizerConfig:
  """RVQ shape and training behaviour; loss weights are in `losses`."""

  num_levels: int = 64
  codebook_size: int = 1024
  dim: int = 256
  # 'ema' (SoundStream) or 'gradient' (codebook loss, learned by optimizer).
  codebook_learning: str = 'ema'
  ema_decay: float = 0.99
  ema_epsilon: float = 1e-5
  # Dead codes: EMA count (assignments per step) below this fraction of
  # the count of a uniformly used code (rows per step / codebook size),
  # and not restarted within the last `restart_grace_steps` steps.
  dead_code_fraction: float = 0.25
  restart_grace_steps: int = 50
  # At most this many restarts per level and step (None: the step's rows),
  # each from a different row of the batch, plus Gaussian jitter of this
  # fraction of the candidates' RMS.
  max_restarts: int | None = None
  restart_jitter: float = 0.01
  # k-means: iterations, and the embeddings it runs on (the newest ones
  # of the warm-up, plus the batch of the step it runs at).
  kmeans_iters: int = 10
  kmeans_buffer: int = 4096
  bypass_prob: float = 0.5
  # Levels the decoder may see during training; None derives the published list.
  dropout_levels: tuple[int, ...] | None = None

  def __post_init__(self):
    if self.codebook_learning not in ('ema', 'gradient'):
      raise ValueError(
        f'codebook_learning {self.codebook_learning!r} not in (ema, gradient)'
      )
    if not 0.0 <= self.bypass_prob <= 1.0:
      raise ValueError(f'bypass_prob {self.bypass_prob} not in [0, 1]')

  def training_levels(self) -> tuple[int, ...]:
    if self.dropout_levels is not None:
      return self.dropout_levels
    return default_dropout_levels(self.num_levels)

  def restarts_per_step(self, rows: int) -> int:
    """How many codes a level may restart in a step of `rows` embeddings."""
    limit = rows if self.max_restarts is None else self.max_restarts
    return max(1, min(rows, self.codebook_size, limit))


def default_dropout_levels(num_levels: int) -> tuple[int, ...]:
  """The published list, generalised: dense to L/4, step 2 to L/2, step 4 to L.

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


def decode_prefix(
  codebooks: jax.Array, codes: jax.Array, num_levels: jax.Array
) -> jax.Array:
  """`decode` of codes[..., :num_levels], with num_levels a traced value.

  One program serves every bitrate: the levels from num_levels on are
  masked out of the sum instead of sliced off.
  """
  levels = codes.shape[-1]
  picked = jax.vmap(
    lambda cb, c: jnp.take(cb, c, axis=0), in_axes=(0, -1), out_axes=0
  )(codebooks[:levels], codes)
  used = jnp.arange(levels) < num_levels
  return jnp.sum(jnp.where(used[:, None, None, None], picked, 0.0), axis=0)


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

  def decode_prefix(self, codes: jax.Array, num_levels: jax.Array):
    return decode_prefix(self.embedding, codes, num_levels)

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

  The commitment loss counts only the examples that are not bypassed.
  Restart candidates are rows of each level's residuals, a different row
  per slot (a random permutation of the batch's rows).

  With a `mesh`, z's batch is split over `batch_axes` and each device runs
  the level loop on its own rows under `shard_map`; the statistics are
  summed over devices once, after the loop. No collective runs inside the
  loop: docs/training.md, "Collectives and the order of programs", says
  why that matters on several processes.
  """
  z = z.astype(jnp.float32)
  b, frames, dim = z.shape
  num_levels = codebooks.shape[0]
  rng_levels, rng_cand = jax.random.split(rng)
  n, bypass = sample_training_levels(rng_levels, b, config)
  rows = b * frames
  slots = config.restarts_per_step(rows)
  cand_idx = jax.vmap(lambda k: jax.random.permutation(k, rows)[:slots])(
    jax.random.split(rng_cand, num_levels)
  )
  loop = _level_loop
  shards = 1 if mesh is None else math.prod(mesh.shape[a] for a in batch_axes)
  if shards > 1:
    batch = P(batch_axes)
    loop = jax.shard_map(
      functools.partial(loop, batch_axes=batch_axes),
      mesh=mesh,
      in_specs=(P(), batch, batch, batch, P()),
      out_specs=(batch, batch, P(), P(), P(), P(), P()),
    )
  quantized, codes, commit, cb_loss, counts, sums, cands = loop(
    codebooks, z, n, bypass, cand_idx
  )
  kept = jnp.sum(~bypass).astype(jnp.float32) * frames * dim
  straight_through = z + jax.lax.stop_gradient(quantized - z)
  decoder_input = jnp.where(bypass[:, None, None], z, straight_through)
  return QuantizerOutput(
    decoder_input=decoder_input,
    codes=codes,
    num_levels=jnp.where(bypass, 0, n),
    bypassed=bypass,
    commitment=commit / jnp.maximum(kept, 1.0),
    codebook_loss=cb_loss / z.size,
    counts=counts,
    sums=sums,
    candidates=cands,
  )


def _level_loop(
  codebooks: jax.Array,
  z: jax.Array,
  n: jax.Array,
  bypass: jax.Array,
  cand_idx: jax.Array,
  batch_axes: tuple[str, ...] = (),
):
  """The level loop over this device's rows of z [b, N, D].

  Returns (quantized [b, N, D], codes [b, N, L], commitment [L],
  codebook loss [L], counts [L, K], sums [L, K, D], candidates [L, M, D]);
  the last five are global sums, of partial sums reduced over `batch_axes`
  after the loop. The commitment sums over examples that are not
  bypassed. `cand_idx` [L, M] indexes the global rows.
  """
  k = codebooks.shape[1]
  flat_rows = z.shape[0] * z.shape[1]
  first_row = 0
  if batch_axes:
    first_row = jax.lax.axis_index(batch_axes) * flat_rows
    # Per-device from here on: the gradient's sum over devices is then
    # one psum at this cast, not one per level inside the loop.
    codebooks = jax.lax.pcast(codebooks, batch_axes, to='varying')
  committed = (~bypass)[:, None, None]

  def level(carry, xs):
    residual, acc = carry
    codebook, index, cand = xs
    chain = jax.lax.stop_gradient(residual)
    code = nearest_code(chain, jax.lax.stop_gradient(codebook))
    chosen = jnp.take(codebook, code, axis=0)
    gap = jnp.square(residual - jax.lax.stop_gradient(chosen))
    commit = jnp.sum(jnp.where(committed, gap, 0.0))
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
  return quantized, jnp.moveaxis(codes, 0, -1), *partial


class CodebookState(flax.struct.PyTreeNode):
  """EMA statistics of the codebooks (per level, per code), k-means input."""

  counts: jax.Array  # [L, K] EMA of assignments per step
  sums: jax.Array  # [L, K, D] EMA of assigned residual sums
  since_restart: jax.Array  # [L, K] int32: steps since set or restarted
  buffer: jax.Array  # [R, D] newest warm-up embeddings, for k-means
  initialized: jax.Array  # [] bool: codebooks were set from data

  @classmethod
  def create(cls, config: QuantizerConfig) -> 'CodebookState':
    lk = (config.num_levels, config.codebook_size)
    return cls(
      counts=jnp.zeros(lk, jnp.float32),
      sums=jnp.zeros((*lk, config.dim), jnp.float32),
      since_restart=jnp.zeros(lk, jnp.int32),
      buffer=jnp.zeros((config.kmeans_buffer, config.dim), jnp.float32),
      initialized=jnp.zeros((), bool),
    )

  @classmethod
  def from_codebooks(
    cls, codebooks: jax.Array, rows_per_step: float, config: QuantizerConfig
  ) -> 'CodebookState':
    """Statistics for codebooks that arrive trained (a fine-tune's start).

    Every code counts as used uniformly, so none is dead before the EMA
    has seen this data (a truly unused code falls under the dead-code
    line after about ln(1 / dead_code_fraction) / (1 − ema_decay) steps).
    Gradient-learned codebooks keep no statistics.
    """
    state = cls.create(config).replace(initialized=jnp.ones((), bool))
    if config.codebook_learning != 'ema':
      return state
    counts = jnp.full(
      codebooks.shape[:2], rows_per_step / config.codebook_size, jnp.float32
    )
    return state.replace(
      counts=counts, sums=codebooks.astype(jnp.float32) * counts[..., None]
    )


def remember(state: CodebookState, z: jax.Array, step: jax.Array):
  """Writes the rows of z [B, N, D] into the ring buffer at warm-up `step`.

  Step t's rows go to positions t·rows, t·rows + 1, ... (mod the buffer
  size), so the buffer holds the newest embeddings.
  """
  rows = z.reshape(-1, z.shape[-1]).astype(jnp.float32)
  size = state.buffer.shape[0]
  keep = min(rows.shape[0], size)
  start = step * rows.shape[0] + rows.shape[0] - keep
  index = (start + jnp.arange(keep)) % size
  return state.replace(buffer=state.buffer.at[index].set(rows[-keep:]))


def ema_update(
  state: CodebookState,
  out: QuantizerOutput,
  rng: jax.Array,
  config: QuantizerConfig,
) -> tuple[jax.Array, CodebookState, jax.Array]:
  """EMA codebook step plus dead-code restarts.

  Returns (codebooks, state, restarts per level). See `QuantizerConfig`
  for the dead-code rule; the dead codes that restart (at most M per
  level, M = `config.restarts_per_step(rows)`) are a random choice among
  them, and each takes its own candidate row (`out.candidates` [L, M, D])
  plus jitter. A restarted code starts with the count of a uniformly used
  code, so it is not dead again at once.
  """
  num_levels, k = out.counts.shape
  rows = jnp.sum(out.counts[0])
  expected = rows / k
  d = config.ema_decay
  counts = d * state.counts + (1.0 - d) * out.counts
  sums = d * state.sums + (1.0 - d) * out.sums
  total = jnp.sum(counts, axis=-1, keepdims=True)
  eps = config.ema_epsilon
  smoothed = (counts + eps) / (total + k * eps) * total
  new = sums / jnp.maximum(smoothed, 1e-12)[..., None]
  since = state.since_restart + 1

  slots = out.candidates.shape[1]
  rng_order, rng_jitter = jax.random.split(rng)
  dead = (counts < config.dead_code_fraction * expected) & (
    since >= config.restart_grace_steps
  )
  priority = jnp.where(dead, jax.random.uniform(rng_order, dead.shape), 2.0)
  rank = jnp.argsort(jnp.argsort(priority, axis=-1), axis=-1)
  restart = dead & (rank < slots)
  cand = jnp.take_along_axis(
    out.candidates, jnp.minimum(rank, slots - 1)[..., None], axis=1
  )
  rms = jnp.sqrt(jnp.mean(jnp.square(out.candidates), axis=(1, 2)))
  noise = jax.random.normal(rng_jitter, cand.shape)
  cand = cand + config.restart_jitter * rms[:, None, None] * noise
  new = jnp.where(restart[..., None], cand, new)
  counts = jnp.where(restart, expected, counts)
  sums = jnp.where(restart[..., None], new * counts[..., None], sums)
  since = jnp.where(restart, 0, since)
  state = state.replace(counts=counts, sums=sums, since_restart=since)
  return new, state, jnp.sum(restart, axis=-1).astype(jnp.int32)


def active_fraction(
  state: CodebookState, rows: int, config: QuantizerConfig
) -> jax.Array:
  """Per level, the fraction of codes the dead-code rule counts as alive."""
  expected = rows / config.codebook_size
  return jnp.mean(state.counts >= config.dead_code_fraction * expected, -1)


def _kmeans_plus_plus(
  x: jax.Array, w: jax.Array, k: int, key: jax.Array
) -> jax.Array:
  """k-means++ seeding over rows with weight w > 0: new centres ∝ w·d²."""
  first_key, key = jax.random.split(key)
  logits = jnp.log(jnp.maximum(w, 1e-30))
  first = x[jax.random.categorical(first_key, logits)]
  centers = jnp.zeros((k, x.shape[-1]), x.dtype).at[0].set(first)
  d2 = jnp.sum(jnp.square(x - first), axis=-1)

  def pick(i, carry):
    centers, d2 = carry
    logits = jnp.log(jnp.maximum(w * d2, 1e-30))
    c = x[jax.random.categorical(jax.random.fold_in(key, i), logits)]
    d2 = jnp.minimum(d2, jnp.sum(jnp.square(x - c), axis=-1))
    return centers.at[i].set(c), d2

  centers, _ = jax.lax.fori_loop(1, k, pick, (centers, d2))
  return centers


def kmeans_init(
  z: jax.Array,
  rng: jax.Array,
  config: QuantizerConfig,
  weights: jax.Array | None = None,
  rows_per_step: float | None = None,
) -> tuple[jax.Array, CodebookState]:
  """Codebooks from data: k-means++ and Lloyd per level on the residuals.

  z [..., D]: the embeddings; `weights` [rows] (1 or 0) leaves rows out;
  `rows_per_step`: the EMA counts are in assignments per step of that
  many rows (default: all of z's rows).
  """
  x = z.reshape(-1, z.shape[-1]).astype(jnp.float32)
  w = jnp.ones(x.shape[:1]) if weights is None else weights.astype(jnp.float32)
  k = config.codebook_size
  rngs = jax.random.split(rng, config.num_levels)

  def level(residual, key):
    centers = _kmeans_plus_plus(residual, w, k, key)

    def lloyd(_, c):
      onehot = jax.nn.one_hot(nearest_code(residual, c), k) * w[:, None]
      cnt = onehot.sum(0)
      s = jnp.einsum('mk,md->kd', onehot, residual, precision='highest')
      return jnp.where(cnt[:, None] > 0, s / jnp.maximum(cnt, 1)[:, None], c)

    centers = jax.lax.fori_loop(0, config.kmeans_iters, lloyd, centers)
    code = nearest_code(residual, centers)
    cnt = (jax.nn.one_hot(code, k) * w[:, None]).sum(0)
    return residual - centers[code], (centers, cnt)

  _, (codebooks, counts) = jax.lax.scan(level, x, rngs)
  total = jnp.maximum(jnp.sum(w), 1.0)
  per_step = total if rows_per_step is None else rows_per_step
  counts = counts * (per_step / total)
  state = CodebookState.create(config).replace(
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
