"""The tests' tokenizer: the package's small byte-level one (`unitoken_jax.tokenizer.small`)."""

from unitoken_jax.tokenizer.small import MERGES, N_CODES, TEXT_BASE, VOCAB_SIZE, build, code_name  # noqa: F401
