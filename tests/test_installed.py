"""The package works installed, not only from a checkout: `pip install .` (not editable) into a
directory of its own, then, from a directory outside the checkout, the commands the README
gives: `unitoken init --config tiny`, a tiny stage-2 run named by config, and `unitoken generate`
on the bundled model (whose files must have been installed with the package)."""

import os
import subprocess
import sys

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    # --no-deps: the test environment has them; --no-build-isolation: no download for setuptools
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), ROOT], check=True, cwd=str(build),
                   env={**os.environ, "PIP_NO_INPUT": "1", "TMPDIR": str(build)})
    env = {**os.environ, "PYTHONPATH": str(target), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's machine
    return target, env


def _run(args, cwd, env, timeout=600):
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(args)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
def test_the_readme_commands_work_from_an_installed_package_outside_the_checkout(installed, tmp_path):
    target, env = installed
    where = _run([sys.executable, "-c", "import unitoken_jax, unitoken_jax.configs as c; "
                  "print(unitoken_jax.__file__); print(c.packaged_path('stage2'))"], str(tmp_path), env)
    assert all(line.startswith(str(target)) for line in where.stdout.split()), where.stdout  # not the checkout
    unitoken = [os.path.join(target, "bin", "unitoken")]  # the console script pip wrote

    _run([*unitoken, "init", "--config", "tiny", "--to", str(tmp_path / "tiny")], str(tmp_path), env)
    assert os.path.exists(tmp_path / "tiny" / "config.json")

    workdir = tmp_path / "stage2"
    _run([sys.executable, "-m", "unitoken_jax.train", "--config", "configs/stage2.py:tiny", "--workdir",
          str(workdir), "--config.total_steps=2", "--config.log_every=1", "--config.data.num_threads=1"],
         str(tmp_path), env)
    assert os.path.isdir(workdir / "final") and os.path.exists(workdir / "config.json")

    _run([*unitoken, "generate", "a red circle at the top left", "--out", str(tmp_path / "red.png")],
         str(tmp_path), env)
    assert Image.open(tmp_path / "red.png").size == (64, 64)


def test_the_source_distribution_holds_its_tests_helpers_and_the_readme(tmp_path):
    """The sdist shipped the test files (setuptools' default) without the helpers 13 of them import,
    nor pytest.ini or the configs the README names; its metadata had no description."""
    import tarfile

    # (a file list of its own: an earlier build's egg-info in the checkout would be read back)
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), "sdist", "-d",
                    str(tmp_path)], cwd=ROOT, check=True, capture_output=True)
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
        info = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("/PKG-INFO"))).read().decode()
    helpers = {f"tests/{f}" for f in os.listdir(os.path.join(ROOT, "tests")) if f.endswith(".py")}
    assert helpers <= names, sorted(helpers - names)
    assert {"pytest.ini", "configs/stage2.py", "launch/aot_check.py", "README.md"} <= names
    assert "Requires-Dist: scipy" in info and "unitoken-jax" in info
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert f.readline().strip() in info  # the README is the long description
