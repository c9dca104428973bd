"""The persistent compilation cache: where it is, its off switch, its hits.

docs/training.md, "On GPUs and TPUs".
"""

import os
import subprocess
import sys

import jax
import pytest

from spectrostream_jax import commands
from spectrostream_jax import compile_cache

# Compiles one program slow enough to be cached (over a second on two
# cores: a long unrolled chain of matmuls) and prints whether JAX found
# it in the persistent cache.
PROGRAM = """
import sys
import jax
import jax.numpy as jnp
from spectrostream_jax import compile_cache

hits = []
jax.monitoring.register_event_listener(
  lambda event, **kw: hits.append(event)
  if event == '/jax/compilation_cache/cache_hits' else None
)
print(compile_cache.enable(sys.argv[1] if len(sys.argv) > 1 else None))

def f(x):
  for i in range(400):
    x = jnp.tanh(x @ x + i)
  return x

jax.jit(f).lower(jnp.ones((8, 8))).compile()
print('hit' if hits else 'miss')
"""


def run(*args, env=None):
  done = subprocess.run(
    [sys.executable, '-c', PROGRAM, *args],
    capture_output=True,
    text=True,
    check=True,
    env={**os.environ, **(env or {})},
  )
  return done.stdout.split()


@pytest.fixture
def restore_jax_cache():
  before = jax.config.jax_compilation_cache_dir
  yield
  jax.config.update('jax_compilation_cache_dir', before)
  jax.config.update('jax_enable_compilation_cache', True)


def test_where_the_cache_is(monkeypatch, tmp_path):
  monkeypatch.delenv(compile_cache.ENV, raising=False)
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR', raising=False)
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  assert compile_cache.directory() == str(tmp_path / 'spectrostream_jax/xla')
  # JAX's own variable (the launch scripts set it) is kept.
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path / 'jax'))
  assert compile_cache.directory() == str(tmp_path / 'jax')
  monkeypatch.setenv(compile_cache.ENV, str(tmp_path / 'env'))
  assert compile_cache.directory() == str(tmp_path / 'env')
  assert compile_cache.directory('flag') == os.path.abspath('flag')
  assert compile_cache.directory('off') is None
  assert compile_cache.directory('OFF') is None
  monkeypatch.setenv(compile_cache.ENV, 'off')
  assert compile_cache.directory() is None


def test_second_process_loads_the_program(tmp_path):
  cache = tmp_path / 'cache'
  assert run(str(cache)) == [str(cache), 'miss']
  assert os.listdir(cache)
  assert run(str(cache)) == [str(cache), 'hit']
  # Off: nothing is read, even with the same folder in the environment.
  assert run('off', env={compile_cache.ENV: str(cache)}) == ['None', 'miss']


def test_environment_gives_the_default(tmp_path):
  cache = tmp_path / 'from_env'
  assert run(env={compile_cache.ENV: str(cache)}) == [str(cache), 'miss']
  assert run(env={compile_cache.ENV: str(cache)}) == [str(cache), 'hit']


def test_every_command_takes_the_flag(tmp_path, restore_jax_cache):
  parser = commands.Parser(prog='x')
  sub = parser.add_subparsers(dest='command')
  sub.add_parser('run')
  cache = tmp_path / 'flag'
  # Given to the command or to its subcommand, and in the old spelling.
  for argv in (
    ['--compile-cache', str(cache), 'run'],
    ['run', '--compile-cache', str(cache)],
    ['run', f'--compile_cache={cache}'],
  ):
    jax.config.update('jax_compilation_cache_dir', None)
    parser.parse_args(argv)
    assert jax.config.jax_compilation_cache_dir == str(cache), argv
    assert cache.is_dir()
  parser.parse_args(['run', '--compile-cache', 'off'])
  assert jax.config.jax_compilation_cache_dir is None
  assert not jax.config.jax_enable_compilation_cache
