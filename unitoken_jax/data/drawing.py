"""The drawn world's table and brush: coloured shapes at places on a 64 x 64 picture.

One table for both drawn datasets: the demo data (`data.demo`, one shape a picture, for tiny
training runs and tests) and the shapes world (`world.shapes`, one to three shapes, with the
questions, held-out combinations and pixel checker of its evaluation).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
BACKGROUND = (245, 245, 245)
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
PLACES = {"top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75),
          "bottom right": (0.75, 0.75)}


@dataclasses.dataclass(frozen=True)
class Thing:
    colour: str
    shape: str
    place: str

    @property
    def text(self) -> str:
        return f"a {self.colour} {self.shape} at the {self.place}"


def draw(things: list[Thing], rng: np.random.Generator | None = None) -> Image.Image:
    """The picture of `things` (at distinct places); `rng` jitters size and position slightly."""
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    d = ImageDraw.Draw(image)
    for t in things:
        jx, jy, jr = (rng.uniform(-2, 2), rng.uniform(-2, 2), rng.uniform(-1.5, 1.5)) if rng is not None else (0, 0, 0)
        cx, cy = PLACES[t.place][0] * SIZE + jx, PLACES[t.place][1] * SIZE + jy
        r = 13 + jr
        box = (cx - r, cy - r, cx + r, cy + r)
        if t.shape == "circle":
            d.ellipse(box, fill=COLOURS[t.colour])
        elif t.shape == "square":
            d.rectangle(box, fill=COLOURS[t.colour])
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[t.colour])
    return image
