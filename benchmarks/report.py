"""What every benchmark does with its result: write the markdown to a file and print it."""

from __future__ import annotations

import os


def write_report(lines: list[str], out: str, echo: bool = True) -> str:
    text = "\n".join(lines)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    if echo:
        print(text)
    return text
