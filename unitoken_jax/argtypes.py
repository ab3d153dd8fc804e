"""argparse types shared by the command lines (the `unitoken` verbs, the shapes world's scripts,
the benchmarks): a bad count or seed stops a command at once, by its option, before any model
loads or any work is measured. Standard library only (imported before JAX)."""

from __future__ import annotations

import argparse


def whole(least: int = 1, most: int | None = None):
    """A whole number in [least, most] (`most` None: no upper bound)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least or (most is not None and value > most):
            raise argparse.ArgumentTypeError(f"{value} is out of range: it must be "
                                             + (f"at least {least}" if most is None else f"in [{least}, {most}]"))
        return value
    return parse


def wholes(least: int):
    """Comma-separated whole numbers, each at least `least`, at least one of them."""
    one = whole(least)

    def parse(text: str) -> list[int]:
        values = [one(v.strip()) for v in text.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError("give at least one number")
        return values
    return parse
