"""Checkpoints: other meshes, retention, a truncated latest, SIGTERM."""

import os
import pathlib
import signal

import grain
import jax
import numpy as np
import pytest

from spectrostream_jax.training import checkpoint
from spectrostream_jax.training import sharding


def make_state(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {
    'w': rng.standard_normal((64, 256)).astype(np.float32),
    'b': rng.standard_normal((256,)).astype(np.float32),
    'step': np.int32(seed),
  }


def place(state: dict, mesh_config: sharding.MeshConfig) -> tuple:
  mesh = sharding.make_mesh(mesh_config)
  shardings = sharding.tree_shardings(mesh, state, mesh_config)
  return jax.device_put(state, shardings), shardings


def abstract(state: dict, shardings) -> dict:
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
    state,
    shardings,
  )


def batches() -> grain.DatasetIterator:
  return iter(grain.MapDataset.range(1000).batch(4).to_iter_dataset())


def checkpointer(path, **kwargs) -> checkpoint.Checkpointer:
  config = checkpoint.CheckpointConfig(
    **{'every': 1, 'keep': 2, 'async_save': False, **kwargs}
  )
  return checkpoint.Checkpointer(str(path), config)


def test_restores_onto_a_different_mesh(tmp_path):
  data_parallel = sharding.MeshConfig()
  state, _ = place(make_state(), data_parallel)
  it = batches()
  for _ in range(3):
    next(it)
  ckpt = checkpointer(tmp_path)
  assert ckpt.save(3, state, it, {'note': 'test'})
  ckpt.close()

  fsdp = sharding.MeshConfig(fsdp=4, min_fsdp_size=1024)
  target = sharding.tree_shardings(sharding.make_mesh(fsdp), make_state(), fsdp)
  it = batches()
  ckpt = checkpointer(tmp_path)
  restored, step, _ = ckpt.restore(abstract(make_state(), target), it)
  ckpt.close()
  assert step == 3
  for name, value in make_state().items():
    np.testing.assert_array_equal(restored[name], value)
    assert restored[name].sharding == target[name]
  assert restored['w'].sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp')
  # The data iterator continues after the three batches it had given.
  np.testing.assert_array_equal(next(it), [12, 13, 14, 15])


def test_saves_on_interval_and_keeps_newest_and_best(tmp_path):
  state, _ = place(make_state(), sharding.MeshConfig())
  it = batches()
  ckpt = checkpointer(tmp_path, every=2, best_metric='eval/loss')
  saved = []
  for step in range(1, 9):
    metrics = {2: {'eval/loss': 0.1}, 4: {'eval/loss': 0.5}}.get(step)
    if ckpt.save(step, state, it, {}, metrics=metrics, force=step == 7):
      saved.append(step)
  ckpt.close()
  assert saved == [2, 4, 6, 7, 8]
  assert checkpointer(tmp_path).manager.all_steps() == [2, 7, 8]


def test_unreadable_latest_falls_back_to_the_previous(tmp_path, caplog):
  state, shardings = place(make_state(), sharding.MeshConfig())
  it = batches()
  ckpt = checkpointer(tmp_path)
  ckpt.save(1, state, it, {})
  next(it)
  ckpt.save(2, jax.tree.map(lambda x: x + 1, state), it, {})
  ckpt.close()
  files = [p for p in (tmp_path / '2' / 'state').rglob('*') if p.is_file()]
  largest = max(files, key=lambda p: p.stat().st_size)
  largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])

  it = batches()
  ckpt = checkpointer(tmp_path)
  restored, step, _ = ckpt.restore(abstract(make_state(), shardings), it)
  ckpt.close()
  assert step == 1
  np.testing.assert_array_equal(restored['w'], make_state()['w'])
  assert 'checkpoint 2 cannot be restored' in caplog.text
  np.testing.assert_array_equal(next(it), [0, 1, 2, 3])


def test_no_checkpoint_restores_nothing(tmp_path):
  state, shardings = place(make_state(), sharding.MeshConfig())
  ckpt = checkpointer(tmp_path)
  assert ckpt.restore(abstract(make_state(), shardings), batches()) is None
  ckpt.close()


def test_sigterm_asks_to_stop(tmp_path):
  previous = signal.getsignal(signal.SIGTERM)
  ckpt = checkpointer(pathlib.Path(tmp_path))
  assert not ckpt.reached_preemption(5)
  os.kill(os.getpid(), signal.SIGTERM)
  assert ckpt.reached_preemption(5)
  ckpt.close()
  assert signal.getsignal(signal.SIGTERM) == previous


def test_bad_config_is_rejected():
  with pytest.raises(ValueError, match='best_mode'):
    checkpoint.CheckpointConfig(best_mode='lowest')


def test_relative_directory(tmp_path, monkeypatch):
  """A relative --workdir is fine; Orbax alone would refuse it."""
  monkeypatch.chdir(tmp_path)
  state, shardings = place({'params': make_state(2)}, sharding.MeshConfig())
  ckpt = checkpointer('run/checkpoints')
  assert ckpt.save(1, state, batches(), {'model': {'codec': {}}})
  ckpt.close()
  ckpt = checkpointer('run/checkpoints')
  restored, step, _ = ckpt.restore(abstract(state, shardings), batches())
  ckpt.close()
  assert step == 1
  np.testing.assert_array_equal(restored['params']['w'], make_state(2)['w'])
  params, record, step = checkpoint.restore_for_export('run/checkpoints')
  assert step == 1 and record == {'model': {'codec': {}}}
  np.testing.assert_array_equal(params['b'], make_state(2)['b'])
