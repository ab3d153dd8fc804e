"""unitoken-jax: UniToken (discrete VQ-GAN codes + continuous SigLIP features in one
autoregressive decoder) in JAX/Flax."""

from unitoken_jax.convert.hf import CheckpointError
from unitoken_jax.model import UniTokenModel, load, read_config
from unitoken_jax.models.config import DecoderConfig, UniTokenConfig, VisionConfig

__all__ = ["CheckpointError", "DecoderConfig", "UniTokenConfig", "UniTokenModel", "VisionConfig", "load", "read_config"]
__version__ = "0.1.0"
