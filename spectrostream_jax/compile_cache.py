"""The persistent XLA compilation cache, on for every command by default.

Compiling the training step takes minutes on an accelerator (and about a
minute on two CPU cores); every resume, preemption and sweep arm would
pay it again. With the cache, a program compiled once on this machine
(same program, same JAX, same devices) loads from disk. On GPU the cache
folder also keeps XLA's autotuning results (JAX's
`jax_persistent_cache_enable_xla_caches`), so a warm start skips the
autotuner too. docs/training.md, "On GPUs and TPUs", has the figures.

Where: `--compile-cache DIR` (`--compile_cache` for spectrostream-train),
else $SPECTROSTREAM_COMPILE_CACHE, else JAX's own
$JAX_COMPILATION_CACHE_DIR (the launch scripts set it), else
$XDG_CACHE_HOME (or ~/.cache)/spectrostream_jax/xla. The word `off` turns
it off.
"""

import os

ENV = 'SPECTROSTREAM_COMPILE_CACHE'
OFF = 'off'
# Programs that compile faster than this are not worth a file (JAX's own
# default); the codec's and the trainer's programs all take longer.
MIN_COMPILE_SECONDS = 1.0

HELP = (
  f'persistent XLA compilation cache folder, or {OFF!r} (default: '
  f'${ENV}, else ~/.cache/spectrostream_jax/xla)'
)


def default_directory() -> str:
  cache = os.environ.get('XDG_CACHE_HOME') or os.path.join(
    os.path.expanduser('~'), '.cache'
  )
  return os.path.join(cache, 'spectrostream_jax', 'xla')


def directory(setting: str | None = None) -> str | None:
  """The folder `setting` (a flag's value, None if not given) asks for.

  None means off.
  """
  if setting is None:
    setting = (
      os.environ.get(ENV)
      or os.environ.get('JAX_COMPILATION_CACHE_DIR')
      or default_directory()
    )
  setting = setting.strip()
  if not setting or setting.lower() == OFF:
    return None
  return os.path.abspath(os.path.expanduser(setting))


def enable(setting: str | None = None) -> str | None:
  """Points JAX at the cache folder (or turns the cache off); its path.

  Call before the first compile: JAX opens the cache once, at the first
  program it compiles. A folder that cannot be created turns the cache
  off with a warning rather than stopping the command.
  """
  import jax  # Here: commands call this before JAX may be imported.

  path = directory(setting)
  if path is not None:
    try:
      os.makedirs(path, exist_ok=True)
    except OSError as e:
      import warnings

      warnings.warn(
        f'compilation cache off: cannot create {path}: {e.strerror}',
        stacklevel=2,
      )
      path = None
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_enable_compilation_cache', path is not None)
  jax.config.update(
    'jax_persistent_cache_min_compile_time_secs', MIN_COMPILE_SECONDS
  )
  return path
