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

# XLA:CPU's concurrency-optimized scheduler lets one fake CPU device's thread enter a collective
# while another's enters a different one: a program of several (a scanned decode loop on a mesh
# of 8 such devices split over the data axis, 8 different rows) waited 40 s, then aborted the
# process, every time on 2 cores. The plain scheduler keeps them in one order; accelerators
# order collectives themselves and read no XLA:CPU flag.
CPU_COLLECTIVES_IN_ORDER = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def _several_cpu_devices(environ, configured: int = -1) -> bool:
    import re

    forced = re.findall(r"--xla_force_host_platform_device_count=(\d+)", environ.get("XLA_FLAGS", ""))
    counts = [int(forced[-1])] if forced else []
    if environ.get("JAX_NUM_CPU_DEVICES", "").strip().isdigit():
        counts.append(int(environ["JAX_NUM_CPU_DEVICES"]))
    return any(n > 1 for n in counts + [configured])


def _cpu_collectives_in_order(environ, configured: int = -1) -> None:
    """Adds `CPU_COLLECTIVES_IN_ORDER` to XLA_FLAGS where the CPU has several devices (forced in
    XLA_FLAGS, JAX_NUM_CPU_DEVICES, or `configured`: jax.config's jax_num_cpu_devices) and the user
    set no value of their own: read when JAX first starts its CPU backend, so only a process that
    imports this package before that is helped (`unitoken`, and Python that imports it first)."""
    flags = environ.get("XLA_FLAGS", "")
    if _several_cpu_devices(environ, configured) and "xla_cpu_enable_concurrency_optimized_scheduler" not in flags:
        environ["XLA_FLAGS"] = f"{flags} {CPU_COLLECTIVES_IN_ORDER}".strip()


def _apply_cpu_flags() -> None:
    import os
    import sys

    jax = sys.modules.get("jax")  # (imported before this package: its config may already ask for several)
    configured = getattr(getattr(jax, "config", None), "jax_num_cpu_devices", -1) if jax is not None else -1
    _cpu_collectives_in_order(os.environ, configured if isinstance(configured, int) else -1)


_apply_cpu_flags()


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'unitoken_jax' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # (looked up once)
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
