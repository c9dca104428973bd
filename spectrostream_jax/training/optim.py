"""Optimizers of the generator and the discriminators: Adam, schedule, clip.

One frozen `OptimizerConfig` per network (the published defaults of
docs/training.md: Adam, lr 1e-4, β = (0.5, 0.9), constant rate). `make` turns
it into an optax transformation; parameters it is told are frozen get no
update and no optimizer state (the EMA-learned RVQ codebooks, which the train
step overwrites with their EMA estimate every step, and the parts a fine-tune
leaves out of `train.trainable`).
"""

from collections.abc import Callable
import dataclasses

import jax
import optax

SCHEDULES = ('constant', 'cosine', 'linear')


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Adam(W) with warm-up, an optional decay and global-norm clipping."""

  learning_rate: float = 1e-4
  b1: float = 0.5
  b2: float = 0.9
  eps: float = 1e-8
  # Decoupled weight decay (AdamW); 0 is plain Adam.
  weight_decay: float = 0.0
  # Linear ramp from 0 over this many steps.
  warmup_steps: int = 0
  # After warm-up: 'constant', or 'cosine' / 'linear' decay to
  # learning_rate × final_fraction at step decay_steps.
  schedule: str = 'constant'
  decay_steps: int = 0
  final_fraction: float = 0.0
  # Clip the gradient's global norm to this; None does not clip.
  clip_norm: float | None = None

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f'schedule {self.schedule!r} not in {SCHEDULES}')
    if self.schedule != 'constant' and self.decay_steps <= self.warmup_steps:
      raise ValueError(
        f'a {self.schedule} schedule needs decay_steps > warmup_steps'
      )


def learning_rate(config: OptimizerConfig) -> optax.Schedule:
  """The learning rate as a function of the step."""
  peak = config.learning_rate
  if config.schedule == 'constant':
    after = optax.constant_schedule(peak)
  else:
    steps = config.decay_steps - config.warmup_steps
    end = peak * config.final_fraction
    if config.schedule == 'cosine':
      after = optax.cosine_decay_schedule(peak, steps, config.final_fraction)
    else:
      after = optax.linear_schedule(peak, end, steps)
  if not config.warmup_steps:
    return after
  warmup = optax.linear_schedule(0.0, peak, config.warmup_steps)
  return optax.join_schedules([warmup, after], [config.warmup_steps])


def path_str(path: tuple) -> str:
  """'/'-joined names of a pytree key path (dict keys, attributes, indices)."""
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      parts.append(key.name)
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    else:
      parts.append(str(key))
  return '/'.join(parts)


def make(
  config: OptimizerConfig, frozen: Callable[[str], bool] | None = None
) -> optax.GradientTransformation:
  """The optimizer; leaves whose '/'-joined path is `frozen` do not move."""
  chain = []
  if config.clip_norm is not None:
    chain.append(optax.clip_by_global_norm(config.clip_norm))
  chain.append(
    optax.adamw(
      learning_rate(config),
      b1=config.b1,
      b2=config.b2,
      eps=config.eps,
      weight_decay=config.weight_decay,
    )
  )
  tx = optax.chain(*chain)
  if not frozen:
    return tx

  def labels(params):
    return jax.tree_util.tree_map_with_path(
      lambda path, _: 'frozen' if frozen(path_str(path)) else 'train',
      params,
    )

  return optax.multi_transform(
    {'train': tx, 'frozen': optax.set_to_zero()}, labels
  )
