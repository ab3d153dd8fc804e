"""unitoken-jax: UniToken (discrete VQ-GAN codes + continuous SigLIP features in one
autoregressive decoder) in JAX/Flax."""

# The names below are imported when first used (PEP 562): importing the package imports no JAX, so
# that the `unitoken` command sets up its Ctrl-C handling before JAX loads (see `console.py`)
_EXPORTS = {"CheckpointError": "unitoken_jax.convert.files", "UniTokenModel": "unitoken_jax.model",
            "load": "unitoken_jax.model", "read_config": "unitoken_jax.model",
            "DecoderConfig": "unitoken_jax.models.config", "UniTokenConfig": "unitoken_jax.models.config",
            "VisionConfig": "unitoken_jax.models.config"}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'unitoken_jax' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # (looked up once)
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
