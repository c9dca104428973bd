"""SpectroStream neural audio codec in JAX/Flax: train, run and export."""

from spectrostream_jax.inference import Codec
from spectrostream_jax.models.codec import CodecConfig
from spectrostream_jax.models.codec import get_config

__all__ = ['Codec', 'CodecConfig', 'get_config']
__version__ = '0.1.0'
