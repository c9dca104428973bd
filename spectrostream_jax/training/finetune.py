"""Starting a run from a model directory: `train.init_from` (docs/finetune.md).

The directory is an export of ours or a folder with Google's two weight
files alone (the production preset). Its codec parameters become the live
and EMA parameters, its codebooks the RVQ state's (initialised, every code
counted as used); the discriminators, optimizers and balancer start fresh.
"""

import dataclasses
from typing import Any

import jax
import numpy as np

from spectrostream_jax import inference
from spectrostream_jax.models import codec as codec_lib
from spectrostream_jax.models import quantizer as rvq
from spectrostream_jax.training import state as train_state


class SourceError(ValueError):
  """An init_from directory that cannot start this experiment (one line)."""


@dataclasses.dataclass(frozen=True)
class Source:
  """A model directory's weights and identity."""

  path: str
  params: Any  # numpy {'encoder', 'decoder', 'quantizer'}
  model_id: str
  # The model whose codes these weights make: the directory's own
  # `codes_compatible_with` if it has one, else its model id.
  codes_id: str

  def record(self) -> dict[str, str]:
    """What a run's checkpoints record about where it started."""
    return {
      'path': self.path,
      'model_id': self.model_id,
      'codes_id': self.codes_id,
    }


def read_source(directory: str, config: codec_lib.CodecConfig) -> Source:
  """The weights of `directory`, if its model is the experiment's `config`.

  Raises SourceError naming every field in which the two differ.
  """
  try:
    codec = inference.Codec.load(directory)
  except ValueError as e:
    raise SourceError(f'init_from: {e}') from e
  differences = codec.config.network_differences(config)
  if differences:
    raise SourceError(
      f'init_from {directory} holds another model than the experiment '
      f'(directory vs experiment): {"; ".join(differences)}'
    )
  return Source(
    path=directory,
    params=jax.tree.map(np.asarray, codec.params),
    model_id=codec.model_id,
    codes_id=codec.codes_id,
  )


def start_from(
  state: train_state.TrainState,
  source: Source,
  rows_per_step: float,
  quantizer: rvq.QuantizerConfig,
  shardings: train_state.TrainState,
) -> train_state.TrainState:
  """A fresh state with the source's weights, placed as `shardings` says.

  `rows_per_step`: embeddings the RVQ sees per step (global batch × frames
  per crop), the unit of the codebooks' usage counts.
  """
  codebooks = rvq.CodebookState.from_codebooks(
    source.params['quantizer']['embedding'], rows_per_step, quantizer
  )
  return state.replace(
    params=_place(source.params, shardings.params),
    ema_params=_place(source.params, shardings.ema_params),
    codebooks=_place(codebooks, shardings.codebooks),
  )


def _place(tree: Any, shardings: Any) -> Any:
  """Host values (the same on every process) as global sharded arrays."""

  def one(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])

  return jax.tree.map(one, tree, shardings)
