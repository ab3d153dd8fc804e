"""The README's Python blocks run as written (issue 15): the API block on the tiny model that
`unitoken init --config tiny` makes, with 8 fake CPU devices for its mesh line (as the README
says to set them), and the inference and images blocks on the bundled model. Each runs in a
fresh process, as a reader would run it."""

import os
import re
import subprocess
import sys

import pytest

from conftest import CHEAP_COMPILES, COLLECTIVE_THREADS, PATIENT_COLLECTIVES

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _block(heading: str) -> str:
    """The first ```python block after `heading` in the README."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _run(code: str, tmp_path, **env) -> subprocess.CompletedProcess:
    script = tmp_path / "block.py"
    script.write_text(code)
    environment = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=CHEAP_COMPILES)  # one device unless env says
    environment.update(env)
    return subprocess.run([sys.executable, str(script)], cwd=str(tmp_path), env=environment, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
def test_the_python_api_block_runs_on_the_tiny_model(tmp_path):
    from unitoken_jax import cli

    tiny = str(tmp_path / "unitoken-tiny")
    assert cli.main(["init", "--config", "tiny", "--to", tiny]) == 0
    code = _block("## Python API").replace("/tmp/unitoken-tiny", tiny).replace("/tmp/unitoken-out", str(tmp_path / "out"))
    flags = f"--xla_force_host_platform_device_count=8 {PATIENT_COLLECTIVES} {CHEAP_COMPILES}"
    result = _run(code, tmp_path, XLA_FLAGS=flags, PJRT_NPROC=COLLECTIVE_THREADS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "config.json").exists() and (tmp_path / "out-orbax").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("heading", ["## Inference: understand, generate, edit, chat", "## Images and text in and out"])
def test_the_bundled_model_blocks_run(tmp_path, heading):
    code = _block(heading).replace("/tmp/red.png", str(tmp_path / "red.png"))
    result = _run(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_fine_tuning_block_runs_on_the_bundled_model(tmp_path):
    """The block's paths stand for the release, a run's adapters and its final model: here the
    bundled model, adapters made for it, and that model with adapters in our format."""
    import unitoken_jax
    from unitoken_jax.models import lora
    from unitoken_jax.models.config import LoraConfig
    from unitoken_jax.world import default

    base_dir = os.path.join(default.DEFAULT_DIR, "model")
    base = unitoken_jax.load(base_dir, progress=False)
    config = base.config.replace(lora=LoraConfig(rank=2, targets=("q_proj", "v_proj")))
    tuned = base._like(config, lora.with_adapters(base.params, config))
    tuned.save_adapters(str(tmp_path / "adapters"))
    tuned.save(str(tmp_path / "final"))
    code = (_block("## Fine-tuning on one host").replace("/ckpt/UniToken-7B-mine", str(tmp_path / "mine"))
            .replace("/ckpt/UniToken-7B", base_dir).replace("/mnt/bucket/ft", str(tmp_path)))
    result = _run(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "mine" / "config.json").exists()
