"""The console scripts (pyproject.toml [project.scripts]).

Each one sets up Ctrl-C and the compilation cache before JAX is imported
(`commands.exit_on_interrupt`, `compile_cache`), then imports its
command's module by name and runs it. The modules import `commands` for
the helpers they share; nothing imports this one.
"""

import importlib
import sys

from spectrostream_jax import commands
from spectrostream_jax import compile_cache


def _start(prog: str, module: str):
  commands.exit_on_interrupt(prog)
  compile_cache.enable()  # A --compile-cache flag may change it later.
  return importlib.import_module(module)


def spectrostream() -> None:
  sys.exit(_start('spectrostream', 'spectrostream_jax.cli').main())


def spectrostream_data() -> None:
  sys.exit(_start('spectrostream-data', 'spectrostream_jax.data.cli').main())


def spectrostream_export() -> None:
  sys.exit(_start('spectrostream-export', 'spectrostream_jax.export').main())


def spectrostream_eval() -> None:
  module = 'spectrostream_jax.evaluation.ladder'
  sys.exit(_start('spectrostream-eval', module).main())


def spectrostream_train() -> None:
  """Training: the first Ctrl-C in the loop saves a checkpoint (train.py)."""
  _start('spectrostream-train', 'spectrostream_jax.training.train').run()
