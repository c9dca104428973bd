"""Mesh, regex sharding rules and the multi-process example order."""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from spectrostream_jax.models import codec
from spectrostream_jax.training import optim
from spectrostream_jax.training import sharding
from spectrostream_jax.training import step


def test_mesh_shapes():
  mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=2))
  assert dict(mesh.shape) == {'data': 4, 'fsdp': 2}
  one = sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1])
  assert dict(one.shape) == {'data': 1, 'fsdp': 1}
  with pytest.raises(ValueError, match='does not fit'):
    sharding.make_mesh(sharding.MeshConfig(data=3, fsdp=2))


@pytest.mark.parametrize(
  'path, shape, spec',
  [
    # The largest axis the fsdp size divides.
    ('params/decoder/k', (3, 4, 512, 256), P(None, None, 'fsdp', None)),
    ('params/quantizer/embedding', (64, 1024, 256), P(None, 'fsdp', None)),
    # 3 is not divisible by 4: the next largest that is.
    ('params/x', (4, 3, 8192), P(None, None, 'fsdp')),
    # Too small to split.
    ('params/decoder/bias', (256,), P()),
    # No divisible axis.
    ('params/odd', (3, 5, 7, 11, 13), P()),
    # The first rule that matches wins.
    ('ema_params/decoder/k', (3, 4, 512, 256), P()),
    ('step', (), P()),
  ],
)
def test_partition_spec(path, shape, spec):
  config = sharding.MeshConfig(
    rules=(('ema_params/.*', 'replicate'), ('.*', 'fsdp')),
    min_fsdp_size=1024,
  )
  assert sharding.partition_spec(path, shape, config, fsdp_size=4) == spec


def test_fsdp_of_size_one_replicates():
  config = sharding.MeshConfig()
  assert sharding.partition_spec('p', (1024, 1024), config, 1) == P()


def test_bad_rule_is_rejected():
  with pytest.raises(ValueError, match='not in'):
    sharding.MeshConfig(rules=(('.*', 'shard'),))


def test_train_state_shardings_follow_the_parameters():
  """Adam moments and the EMA are split like the parameter they track."""
  config = step.StepConfig(codec=codec.tiny())
  abstract = jax.eval_shape(functools.partial(step.init_state, config), 0)
  mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=4))
  rules = sharding.MeshConfig(fsdp=4, min_fsdp_size=1024)
  shardings = sharding.tree_shardings(mesh, abstract, rules)
  kernel = ('decoder', 'input_layer', 'conv1x1_first', 'conv', 'kernel')

  def get(tree):
    for key in kernel:
      tree = tree[key]
    return tree

  spec = get(shardings.params).spec
  assert 'fsdp' in spec
  assert get(shardings.ema_params).spec == spec
  moments = {
    optim.path_str(path).split('/')[-6]: leaf.spec
    for path, leaf in jax.tree_util.tree_leaves_with_path(shardings.opt_state)
    if optim.path_str(path).endswith('/'.join(kernel))
  }
  assert moments == {'mu': spec, 'nu': spec}
  assert shardings.step.spec == P() and shardings.rng.spec == P()


def test_example_order_undoes_the_per_process_slicing():
  """Process p holds examples p, p + P, ...; rows come back in order."""
  processes, batch = 2, 8
  examples = np.arange(batch * 3, dtype=np.float32).reshape(batch, 3)
  rows = np.concatenate([examples[p::processes] for p in range(processes)])
  mesh = sharding.make_mesh(sharding.MeshConfig())
  x = jax.device_put(rows, sharding.batch_sharding(mesh))
  out = jax.jit(sharding.example_order, static_argnums=1)(x, processes)
  np.testing.assert_array_equal(out, examples)
  assert sharding.example_order(x, 1) is x


def test_nested_collectives_finds_a_reduction_inside_a_loop():
  """A batch sum inside a scan is a collective in the loop body."""
  mesh = sharding.make_mesh(sharding.MeshConfig())
  x = jax.device_put(np.ones((8, 4), np.float32), sharding.batch_sharding(mesh))

  def looped(x):
    def body(c, _):
      return c + jnp.sum(jnp.tanh(x + c), axis=0), None

    return jax.lax.scan(body, jnp.zeros(4), None, length=3)[0]

  def flat(x):
    return jnp.sum(jnp.tanh(x), axis=0)

  nested = sharding.nested_collectives(
    jax.jit(looped).lower(x).compile().as_text()
  )
  assert nested and all(n.endswith(': all-reduce') for n in nested), nested
  top = jax.jit(flat).lower(x).compile().as_text()
  assert 'all-reduce' in top
  assert sharding.nested_collectives(top) == []
