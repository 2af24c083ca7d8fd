"""The demo world's image generator: one shape on a plain background, 64×64 RGB.

Seeded and deterministic (integer jitter from numpy's PCG64, exact pixel colours, no
antialiasing), and vectorized over a batch so training can draw thousands of images a second.

Styles: "filled" (what the shared large model draws), "hollow" (an outline ~4 px thick in the
shape's colour, interior = background) and "striped" (horizontal 4 px stripes alternating the
shape's colour and the background colour, aligned to the image rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tandem.demo.grammar import COLORS, POSITIONS, SHAPES, STYLES, Scene

IMAGE_SIZE = 64
OUTLINE_PX = 4
STRIPE_PX = 4
# Shape size (side of the bounding box) and how far its centre may move from its position's anchor.
SIZE_RANGE = (24, 30)
CENTER_JITTER = 2

RGB: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 160, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (128, 0, 128),
    "orange": (255, 140, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
PALETTE = np.array([RGB[c] for c in COLORS], dtype=np.uint8)
# Anchor (x, y) of each position; 16 px apart so positions stay clearly separated despite jitter.
ANCHORS = np.array(
    [{"left": (16, 32), "right": (48, 32), "top": (32, 16), "bottom": (32, 48), "center": (32, 32)}[p]
     for p in POSITIONS],
    dtype=np.int64,
)


@dataclass(frozen=True)
class Jitter:
    """Per-image variation that is not part of the prompt."""

    dx: int = 0
    dy: int = 0
    size: int = 28


@dataclass
class SceneArrays:
    """A batch of scenes as index arrays into the grammar's tuples (fast to sample and render)."""

    color: np.ndarray
    shape: np.ndarray
    position: np.ndarray
    background: np.ndarray
    style: np.ndarray
    dx: np.ndarray
    dy: np.ndarray
    size: np.ndarray

    def __len__(self) -> int:
        return len(self.color)

    def scenes(self) -> list[Scene]:
        return [
            Scene(COLORS[c], SHAPES[s], POSITIONS[p], COLORS[b], STYLES[t])
            for c, s, p, b, t in zip(
                self.color.tolist(), self.shape.tolist(), self.position.tolist(),
                self.background.tolist(), self.style.tolist(),
            )
        ]


def sample_arrays(n: int, rng: np.random.Generator, style: str | None = None) -> SceneArrays:
    """`n` random scenes with jitter; `style` None draws styles uniformly."""
    color = rng.integers(0, len(COLORS), n)
    # A uniform pick among the other colours: skip over the shape's colour.
    background = rng.integers(0, len(COLORS) - 1, n)
    background = background + (background >= color)
    styles = (
        rng.integers(0, len(STYLES), n) if style is None else np.full(n, STYLES.index(style))
    )
    return SceneArrays(
        color=color,
        shape=rng.integers(0, len(SHAPES), n),
        position=rng.integers(0, len(POSITIONS), n),
        background=background,
        style=styles,
        dx=rng.integers(-CENTER_JITTER, CENTER_JITTER + 1, n),
        dy=rng.integers(-CENTER_JITTER, CENTER_JITTER + 1, n),
        size=rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1, n),
    )


def _inside_depth(arrays: SceneArrays) -> np.ndarray:
    """Per pixel, how deep inside its shape it lies in px (>= 0 inside, < 0 outside): [n, H, W]."""
    half = (arrays.size[:, None, None] / 2.0).astype(np.float32)
    cx = (ANCHORS[arrays.position, 0] + arrays.dx).astype(np.float32)[:, None, None]
    cy = (ANCHORS[arrays.position, 1] + arrays.dy).astype(np.float32)[:, None, None]
    # Pixel centres, so shapes are symmetric around (cx, cy).
    coords = np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5
    x = coords[None, None, :] - cx
    y = coords[None, :, None] - cy
    circle = half - np.sqrt(x * x + y * y)
    square = half - np.maximum(np.abs(x), np.abs(y))
    # Upward triangle: apex (0, -half), base y = +half from x = -half to +half.
    # Its sides satisfy 2|x| = y + half; dividing by sqrt(5) turns that into a distance.
    triangle = np.minimum(half - y, (y + half - 2 * np.abs(x)) / np.float32(np.sqrt(5.0)))
    shape = arrays.shape[:, None, None]
    return np.where(
        shape == SHAPES.index("circle"), circle,
        np.where(shape == SHAPES.index("square"), square, triangle),
    )


def render_arrays(arrays: SceneArrays) -> np.ndarray:
    """Images for a batch of scenes: uint8 [n, 64, 64, 3]."""
    depth = _inside_depth(arrays)
    painted = depth >= 0
    style = arrays.style[:, None, None]
    rows = np.arange(IMAGE_SIZE)[None, :, None]
    hollow = painted & (depth < OUTLINE_PX)
    striped = painted & ((rows // STRIPE_PX) % 2 == 0)
    mask = np.where(
        style == STYLES.index("hollow"), hollow,
        np.where(style == STYLES.index("striped"), striped, painted),
    )
    fg = PALETTE[arrays.color][:, None, None, :]
    bg = PALETTE[arrays.background][:, None, None, :]
    return np.where(mask[..., None], fg, bg).astype(np.uint8)


def _scene_arrays(scenes: list[Scene], jitters: list[Jitter]) -> SceneArrays:
    def index(values: list[str], allowed: tuple[str, ...]) -> np.ndarray:
        return np.array([allowed.index(v) for v in values], dtype=np.int64)

    return SceneArrays(
        color=index([s.color for s in scenes], COLORS),
        shape=index([s.shape for s in scenes], SHAPES),
        position=index([s.position for s in scenes], POSITIONS),
        background=index([s.background for s in scenes], COLORS),
        style=index([s.style for s in scenes], STYLES),
        dx=np.array([j.dx for j in jitters], dtype=np.int64),
        dy=np.array([j.dy for j in jitters], dtype=np.int64),
        size=np.array([j.size for j in jitters], dtype=np.int64),
    )


def render(scene: Scene, jitter: Jitter | np.random.Generator | None = None) -> np.ndarray:
    """One image, uint8 [64, 64, 3]. `jitter`: explicit, drawn from a Generator, or none."""
    if isinstance(jitter, np.random.Generator):
        drawn = sample_arrays(1, jitter)
        jitter = Jitter(int(drawn.dx[0]), int(drawn.dy[0]), int(drawn.size[0]))
    return render_arrays(_scene_arrays([scene], [jitter or Jitter()]))[0]


def sample_scenes(n: int, seed: int, style: str | None = None) -> list[Scene]:
    """`n` random scenes (the same as `make_batch(n, seed, style)` draws)."""
    return sample_arrays(n, np.random.default_rng(seed), style).scenes()


def make_batch(
    n: int, seed: int, style: str | None = None
) -> tuple[np.ndarray, list[str], list[Scene]]:
    """`n` random images (uint8 [n, 64, 64, 3]), their prompts and scenes."""
    arrays = sample_arrays(n, np.random.default_rng(seed), style)
    scenes = arrays.scenes()
    return render_arrays(arrays), [s.prompt for s in scenes], scenes
