"""SpectroStream neural audio codec in JAX/Flax: train, run and export."""

import importlib

__all__ = ['Codec', 'CodecConfig', 'get_config']
__version__ = '0.1.0'

# Loaded on first use, so that a command line can set itself up (its
# Ctrl-C handling, its --help) before JAX starts threads.
_LAZY = {
  'Codec': 'spectrostream_jax.inference',
  'CodecConfig': 'spectrostream_jax.models.codec',
  'get_config': 'spectrostream_jax.models.codec',
}


def __getattr__(name: str):
  if name not in _LAZY:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  return getattr(importlib.import_module(_LAZY[name]), name)
