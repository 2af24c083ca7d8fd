"""The demo world's generator: deterministic, faithful to the grammar, styles visibly distinct."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from tandem.demo.grammar import COLORS, POSITIONS, SHAPES, STYLES, Scene, parse_prompt
from tandem.demo.world import (
    IMAGE_SIZE,
    RGB,
    STRIPE_PX,
    Jitter,
    make_batch,
    render,
    sample_arrays,
    sample_scenes,
)

# sha256 of make_batch(64, 123)'s images: the same seed must give the same pixels everywhere.
GOLDEN_SHA256 = "d4a76161c0d9618fbdf9015bc70030bfa3260b8b571ab3f7605534ac4d253c62"


def test_same_seed_same_images_everywhere() -> None:
    images, prompts, scenes = make_batch(64, 123)
    again, prompts_again, _ = make_batch(64, 123)
    assert images.dtype == np.uint8 and images.shape == (64, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.array_equal(images, again) and prompts == prompts_again
    assert hashlib.sha256(images.tobytes()).hexdigest() == GOLDEN_SHA256
    assert not np.array_equal(images, make_batch(64, 124)[0])


def test_sample_scenes_matches_make_batch() -> None:
    assert sample_scenes(32, 5, "hollow") == make_batch(32, 5, "hollow")[2]


def test_prompts_follow_the_grammar() -> None:
    _, prompts, scenes = make_batch(500, 1)
    for prompt, scene in zip(prompts, scenes):
        assert prompt == scene.prompt
        parsed = parse_prompt(prompt)
        assert (parsed.color, parsed.shape, parsed.position, parsed.background) == (
            scene.color, scene.shape, scene.position, scene.background)


def test_background_never_the_shape_colour_and_all_values_drawn() -> None:
    scenes = sample_scenes(3000, 2)
    assert all(s.color != s.background for s in scenes)
    assert {s.color for s in scenes} == set(COLORS)
    assert {s.background for s in scenes} == set(COLORS)
    assert {s.shape for s in scenes} == set(SHAPES)
    assert {s.position for s in scenes} == set(POSITIONS)
    assert {s.style for s in scenes} == set(STYLES)
    assert {s.style for s in sample_scenes(50, 2, "striped")} == {"striped"}


def test_images_hold_exactly_the_two_prompt_colours() -> None:
    images, _, scenes = make_batch(300, 3)
    for image, scene in zip(images, scenes):
        colours = {tuple(c) for c in image.reshape(-1, 3).tolist()}
        assert colours == {RGB[scene.color], RGB[scene.background]}
        assert tuple(image[0, 0]) == RGB[scene.background]  # corners are never covered


def _foreground(image: np.ndarray, scene: Scene) -> np.ndarray:
    return np.all(image == RGB[scene.color], axis=-1)


def test_positions_stay_as_asked() -> None:
    images, _, scenes = make_batch(400, 4, "filled")
    for image, scene in zip(images, scenes):
        ys, xs = np.nonzero(_foreground(image, scene))
        cx, cy = xs.mean(), ys.mean()
        if scene.position == "left":
            assert cx < 24
        elif scene.position == "right":
            assert cx > 40
        elif scene.position == "top":
            assert cy < 26  # a triangle's mass sits low in its box
        elif scene.position == "bottom":
            assert cy > 40
        else:
            assert 24 < cx < 40 and 24 < cy < 42


@pytest.mark.parametrize("shape", SHAPES)
def test_hollow_interior_is_background_and_filled_is_not(shape: str) -> None:
    jitter = Jitter(dx=0, dy=0, size=28)
    # A point well inside each shape: the centre, or a triangle's centroid (a third down).
    y, x = (32 + 28 // 6, 32) if shape == "triangle" else (32, 32)
    filled = render(Scene("red", shape, "center", "blue", "filled"), jitter)
    hollow = render(Scene("red", shape, "center", "blue", "hollow"), jitter)
    assert tuple(filled[y, x]) == RGB["red"]
    assert tuple(hollow[y, x]) == RGB["blue"]
    # The outline is drawn where the filled shape's edge is, and nothing outside the shape.
    edge = _foreground(filled, Scene("red", shape, "center", "blue"))
    outline = _foreground(hollow, Scene("red", shape, "center", "blue"))
    assert outline.any() and not (outline & ~edge).any()
    assert outline.sum() < edge.sum()


def test_stripes_alternate_rows_of_colour_and_background() -> None:
    scene = Scene("yellow", "square", "center", "black", "striped")
    image = render(scene, Jitter(0, 0, 28))
    column = _foreground(image, scene)[18:46, 32]  # the square spans rows 18..45
    expected = (np.arange(18, 46) // STRIPE_PX) % 2 == 0
    assert np.array_equal(column, expected)
    assert column.any() and (~column).any()


def test_styles_differ_for_the_same_scene_and_jitter() -> None:
    for shape in SHAPES:
        images = [render(Scene("white", shape, "left", "purple", style), Jitter(1, -1, 26))
                  for style in STYLES]
        for i in range(len(images)):
            for j in range(i + 1, len(images)):
                assert not np.array_equal(images[i], images[j])


def test_render_accepts_a_generator_for_jitter() -> None:
    scene = Scene("green", "triangle", "top", "white")
    first = render(scene, np.random.default_rng(9))
    assert np.array_equal(first, render(scene, np.random.default_rng(9)))
    assert first.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)


def test_jitter_is_small() -> None:
    arrays = sample_arrays(2000, np.random.default_rng(0))
    assert np.abs(arrays.dx).max() <= 2 and np.abs(arrays.dy).max() <= 2
    assert 24 <= arrays.size.min() and arrays.size.max() <= 30
