"""Device mesh and sharding rules of the trainer.

The mesh has a 'data' axis and an 'fsdp' axis. Batches are split over
both (every device gets different examples); parameters, optimizer states
and EMAs are either replicated or split along one of their axes over
'fsdp' (ZeRO-3 style: XLA gathers them where they are used). Which leaf
gets what is decided by regex rules on the leaf's '/'-joined path in the
train state, first match wins:

    rules = (('.*/embedding', 'fsdp'), ('.*', 'replicate'))

'fsdp' splits the leaf's largest axis that the fsdp size divides, when the
leaf has at least `min_fsdp_size` elements; otherwise it is replicated.
"""

from collections.abc import Sequence
import dataclasses
import math
import re

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from spectrostream_jax.training import optim

# Mesh axes, and the axes a batch is split over.
AXES = ('data', 'fsdp')
BATCH_AXES = ('data', 'fsdp')
ACTIONS = ('fsdp', 'replicate')


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape and the parameter sharding rules."""

  # Devices on the data axis; -1 takes all devices left after fsdp.
  data: int = -1
  fsdp: int = 1
  rules: tuple[tuple[str, str], ...] = (('.*', 'fsdp'),)
  # Smaller leaves stay replicated: splitting them saves nothing.
  min_fsdp_size: int = 1 << 14

  def __post_init__(self):
    for pattern, action in self.rules:
      re.compile(pattern)
      if action not in ACTIONS:
        raise ValueError(f'rule {pattern!r}: {action!r} not in {ACTIONS}')


def make_mesh(
  config: MeshConfig, devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
  """A ('data', 'fsdp') mesh over `devices` (default: all)."""
  devices = jax.devices() if devices is None else list(devices)
  n = len(devices)
  data = n // config.fsdp if config.data == -1 else config.data
  if data * config.fsdp != n:
    raise ValueError(
      f'mesh data={config.data} × fsdp={config.fsdp} does not fit {n} devices'
    )
  return jax.make_mesh(
    (data, config.fsdp),
    AXES,
    axis_types=(jax.sharding.AxisType.Auto,) * len(AXES),
    devices=devices,
  )


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def partition_spec(
  path: str, shape: Sequence[int], config: MeshConfig, fsdp_size: int
) -> P:
  """The PartitionSpec of one leaf under `config.rules`."""
  action = next(
    (a for pattern, a in config.rules if re.fullmatch(pattern, path)),
    'replicate',
  )
  if (
    action == 'replicate'
    or fsdp_size == 1
    or math.prod(shape) < config.min_fsdp_size
  ):
    return P()
  divisible = [i for i, d in enumerate(shape) if d % fsdp_size == 0]
  if not divisible:
    return P()
  axis = max(divisible, key=lambda i: shape[i])
  return P(*[('fsdp' if i == axis else None) for i in range(len(shape))])


def tree_shardings(mesh: jax.sharding.Mesh, tree, config: MeshConfig):
  """NamedShardings for every leaf of `tree` (arrays or shape structs)."""
  fsdp_size = mesh.shape['fsdp']
  return jax.tree_util.tree_map_with_path(
    lambda path, leaf: NamedSharding(
      mesh,
      partition_spec(optim.path_str(path), leaf.shape, config, fsdp_size),
    ),
    tree,
  )


def example_order(x: jax.Array, process_count: int) -> jax.Array:
  """Puts a global batch assembled from per-process slices in example order.

  With P processes, the data pipeline gives process p the examples
  p, p + P, p + 2P, ... of each global batch, and the global array holds
  the processes' rows one after the other. Inside `jit` this reorders the
  rows to 0, 1, 2, ..., so every per-example random draw (quantizer
  levels, bypass, k-means seeds) and so the whole run is the same for any
  number of processes. Costs one all-to-all of the input batch.
  """
  if process_count == 1:
    return x
  per_process = x.shape[0] // process_count
  x = x.reshape(process_count, per_process, *x.shape[1:])
  return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])


_COLLECTIVE = re.compile(
  r'\b(all-reduce|all-gather|all-to-all|ragged-all-to-all|'
  r'collective-permute|collective-broadcast|reduce-scatter)(-start)?\('
)
_COMPUTATION = re.compile(r'^(ENTRY )?%?([^\s(]+) .*\{\s*$')
_TYPE = re.compile(r'\b(?:pred|[a-z]+[0-9]+)\[([0-9,]*)\]')


def nested_collectives(hlo_text: str) -> list[str]:
  """Collectives of a compiled module that sit outside its entry computation.

  `hlo_text` is `compiled.as_text()`. A collective inside a loop body or a
  conditional branch is not ordered against the entry's collectives on
  XLA:CPU, and the devices of one process may run them in different
  orders (docs/training.md, "Collectives and the order of programs").
  Returns 'computation: op' for each one found.
  """
  found, computation, entry = [], None, False
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      computation, entry = header.group(2), bool(header.group(1))
      continue
    match = _COLLECTIVE.search(line)
    if match and computation is not None and not entry:
      found.append(f'{computation}: {match.group(1)}')
  return found


def batch_collectives(hlo_text: str, batch: int) -> list[str]:
  """Collectives of a compiled module that move a whole batch's tensors.

  `hlo_text` is `compiled.as_text()` of a program whose batch, split over
  the devices, has `batch` examples in all. A collective whose result
  has an axis of that size gathers (or reduces) every device's examples:
  each device then computes on the whole batch, and data parallelism
  stops scaling. Choose `batch` so that no other axis of the program has
  that size. Returns 'op type' for each, e.g. 'all-gather f32[24,4,16]'.
  """
  found = []
  for line in hlo_text.splitlines():
    match = _COLLECTIVE.search(line)
    if not match:
      continue
    for result in _TYPE.finditer(line[: match.start()]):
      if str(batch) in result.group(1).split(','):
        found.append(f'{match.group(1)} {result.group(0)}')
  return found
