import itertools
import json

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from uniref.budget import Size
from uniref.data.scenes import (
    BACKGROUND_COLOURS,
    OBJECT_COLOURS,
    PATTERN_COLOUR,
    SHAPES,
    Background,
    Scene,
    SceneObject,
    render,
    render_array,
)
from uniref.rewards.metrics import TAU


def _scene(shape: str = "star", pattern: str = "striped") -> Scene:
    obj = SceneObject(shape=shape, colour="red", pattern=pattern, cx=0.4, cy=0.6, size=0.5, rotation=10.0)
    return Scene(Background("gradient", ("sand", "navy"), 2), (obj,))


def test_palette_colours_are_separated_beyond_two_membership_radii():
    colours = list(OBJECT_COLOURS.values()) + [PATTERN_COLOUR]
    for a, b in itertools.combinations(colours, 2):
        assert np.linalg.norm(np.subtract(a, b)) > 2 * TAU
    for a in colours:
        for b in BACKGROUND_COLOURS.values():
            assert np.linalg.norm(np.subtract(a, b)) > 2 * TAU


def test_render_has_requested_size_for_any_aspect():
    for size in (Size(64, 64), Size(200, 50), Size(37, 129)):
        assert render(_scene(), size).size == (size.width, size.height)


def test_same_scene_renders_alike_at_two_sizes():
    small = np.asarray(render(_scene(), Size(64, 48)), dtype=np.float32)
    big = render(_scene(), Size(256, 192)).resize((64, 48), resample=2)  # bilinear
    assert np.abs(small - np.asarray(big, dtype=np.float32)).mean() < 8.0


def test_edges_are_antialiased():
    img = np.asarray(render(_scene("circle", "solid"), Size(64, 64)), dtype=np.float32)
    red = np.asarray(OBJECT_COLOURS["red"], dtype=np.float32)
    d = np.linalg.norm(img - red, axis=-1)
    assert ((d > 10) & (d < 120)).sum() > 20  # partial-coverage pixels exist along the edge


def test_shapes_are_distinct_silhouettes_at_16_pixels():
    masks = {}
    for shape in SHAPES:
        obj = SceneObject(shape=shape, colour="blue", pattern="solid", cx=0.5, cy=0.5, size=1.0)
        _, alphas = render_array(Scene(Background("grid", ("grey", "sage"), 4), (obj,)), Size(16, 16))
        masks[shape] = alphas[0]
    for a, b in itertools.combinations(SHAPES, 2):
        assert np.abs(masks[a] - masks[b]).mean() > 0.04, (a, b)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.sampled_from(SHAPES),
    cx=st.floats(-0.2, 1.2),
    cy=st.floats(-0.2, 1.2),
    size=st.floats(0.0, 1.5),
    rotation=st.floats(-20, 20),
    w=st.integers(1, 80),
    h=st.integers(1, 80),
)
def test_any_object_anywhere_renders_and_scene_json_round_trips(shape, cx, cy, size, rotation, w, h):
    obj = SceneObject(shape=shape, colour="cyan", pattern="dotted", cx=cx, cy=cy, size=size, rotation=rotation)
    scene = Scene(Background("texture", ("slate", "taupe"), 7), (obj,))
    img = render(scene, Size(w, h))
    assert img.size == (w, h)
    assert Scene.from_json(json.loads(json.dumps(scene.to_json()))) == scene
