"""Edit and composition tasks on the scene world, with instructions from a small grammar.

Every sample is a pure function of ``(seed, TaskConfig)``: one ``numpy.random.Generator(seed)`` drives
every choice, so the same seed always gives the same sample and no global RNG is touched.

Single edits (K = 1): recolour, move, resize, remove, add, background, repattern.
Compositions (K >= 2):
  * ``compose``: K-1 objects, each named only by a partial description ("the star from picture 2"), so
    its other attributes exist only in that picture, go to named slots on the background of another
    picture. References may hold distractor objects, and the background picture may hold objects that
    must not be copied. Every reference is needed: drop one and an object or the background is unknown.
  * ``transfer``: as compose, plus a donor picture whose object gives its colour or pattern to one of
    the placed objects (K >= 3).
  * ``conflict``: 2-3 large objects in overlapping slots, later pictures in front (K >= 3): each
    object occludes part of another, so being faithful to one reference costs another.

A drill, for training only (no evaluation family holds it, so the val and test sets stay as they are):
  * ``pick``: "take the background of picture N" among K = 2.. pictures that all hold objects: the
    target is that picture's background with its objects gone. It trains reading "picture N" at every
    K with no object to draw, the skill a composition loses first from K = 4 (docs/ablations.md).

The spec (JSON) of a sample::

    {"version": 1, "task": str, "seed": int,
     "target": {"width", "height", "scene": Scene.to_json()},
     "refs": [{"width", "height", "scene", "contributes": [{"what": "background" | "object"
               | "colour" | "pattern", "object": index into target objects (not for background)}]}],
     "objects": [{"bbox": [x0, y0, x1, y1] normalised, "slot": str | null}],   # one per target object
     "checks": [{"kind": "object" | "absent" | "background" | "colour" | "pattern", ...}]}

``checks`` are what the instruction asks for; :mod:`uniref.rewards` scores them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import numpy as np

from uniref.budget import Size
from uniref.data.sample import Sample
from uniref.data.scenes import (
    BACKGROUND_COLOURS,
    BACKGROUND_KINDS,
    GRADIENT_DIRECTIONS,
    GRID_CELLS,
    MAX_ROTATION,
    OBJECT_COLOURS,
    PATTERNS,
    SHAPES,
    Background,
    Scene,
    SceneObject,
    render,
)

SPEC_VERSION = 1
EDIT_TASKS = ("recolour", "move", "resize", "remove", "add", "background", "repattern")
COMPOSE_TASKS = ("compose", "transfer", "conflict")
DRILL_TASKS = ("pick",)
TASK_FAMILIES = {"edit": EDIT_TASKS, "compose": COMPOSE_TASKS}
MIN_REFS = {**dict.fromkeys(EDIT_TASKS, 1), "compose": 2, "transfer": 3, "conflict": 3, "pick": 2}
MAX_REFS = 10  # 9 placed objects (one per palette colour and per 3x3 slot) + 1 background
MAX_CONFLICT_OBJECTS = 3

# Nine named slots on a 3x3 grid of the target, centres in normalised coordinates.
SLOTS: dict[str, tuple[float, float]] = {
    "top left": (1 / 6, 1 / 6),
    "top": (1 / 2, 1 / 6),
    "top right": (5 / 6, 1 / 6),
    "left": (1 / 6, 1 / 2),
    "centre": (1 / 2, 1 / 2),
    "right": (5 / 6, 1 / 2),
    "bottom left": (1 / 6, 5 / 6),
    "bottom": (1 / 2, 5 / 6),
    "bottom right": (5 / 6, 5 / 6),
}
SLOT_SIZE = 0.28  # object diameter / short side in a slot: fits a 1/3 cell with a margin
CONFLICT_SIZE = 0.5  # large enough that neighbours 1/3 apart overlap by about a third
CONFLICT_SPACING = 0.7  # centre distance / diameter of conflicting objects: each pair overlaps by 30 %
REF_OBJECT_SIZE = (0.3, 0.55)  # diameter range of objects in references and edit scenes
RESIZE_FACTORS = {"bigger": 1.5, "smaller": 0.6}  # IoU of concentric 1x vs 1.5x (0.6x) is < 0.5
MAX_DISTRACTORS = 2
DISTRACTOR_PROB = 0.5
ASPECT_RANGE = (0.5, 2.0)  # width / height of generated images, log-uniform
PLACEMENT_TRIES = 50
PLACEMENT_SHRINK = 0.8  # size factor after every PLACEMENT_TRIES failed placements
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")
PATTERN_NOUNS = {"striped": "stripes", "dotted": "dots", "checked": "checks"}


@dataclass(frozen=True)
class SizeRange:
    """Side lengths (pixels) of generated images: the long side is drawn in [min_side, max_side]."""

    min_side: int = 48
    max_side: int = 160

    def __post_init__(self) -> None:
        if not 8 <= self.min_side <= self.max_side:
            raise ValueError(f"size range {self.min_side}:{self.max_side}: need 8 <= min <= max")

    @classmethod
    def parse(cls, text: str) -> SizeRange:
        """'48:160' -> SizeRange(48, 160); a single number fixes both."""
        parts = text.replace("-", ":").split(":")
        try:
            sides = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"size range {text!r}: expected MIN:MAX in pixels, e.g. 48:160") from None
        if len(sides) == 1:
            sides = sides * 2
        if len(sides) != 2:
            raise ValueError(f"size range {text!r}: expected MIN:MAX in pixels, e.g. 48:160")
        return cls(sides[0], sides[1])


@dataclass(frozen=True)
class TaskConfig:
    tasks: tuple[str, ...] = EDIT_TASKS + COMPOSE_TASKS  # tasks to draw from, uniformly
    max_refs: int = 4  # largest K for compositions
    size_range: SizeRange = SizeRange()

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in MIN_REFS]
        if unknown or not self.tasks:
            raise ValueError(f"unknown tasks {unknown}; choose from {list(MIN_REFS)} or families {list(TASK_FAMILIES)}")
        if not 1 <= self.max_refs <= MAX_REFS:
            raise ValueError(f"max_refs={self.max_refs}: must be in 1..{MAX_REFS}")

    @property
    def usable_tasks(self) -> tuple[str, ...]:
        return tuple(t for t in self.tasks if MIN_REFS[t] <= self.max_refs)


def parse_tasks(text: str) -> tuple[str, ...]:
    """'edit,compose' or 'recolour,conflict' -> task names (families expanded, order kept, unique)."""
    out: list[str] = []
    for name in (p.strip() for p in text.split(",") if p.strip()):
        for task in TASK_FAMILIES.get(name, (name,)):
            if task not in MIN_REFS:
                raise ValueError(f"unknown task {task!r}; choose from {list(TASK_FAMILIES)} or {list(MIN_REFS)}")
            if task not in out:
                out.append(task)
    return tuple(out)


# --- random building blocks ---------------------------------------------------------------------


def _pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


def _random_size(rng: np.random.Generator, sr: SizeRange) -> Size:
    long_side = int(rng.integers(sr.min_side, sr.max_side + 1))
    aspect = math.exp(rng.uniform(math.log(ASPECT_RANGE[0]), math.log(ASPECT_RANGE[1])))
    short = max(sr.min_side, round(long_side / max(aspect, 1 / aspect)))
    short = min(short, long_side)
    return Size(width=long_side, height=short) if aspect >= 1 else Size(width=short, height=long_side)


def _random_background(rng: np.random.Generator, kinds: Sequence[str] = BACKGROUND_KINDS) -> Background:
    a, b = rng.choice(list(BACKGROUND_COLOURS), size=2, replace=False)
    kind = _pick(rng, kinds)
    param = {
        "gradient": lambda: int(rng.integers(len(GRADIENT_DIRECTIONS))),
        "grid": lambda: int(rng.integers(GRID_CELLS[0], GRID_CELLS[1] + 1)),
        "texture": lambda: int(rng.integers(2**31)),
    }[kind]()
    return Background(kind=kind, colours=(str(a), str(b)), param=param)


def _random_object(rng: np.random.Generator, colour: str, shape: str, **fixed: float) -> SceneObject:
    values = {
        "cx": rng.uniform(0.25, 0.75),
        "cy": rng.uniform(0.25, 0.75),
        "size": rng.uniform(*REF_OBJECT_SIZE),
        "rotation": 0.0 if shape in ("circle", "ring") else rng.uniform(-MAX_ROTATION, MAX_ROTATION),
    }
    values.update(fixed)
    return SceneObject(shape=shape, colour=colour, pattern=str(_pick(rng, PATTERNS)), **values)


def _place_apart(rng: np.random.Generator, objs: list[SceneObject], canvas: Size) -> list[SceneObject]:
    """Re-draw positions so that no two objects touch, shrinking an object that finds no free spot."""
    placed: list[SceneObject] = []
    for obj in objs:
        candidate = obj
        for attempt in range(PLACEMENT_TRIES * 4):
            if attempt and attempt % PLACEMENT_TRIES == 0:
                obj = obj.replace(size=obj.size * PLACEMENT_SHRINK)
            r = obj.radius_px(canvas)
            mx, my = r / canvas.width, r / canvas.height
            candidate = obj.replace(cx=rng.uniform(mx, 1 - mx), cy=rng.uniform(my, 1 - my))
            if all(_distance_px(candidate, p, canvas) > r + p.radius_px(canvas) for p in placed):
                break
        placed.append(candidate)
    return placed


def _distance_px(a: SceneObject, b: SceneObject, canvas: Size) -> float:
    return math.hypot((a.cx - b.cx) * canvas.width, (a.cy - b.cy) * canvas.height)


def _slot_is_free(
    obj: SceneObject, slot: str, canvas: Size, others: Sequence[SceneObject], away_from: SceneObject | None = None
) -> bool:
    """``obj`` moved to ``slot`` touches none of ``others`` and (if given) leaves its old place."""
    moved = obj.replace(cx=SLOTS[slot][0], cy=SLOTS[slot][1])
    r = moved.radius_px(canvas)
    if away_from is not None and _distance_px(moved, away_from, canvas) <= r + away_from.radius_px(canvas):
        return False
    return all(_distance_px(moved, o, canvas) > r + o.radius_px(canvas) for o in others)


def _ref_phrase(rng: np.random.Generator, index: int) -> str:
    """Paraphrases of 'picture N' (1-based)."""
    n = index + 1
    return _pick(rng, (f"picture {n}", f"image {n}", f"the {ORDINALS[index]} image", f"the {ORDINALS[index]} picture"))


def _slot_phrase(rng: np.random.Generator, slot: str) -> str:
    if slot == "centre":
        return _pick(rng, ("in the centre", "in the middle"))
    if " " in slot:
        return _pick(rng, (f"in the {slot}", f"in the {slot} corner", f"at the {slot}"))
    return _pick(rng, (f"on the {slot}", f"at the {slot}")) if slot in ("left", "right") else f"at the {slot}"


def _short_desc(rng: np.random.Generator, obj: SceneObject, single: bool) -> str:
    """A description that is unique in its picture but leaves other attributes to the image."""
    options = [f"the {obj.shape}", f"the {obj.colour} {obj.shape}", f"the {obj.colour} shape"]
    if single:
        options.append("the object")
    return _pick(rng, options)


def _edit_desc(rng: np.random.Generator, obj: SceneObject) -> str:
    return _pick(rng, (obj.describe(), f"{obj.colour} {obj.shape}", obj.shape))


def _spec_objects(target: Scene, canvas: Size, slots: Sequence[str | None]) -> list[dict[str, Any]]:
    return [
        {"bbox": [round(v, 6) for v in o.bbox(canvas)], "slot": s} for o, s in zip(target.objects, slots, strict=True)
    ]


def _ref_entry(scene: Scene, size: Size, contributes: list[dict[str, Any]]) -> dict[str, Any]:
    return {"width": size.width, "height": size.height, "scene": scene.to_json(), "contributes": contributes}


# --- single edits -----------------------------------------------------------------------------------


def _edit(rng: np.random.Generator, task: str, cfg: TaskConfig) -> tuple[str, Scene, Size, Scene, dict[str, Any]]:
    """Returns instruction, reference scene, canvas, target scene, extra spec (slots, checks)."""
    canvas = _random_size(rng, cfg.size_range)
    n = int(rng.integers(1, 4))
    colours = [str(c) for c in rng.choice(list(OBJECT_COLOURS), size=n + 1, replace=False)]
    shapes = [str(s) for s in rng.choice(SHAPES, size=n + 1, replace=False)]
    objs = _place_apart(rng, [_random_object(rng, c, s) for c, s in zip(colours[:n], shapes[:n], strict=True)], canvas)
    ref = Scene(_random_background(rng), tuple(objs))
    i = int(rng.integers(n))
    obj, desc = objs[i], _edit_desc(rng, objs[i])
    new_objs = list(objs)
    checks: list[dict[str, Any]] = []
    slots: list[str | None] = [None] * n
    bg = ref.background
    if task == "recolour":
        colour = colours[n]
        new_objs[i] = obj.replace(colour=colour)
        text = _pick(rng, (f"make the {desc} {colour}", f"change the colour of the {desc} to {colour}",
                           f"turn the {desc} {colour}", f"paint the {desc} {colour}"))  # fmt: skip
        checks = [{"kind": "object", "object": i}, {"kind": "colour", "object": i}, {"kind": "absent", "obj": obj}]
    elif task == "move":
        others = objs[:i] + objs[i + 1 :]
        far = [s for s in SLOTS if _slot_is_free(obj, s, canvas, others, away_from=obj)]
        slot = str(_pick(rng, far or list(SLOTS)))
        new_objs[i] = obj.replace(cx=SLOTS[slot][0], cy=SLOTS[slot][1], size=min(obj.size, SLOT_SIZE))
        slots[i] = slot
        text = _pick(rng, (f"move the {desc} to the {slot}", f"place the {desc} {_slot_phrase(rng, slot)}"))
        checks = [{"kind": "object", "object": i}, {"kind": "absent", "obj": obj}]
    elif task == "resize":
        word = _pick(rng, list(RESIZE_FACTORS))
        new_objs[i] = obj.replace(size=obj.size * RESIZE_FACTORS[word])
        verb = "enlarge" if word == "bigger" else "shrink"
        text = _pick(rng, (f"make the {desc} {word}", f"{verb} the {desc}"))
        checks = [{"kind": "object", "object": i}]
    elif task == "remove":
        del new_objs[i]
        del slots[i]
        text = _pick(rng, (f"remove the {desc}", f"delete the {desc}", f"erase the {desc}", f"take away the {desc}"))
        checks = [{"kind": "absent", "obj": obj}]
    elif task == "add":
        free = [
            s
            for s, (x, y) in SLOTS.items()
            if all(
                _distance_px(o.replace(cx=x, cy=y), o, canvas) > o.radius_px(canvas) + SLOT_SIZE * min(canvas) / 2
                for o in objs
            )
        ]
        slot = str(_pick(rng, free or list(SLOTS)))
        new = _random_object(rng, colours[n], shapes[n], cx=SLOTS[slot][0], cy=SLOTS[slot][1], size=SLOT_SIZE)
        new_objs.append(new)
        slots.append(slot)
        article = "an" if new.describe()[0] in "aeiou" else "a"
        text = _pick(rng, (f"add {article} {new.describe()} {_slot_phrase(rng, slot)}",
                           f"put {article} {new.describe()} {_slot_phrase(rng, slot)}"))  # fmt: skip
        checks = [{"kind": "object", "object": n}]
    elif task == "background":
        while bg == ref.background:
            bg = _random_background(rng, kinds=("gradient", "grid"))  # textures cannot be described exactly
        text = _pick(rng, (f"replace the background with {bg.describe()}", f"change the background to {bg.describe()}"))
        checks = [{"kind": "background"}]
    elif task == "repattern":
        pattern = str(_pick(rng, [p for p in PATTERNS if p != obj.pattern]))
        new_objs[i] = obj.replace(pattern=pattern)
        if pattern == "solid":
            text = _pick(rng, (f"make the {desc} plain", f"remove the pattern from the {desc}"))
        else:
            text = _pick(rng, (f"make the {desc} {pattern}", f"give the {desc} {PATTERN_NOUNS[pattern]}"))
        checks = [{"kind": "object", "object": i}, {"kind": "pattern", "object": i}]
    else:
        raise ValueError(f"not an edit task: {task!r}")
    target = Scene(bg, tuple(new_objs))
    return text, ref, canvas, target, {"slots": slots, "checks": checks}


# --- compositions -----------------------------------------------------------------------------------


def _object_ref(rng: np.random.Generator, obj: SceneObject, cfg: TaskConfig) -> tuple[Scene, Size, SceneObject]:
    """A reference picture showing ``obj`` (own position/size) among distractors of other shape and colour."""
    size = _random_size(rng, cfg.size_range)
    n_distract = int(rng.integers(1, MAX_DISTRACTORS + 1)) if rng.random() < DISTRACTOR_PROB else 0
    colours = [str(c) for c in rng.choice([c for c in OBJECT_COLOURS if c != obj.colour], n_distract, replace=False)]
    shapes = [str(s) for s in rng.choice([s for s in SHAPES if s != obj.shape], n_distract, replace=False)]
    shown = obj.replace(size=rng.uniform(*REF_OBJECT_SIZE))
    others = [_random_object(rng, c, s) for c, s in zip(colours, shapes, strict=True)]
    placed = _place_apart(rng, [shown, *others], size)
    order = rng.permutation(len(placed))
    return Scene(_random_background(rng), tuple(placed[j] for j in order)), size, placed[0]


def _background_picture(rng: np.random.Generator, always_objects: bool = False) -> Scene:
    """A background, with some objects on it (with DISTRACTOR_PROB unless ``always_objects``) that a
    copy of the background drops."""
    background = _random_background(rng)
    if not always_objects and rng.random() >= DISTRACTOR_PROB:
        return Scene(background, ())
    n = int(rng.integers(1, MAX_DISTRACTORS + 1))
    colours = [str(c) for c in rng.choice(list(OBJECT_COLOURS), size=n, replace=False)]
    return Scene(background, tuple(_random_object(rng, c, str(_pick(rng, SHAPES))) for c in colours))


def _pick_background(rng: np.random.Generator, k: int, cfg: TaskConfig) -> tuple[str, list, Size, Scene, dict]:
    """The ``pick`` drill: every picture shows objects on a background; the named one's background alone
    is the target, at that picture's size. Every picture holds objects, so "the one without objects" is
    no shortcut to the named one."""
    named = int(rng.integers(k))
    refs: list[Any] = []
    for i in range(k):
        if i == named:
            refs.append((_background_picture(rng, always_objects=True), _random_size(rng, cfg.size_range),
                         [{"what": "background"}]))  # fmt: skip
        else:
            colour, shape = str(_pick(rng, list(OBJECT_COLOURS))), str(_pick(rng, SHAPES))
            scene, size, _ = _object_ref(rng, _random_object(rng, colour, shape), cfg)
            refs.append((scene, size, []))
    bg_scene, canvas, _ = refs[named]
    verb = _pick(rng, ("take the background of", "take the background from"))
    text = f"{verb} {_ref_phrase(rng, named)}"
    return text, refs, canvas, Scene(bg_scene.background, ()), {"slots": [], "checks": [{"kind": "background"}]}


def _compose(rng: np.random.Generator, task: str, k: int, cfg: TaskConfig) -> tuple[str, list, Size, Scene, dict]:
    n_donor = 1 if task == "transfer" else 0
    n = k - 1 - n_donor
    colours = [str(c) for c in rng.choice(list(OBJECT_COLOURS), size=n + n_donor, replace=False)]
    shapes = [str(_pick(rng, SHAPES)) for _ in range(n + n_donor)]
    positions = rng.permutation(k)  # picture index of each role: [background, objects..., donor]
    bg_index, obj_index = int(positions[0]), [int(p) for p in positions[1 : n + 1]]
    canvas = _random_size(rng, cfg.size_range)
    if task == "conflict":
        horizontal = canvas.width >= canvas.height
        names = (
            {2: ("left", "right"), 3: ("left", "centre", "right")}
            if horizontal
            else {2: ("top", "bottom"), 3: ("top", "centre", "bottom")}
        )
        slots = list(names[n])
        step = CONFLICT_SPACING * CONFLICT_SIZE * min(canvas) / max(canvas)
        offsets = (np.arange(n) - (n - 1) / 2) * step
        centres = [(0.5 + o, 0.5) if horizontal else (0.5, 0.5 + o) for o in offsets]
        obj_size = CONFLICT_SIZE
    else:
        slots = [str(s) for s in rng.choice(list(SLOTS), size=n, replace=False)]
        centres = [SLOTS[s] for s in slots]
        obj_size = SLOT_SIZE
    bases = [
        _random_object(rng, c, s, cx=x, cy=y, size=obj_size)
        for c, s, (x, y) in zip(colours[:n], shapes[:n], centres, strict=True)
    ]
    if task == "conflict":
        # Later pictures are painted in front: sort objects by their picture index.
        order = np.argsort(obj_index)
        obj_index, slots, bases = [obj_index[j] for j in order], [slots[j] for j in order], [bases[j] for j in order]
    bg_ref_scene = _background_picture(rng)
    refs: list[Any] = [None] * k
    refs[bg_index] = (bg_ref_scene, canvas, [{"what": "background"}])
    phrases = []
    for j, (base, idx, slot) in enumerate(zip(bases, obj_index, slots, strict=True)):
        scene, size, shown = _object_ref(rng, base, cfg)
        refs[idx] = (scene, size, [{"what": "object", "object": j}])
        desc = _short_desc(rng, shown, single=len(scene.objects) == 1)
        phrases.append(f"{desc} from {_ref_phrase(rng, idx)} {_slot_phrase(rng, slot)}")
    targets = list(bases)
    extra_text, checks = "", [{"kind": "object", "object": j} for j in range(n)] + [{"kind": "background"}]
    if task == "transfer":
        donor_index = int(positions[-1])
        attr = _pick(rng, ("colour", "pattern"))
        j = int(rng.integers(n))
        donor = _random_object(rng, colours[-1], shapes[-1])
        if attr == "pattern":
            donor = donor.replace(pattern=str(_pick(rng, [p for p in PATTERNS if p != bases[j].pattern])))
        scene, size, shown = _object_ref(rng, donor, cfg)
        refs[donor_index] = (scene, size, [{"what": attr, "object": j}])
        targets[j] = bases[j].replace(**{attr: getattr(donor, attr)})
        recipient = f"the {bases[j].shape} from {_ref_phrase(rng, obj_index[j])}"
        donor_desc = _short_desc(rng, shown, single=len(scene.objects) == 1)
        extra_text = f", then give {recipient} the {attr} of {donor_desc} in {_ref_phrase(rng, donor_index)}"
        checks.append({"kind": attr, "object": j})
    bg_phrase = _pick(rng, ("on the background of", "onto the background of", "over the background from"))
    listed = ", ".join(phrases[:-1]) + (" and " if n > 1 else "") + phrases[-1]
    verb = _pick(rng, ("put", "place", "arrange"))
    text = f"{verb} {listed} {bg_phrase} {_ref_phrase(rng, bg_index)}{extra_text}"
    if task == "conflict":
        front = _ref_phrase(rng, obj_index[-1]) if n == 2 else "later pictures"
        text += f", overlapping, with {front} in front"
    target = Scene(bg_ref_scene.background, tuple(targets))
    return text, refs, canvas, target, {"slots": slots, "checks": checks}


# --- public API -------------------------------------------------------------------------------------


def generate(seed: int, config: TaskConfig | None = None) -> Sample:
    """The sample of ``seed`` under ``config``: a pure function of both."""
    cfg = config or TaskConfig()
    usable = cfg.usable_tasks
    if not usable:
        raise ValueError(f"no task in {list(cfg.tasks)} works with max_refs={cfg.max_refs} (need {MIN_REFS})")
    rng = np.random.default_rng(seed)
    task = str(_pick(rng, usable))
    if task in EDIT_TASKS:
        text, ref_scene, canvas, target, extra = _edit(rng, task, cfg)
        # The reference contributes its background (unless replaced) and every object it still shows.
        added = len(target.objects) - 1 if task == "add" else None
        contrib = [] if task == "background" else [{"what": "background"}]
        contrib += [{"what": "object", "object": j} for j in range(len(target.objects)) if j != added]
        refs = [(ref_scene, canvas, contrib)]
    else:
        hi = min(cfg.max_refs, MIN_REFS[task] + MAX_CONFLICT_OBJECTS - 2 if task == "conflict" else cfg.max_refs)
        k = int(rng.integers(MIN_REFS[task], hi + 1))
        compose = _pick_background if task == "pick" else partial(_compose, task=task)
        text, refs, canvas, target, extra = compose(rng, k=k, cfg=cfg)
    checks = [_jsonable_check(c) for c in extra["checks"]]
    spec = {
        "version": SPEC_VERSION,
        "task": task,
        "seed": int(seed),
        "target": {"width": canvas.width, "height": canvas.height, "scene": target.to_json()},
        "refs": [_ref_entry(scene, size, contrib) for scene, size, contrib in refs],
        "objects": _spec_objects(target, canvas, extra["slots"]),
        "checks": checks,
    }
    images = [render(scene, size) for scene, size, _ in refs]
    return Sample(instruction=text, refs=images, target=render(target, canvas), task=task, spec=spec)


def _jsonable_check(check: dict[str, Any]) -> dict[str, Any]:
    if "obj" in check:
        return {"kind": check["kind"], "obj": asdict(check["obj"])}
    return check


def render_spec(spec: dict[str, Any], canvas: Size | None = None) -> Sample:
    """Re-render a sample from its spec (optionally at another target size); the instruction is not stored."""
    t = spec["target"]
    size = canvas or Size(width=t["width"], height=t["height"])
    refs = [render(Scene.from_json(r["scene"]), Size(width=r["width"], height=r["height"])) for r in spec["refs"]]
    return Sample(
        instruction="", refs=refs, target=render(Scene.from_json(t["scene"]), size), task=spec["task"], spec=spec
    )
