"""Drawing: a scene as an RGB image with PIL, smooth edges and each shape's interior in its exact colour."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from vlkd.errors import VlkdError
from vlkd.world.scenes import GRID, SHAPES, Scene, SceneObject

COLOUR_RGB = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "yellow": (245, 215, 20),
    "purple": (140, 45, 185),
    "orange": (250, 130, 20),
    "white": (255, 255, 255),
    "black": (15, 15, 15),
}
BACKGROUND_RGB = {
    "gray": (170, 170, 170),
    "beige": (215, 195, 160),
    "sky": (160, 200, 235),
    "navy": (30, 40, 95),
}
_CHECKER_RGB = ((200, 200, 200), (95, 95, 95))
_RADIUS = {"small": 0.08, "large": 0.13}  # fraction of the image side
_JITTER = 0.02  # largest offset of an object's centre, fraction of the image side
_SUPERSAMPLE = 2  # draw at twice the size, then average down: smooth edges, exact interior colours


def object_centre(obj: SceneObject, size: int) -> tuple[float, float]:
    """The object's centre in pixels of a `size` x `size` image, kept so the object fits inside."""
    radius = _RADIUS[obj.size] * size
    centre = []
    for cell, jitter in zip(GRID[obj.position], obj.jitter, strict=True):
        value = (cell + 0.5) / 3 * size + jitter * _JITTER * size
        centre.append(min(max(value, radius + 1), size - radius - 1))
    return (centre[0], centre[1])


def draw_scene(scene: Scene, size: int) -> Image.Image:
    """The scene as an RGB image, `size` pixels square."""
    canvas = _background(scene, size).resize((size * _SUPERSAMPLE,) * 2, Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        x, y = object_centre(obj, size)
        radius = _RADIUS[obj.size] * size * _SUPERSAMPLE
        _draw_shape(draw, obj.shape, x * _SUPERSAMPLE, y * _SUPERSAMPLE, radius, COLOUR_RGB[obj.colour])
    return canvas.resize((size, size), Image.Resampling.BOX)


def _background(scene: Scene, size: int) -> Image.Image:
    if scene.background in BACKGROUND_RGB:
        return Image.new("RGB", (size, size), BACKGROUND_RGB[scene.background])
    rng = np.random.default_rng(scene.texture)
    if scene.background == "checkered":
        cell = max(size // 8, 2)
        dy, dx = rng.integers(0, cell, size=2)
        yy, xx = np.mgrid[0:size, 0:size]
        pixels = np.array(_CHECKER_RGB, dtype=np.uint8)[((yy + dy) // cell + (xx + dx) // cell) % 2]
    elif scene.background == "noise":
        grey = rng.integers(60, 190, size=(size, size, 1), dtype=np.uint8)
        pixels = np.repeat(grey, 3, axis=2)
    else:
        known = ", ".join([*BACKGROUND_RGB, "checkered", "noise"])
        raise VlkdError(f"unknown background {scene.background!r}; use one of {known}")
    return Image.fromarray(pixels, "RGB")


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float, fill: tuple[int, int, int]
) -> None:
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "square":
        half = 0.85 * r
        draw.rectangle((x - half, y - half, x + half, y + half), fill=fill)
    else:
        draw.polygon(_polygon(shape, x, y, r), fill=fill)


def _polygon(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":  # pointing up, enlarged and lowered to look as big as the others
        return [_polar(x, y + 0.15 * r, 1.15 * r, angle) for angle in (-90, 30, 150)]
    if shape == "diamond":  # narrower than a square turned by 45 degrees, so the two never look alike
        return [(x, y - r), (x + 0.7 * r, y), (x, y + r), (x - 0.7 * r, y)]
    if shape == "star":
        return [_polar(x, y, r if k % 2 == 0 else 0.45 * r, -90 + 36 * k) for k in range(10)]
    raise VlkdError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")


def _polar(x: float, y: float, r: float, degrees: float) -> tuple[float, float]:
    return (x + r * math.cos(math.radians(degrees)), y + r * math.sin(math.radians(degrees)))
