"""Checkpoints of a training run: Orbax, async, resumable, preemption-safe.

A checkpoint holds three items: `state` (the sharded TrainState), `data`
(each process's grain iterator position, so a resumed run sees exactly
the batches an uninterrupted run would) and `config` (a JSON record of
the operative gin config and the model config as of that save: a run
resumed with other bindings records its own). Saves run in the
background every `every` steps and whenever the loop asks (eval steps,
the last step, preemption).
The newest `keep` checkpoints are kept, plus the one with the best eval
metric. Restoring takes the target shardings from the abstract state, so
a run resumes on a different mesh; a latest checkpoint that cannot be
read (a truncated file after a crash) is skipped with a warning and the
one before it is used.

Every process calls every method: Orbax synchronises the processes.
`restore_for_export` reads one checkpoint on its own, for `export`.
"""

import dataclasses
import os
import signal
from typing import Any

from absl import logging
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from spectrostream_jax import files

MODES = ('min', 'max')


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """When to save and what to keep."""

  every: int = 1000
  keep: int = 3
  # Also keep the checkpoint with the best value of this eval metric;
  # None keeps only the newest.
  best_metric: str | None = 'eval/mel_distance'
  best_mode: str = 'min'
  async_save: bool = True

  def __post_init__(self):
    if self.best_mode not in MODES:
      raise ValueError(f'best_mode {self.best_mode!r} not in {MODES}')
    if self.every < 1 or self.keep < 1:
      raise ValueError('every and keep must be >= 1')


class Checkpointer:
  """Orbax CheckpointManager for (state, data iterator, config)."""

  def __init__(self, directory: str, config: CheckpointConfig):
    keep: list[policies.PreservationPolicy] = [policies.LatestN(config.keep)]
    if config.best_metric is not None:
      metric = config.best_metric
      keep.append(
        policies.BestN(
          get_metric_fn=lambda metrics: metrics[metric],
          # BestN keeps the end of the ascending order.
          reverse=config.best_mode == 'min',
          n=1,
          keep_checkpoints_without_metrics=False,
        )
      )
    options = ocp.CheckpointManagerOptions(
      save_decision_policy=policies.FixedIntervalPolicy(config.every),
      preservation_policy=policies.AnyPreservationPolicy(keep),
      enable_async_checkpointing=config.async_save,
      cleanup_tmp_directories=True,
    )
    # Orbax wants absolute paths; a relative --workdir is a fine one.
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._sigterm = False
    self._previous_handler = None
    if jax.process_count() == 1:
      # Several processes agree on a stop step through JAX's preemption
      # service instead (it handles SIGTERM once jax.distributed is up).
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    logging.warning('SIGTERM: saving a checkpoint and stopping')
    self._sigterm = True

  def reached_preemption(self, step: int) -> bool:
    """True once the run was told to stop (all processes agree on `step`)."""
    if jax.process_count() > 1:
      return self.manager.reached_preemption(step)
    return self._sigterm

  def save(
    self,
    step: int,
    state: Any,
    data_iterator: grain.DatasetIterator,
    config: dict[str, Any],
    metrics: dict[str, float] | None = None,
    force: bool = False,
  ) -> bool:
    """Starts a save if `step` is due (or `force`); returns whether it did."""
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iterator),
      config=ocp.args.JsonSave(config),
    )
    return self.manager.save(step, args=args, metrics=metrics, force=force)

  def restore(
    self, abstract_state: Any, data_iterator: grain.DatasetIterator
  ) -> tuple[Any, int, dict[str, Any]] | None:
    """(state, step, config record) of the newest readable checkpoint.

    None if there is none. `abstract_state` is a tree of
    jax.ShapeDtypeStruct with the shardings to restore onto.
    `data_iterator` is moved to the saved position.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    for i, step in enumerate(steps):
      args = ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iterator),
        config=ocp.args.JsonRestore(),
      )
      try:
        restored = self.manager.restore(step, args=args)
      except Exception as e:  # Any read failure: fall back, see docstring.
        if i == len(steps) - 1:
          raise
        logging.warning(
          'checkpoint %d cannot be restored (%s: %s); using checkpoint %d',
          step,
          type(e).__name__,
          files.first_line(e),
          steps[i + 1],
        )
        continue
      logging.info('restored checkpoint %d', step)
      return restored.state, step, restored.config
    return None

  def latest_record(self) -> dict[str, Any] | None:
    """The `config` item of the newest checkpoint; None without one."""
    step = self.manager.latest_step()
    if step is None:
      return None
    args = ocp.args.Composite(config=ocp.args.JsonRestore())
    try:
      return self.manager.restore(step, args=args).config
    except Exception:  # A damaged save: `restore` falls back past it.
      return None

  def close(self) -> None:
    """Waits for pending saves; restores the previous SIGTERM handler."""
    self.manager.wait_until_finished()
    self.manager.close()
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None


def restore_for_export(
  directory: str, step: int | None = None
) -> tuple[Any, dict[str, Any], int]:
  """(generator params as numpy, the saved `config` record, step).

  Reads one checkpoint without the trainer: the EMA of the generator's
  parameters (what the trainer evaluates; the raw parameters for a state
  without one) and the `config` item the run saved with it, whose
  `model.codec` is the CodecConfig that step trained. The newest step by
  default. A user-facing failure is a ValueError with one line.
  """
  if not os.path.isdir(directory):
    raise ValueError(f'no checkpoints folder: {directory}')
  manager = ocp.CheckpointManager(
    os.path.abspath(directory),
    options=ocp.CheckpointManagerOptions(read_only=True),
    item_handlers={
      'state': ocp.PyTreeCheckpointHandler(),
      'data': grain.checkpoint.CheckpointHandler(),
      'config': ocp.JsonCheckpointHandler(),
    },
  )
  try:
    steps = manager.all_steps()
    if not steps:
      raise ValueError(f'no checkpoints in {directory}')
    step = max(steps) if step is None else step
    if step not in steps:
      raise ValueError(
        f'no checkpoint for step {step} in {directory}; '
        f'there are {sorted(steps)}'
      )
    try:
      tree = manager.item_metadata(step)['state']
      name = 'ema_params' if 'ema_params' in tree else 'params'
      item = {name: tree[name]}
      restored = manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
            item=item,
            restore_args=jax.tree.map(
              lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item
            ),
            partial_restore=True,
          ),
          config=ocp.args.JsonRestore(),
        ),
      )
    except Exception as e:  # Orbax raises many types for unreadable data.
      raise ValueError(
        f'checkpoint {step} in {directory} cannot be read: '
        f'{files.first_line(e)}'
      ) from e
  finally:
    manager.close()
  return restored.state[name], restored.config, step
