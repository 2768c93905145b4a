"""Deterministic synthetic "shapes" VQA / captioning dataset in VQAv2, COCO-captions, COCO-instances and LLaVA formats.

Why: a real but tiny learning problem (colour, shape, counting, existence, spatial questions about rendered scenes)
that trains in minutes on one GPU and exercises every data path the project uses for real datasets. A fixed set of
held-out (shape, colour) combinations never appears in train/val/test images; the ``heldout`` split is made of
images that each contain at least one of them, to measure compositional generalisation.

Determinism: every image uses its own ``numpy`` Generator seeded with ``[seed, split, index]``; PNGs are written
by PIL with fixed parameters and JSON with ``sort_keys`` and a fixed indent, so the same seed gives byte-identical
files. Entry point: :func:`generate_dataset` (wrapped by ``data_scripts/make_synthetic.py``).

Presets (:data:`PRESETS`): ``default`` is the embedded setting (its files are pinned byte for byte by a test);
``hard`` is a setting in which a small dense model does not saturate: 2-6 objects, 7 shapes, 9 colours, 3 sizes,
``what size`` / ``is larger`` questions and two-hop relation questions ("what color is the object left of the
star?"), and 13 held-out (shape, colour) combinations (up to two per shape and per colour) instead of 4.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mmoe.constants import IMAGE_TOKEN
from mmoe.data.template import ASSISTANT_PREFIX, CAPTION_PROMPT, SHORT_ANSWER_SUFFIX, USER_PREFIX

GENERATOR_VERSION = "1.3"  # 1.3: plurals are stem + suffix tokens; 1.2: the short-answer instruction is one
# token; 1.1: 6 questions per training image (was 3); COCO instances files
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "cross": "crosses",
}
# plural -> singular for the tokenizer: "how many circles" then asks with the "circle" token every other question uses
INFLECTIONS = {**{plural: shape for shape, plural in PLURALS.items()}, "objects": "object", "shapes": "shape"}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (45, 85, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 135, 25),
}
SIZES: dict[str, float] = {"small": 0.11, "large": 0.17}  # circumradius as a fraction of the image side (large enough for 8-px patches)
SPLITS: tuple[str, ...] = ("train", "val", "test", "heldout")
HELDOUT_FRACTION = 0.15
MAX_OBJECTS = 4
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
CAPTIONS_PER_IMAGE = 5
ANSWERS_PER_QUESTION = 10
NOISY_QUESTION_RATE = (
    0.2  # fraction of questions with 1-2 of 10 annotator answers wrong (majority stays right)
)
# question category -> (VQAv2 question_type, answer_type)
QUESTION_TYPES: dict[str, tuple[str, str]] = {
    "color": ("what color", "other"),
    "shape": ("what shape", "other"),
    "count": ("how many", "number"),
    "exist": ("is there", "yes/no"),
    "spatial": ("is the", "yes/no"),
}
LICENSE = {"name": "CC0-1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}
# the hard preset's extra categories
QUESTION_TYPES.update({
    "size": ("what size", "other"),
    "compare": ("is larger", "yes/no"),
    "relation": ("what is the object", "other"),
})


@dataclass(frozen=True)
class SyntheticPreset:
    """The world a dataset is drawn from: vocabulary of shapes/colours/sizes, objects per image, held-out
    combinations and which extra question categories are asked (size/compare and two-hop relations)."""

    name: str
    shapes: tuple[str, ...]
    plurals: dict[str, str]
    colors: dict[str, tuple[int, int, int]]
    sizes: dict[str, float]
    min_objects: int = 1
    max_objects: int = MAX_OBJECTS
    heldout_fraction: float = HELDOUT_FRACTION
    heldout_per_attribute: int = 1  # held-out combos per shape and per colour (each stays seen with others)
    size_questions: bool = False
    relation_questions: bool = False

    @property
    def inflections(self) -> dict[str, str]:
        return {**{plural: shape for shape, plural in self.plurals.items()}, "objects": "object", "shapes": "shape"}

    @property
    def combos(self) -> list[tuple[str, str]]:
        return [(s, c) for s in self.shapes for c in self.colors]


PRESETS: dict[str, SyntheticPreset] = {
    "default": SyntheticPreset("default", SHAPES, PLURALS, COLORS, SIZES),
    "hard": SyntheticPreset(
        "hard",
        SHAPES + ("star", "hexagon"),
        {**PLURALS, "star": "stars", "hexagon": "hexagons"},
        {**COLORS, "pink": (245, 120, 185), "cyan": (40, 195, 205), "brown": (135, 85, 40)},
        {"small": 0.09, "medium": 0.125, "large": 0.16},
        min_objects=2,
        max_objects=6,
        heldout_fraction=0.2,
        heldout_per_attribute=2,
        size_questions=True,
        relation_questions=True,
    ),
}
DEFAULT_PRESET = PRESETS["default"]


def get_preset(preset: str | SyntheticPreset) -> SyntheticPreset:
    if isinstance(preset, SyntheticPreset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown synthetic preset {preset!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[preset]


@dataclass(frozen=True)
class SceneObject:
    """One rendered object; ``x, y, radius`` in pixels of the final image, ``rgb`` the jittered fill colour."""

    shape: str
    color: str
    size: str
    x: float
    y: float
    radius: float
    rgb: tuple[int, int, int]

    @property
    def combo(self) -> tuple[str, str]:
        return (self.shape, self.color)

    def to_json(self) -> dict:
        return {
            "shape": self.shape,
            "color": self.color,
            "size": self.size,
            "x": self.x,
            "y": self.y,
            "radius": self.radius,
            "rgb": list(self.rgb),
        }


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int]
    tone: str  # "dark" or "light", used in captions
    noise_std: float


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    category: str
    heldout: bool  # asks about (or counts) an object with a held-out combination


# ----------------------------------------------------------------------------------------------- scenes


def choose_heldout_combos(seed: int, fraction: float | None = None,
                          preset: SyntheticPreset = DEFAULT_PRESET) -> list[tuple[str, str]]:
    """~``fraction`` of (shape, colour) combos, at most ``preset.heldout_per_attribute`` per shape and per colour,
    so each held-out combo is a new pairing of a shape and a colour that are both still seen (with other
    partners) in training. One round of shape and colour permutations per allowed combo per attribute."""
    shape_names, color_names = preset.shapes, list(preset.colors)
    fraction = preset.heldout_fraction if fraction is None else fraction
    per = preset.heldout_per_attribute
    n = max(1, min(round(fraction * len(shape_names) * len(color_names)), per * len(shape_names),
                   per * len(color_names)))
    rng = np.random.default_rng([seed, 999])
    chosen: list[tuple[str, str]] = []
    for _round in range(per):
        shapes = rng.permutation(len(shape_names))
        colors = rng.permutation(len(color_names))
        for s, c in zip(shapes, colors):
            combo = (shape_names[s], color_names[c])
            if len(chosen) < n and combo not in chosen:
                chosen.append(combo)
    return sorted(chosen)


def _pick(rng: np.random.Generator, seq: Sequence):
    return seq[int(rng.integers(len(seq)))]


def sample_scene(
    rng: np.random.Generator,
    image_size: int,
    combos: Sequence[tuple[str, str]],
    required: tuple[str, str] | None = None,
    preset: SyntheticPreset = DEFAULT_PRESET,
) -> Scene:
    """``preset.min_objects``-``max_objects`` non-overlapping objects drawn from ``combos`` (plus ``required``
    first, if given)."""
    n = int(rng.integers(preset.min_objects, preset.max_objects + 1))
    gap = 0.03 * image_size
    while True:
        for _attempt in range(30):
            objects: list[SceneObject] = []
            for k in range(n):
                shape, color = required if (k == 0 and required is not None) else _pick(rng, combos)
                size = _pick(rng, list(preset.sizes))
                r = round(preset.sizes[size] * image_size, 2)
                rgb = tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in preset.colors[color])
                for _try in range(60):
                    x = round(float(rng.uniform(r + 1, image_size - r - 1)), 2)
                    y = round(float(rng.uniform(r + 1, image_size - r - 1)), 2)
                    if all(math.hypot(x - o.x, y - o.y) >= r + o.radius + gap for o in objects):
                        objects.append(SceneObject(shape, color, size, x, y, r, rgb))
                        break
                else:
                    break
            if len(objects) == n:
                order = rng.permutation(n)
                tone = _pick(rng, ("dark", "light"))
                level = int(rng.integers(20, 71)) if tone == "dark" else int(rng.integers(170, 216))
                background = tuple(int(np.clip(level + rng.integers(-8, 9), 0, 255)) for _ in range(3))
                noise = 0.0 if rng.random() < 0.5 else round(float(rng.uniform(1.0, 6.0)), 2)
                return Scene(tuple(objects[i] for i in order), background, tone, noise)
        n -= 1  # crowded: retry with fewer objects (never below 1, which always fits)


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        h = r * 0.8
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [
            (cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        ]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if shape == "cross":
        t, a = 0.32 * r, 0.95 * r
        return [
            (cx - t, cy - a),
            (cx + t, cy - a),
            (cx + t, cy - t),
            (cx + a, cy - t),
            (cx + a, cy + t),
            (cx + t, cy + t),
            (cx + t, cy + a),
            (cx - t, cy + a),
            (cx - t, cy + t),
            (cx - a, cy + t),
            (cx - a, cy - t),
            (cx - t, cy - t),
        ]
    if shape == "star":  # five points, inner radius 0.45 r
        return [(cx + (r if k % 2 == 0 else 0.45 * r) * math.cos(-math.pi / 2 + k * math.pi / 5),
                 cy + (r if k % 2 == 0 else 0.45 * r) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    if shape == "hexagon":
        return [(cx + r * math.cos(k * math.pi / 3), cy + r * math.sin(k * math.pi / 3)) for k in range(6)]
    return None


def render_scene(
    scene: Scene, image_size: int, rng: np.random.Generator, supersample: int = 4
) -> Image.Image:
    """Draw at ``supersample``x, box-downsample (anti-aliasing), then add optional Gaussian pixel noise."""
    big = image_size * supersample
    img = Image.new("RGB", (big, big), scene.background)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        cx, cy, r = o.x * supersample, o.y * supersample, o.radius * supersample
        poly = _shape_polygon(o.shape, cx, cy, r)
        if poly is None:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=o.rgb)
        else:
            draw.polygon(poly, fill=o.rgb)
    img = img.resize((image_size, image_size), Image.Resampling.BOX)
    if scene.noise_std > 0:
        arr = np.asarray(img, dtype=np.float64) + rng.normal(
            0.0, scene.noise_std, (image_size, image_size, 3)
        )
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="RGB")
    return img


# ----------------------------------------------------------------------------------------------- questions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _unique_attrs(obj: SceneObject, objects: Sequence[SceneObject], options: Sequence[tuple[str, ...]]):
    """First attribute tuple that identifies ``obj`` uniquely in the scene, else None."""
    for attrs in options:
        if sum(all(getattr(p, a) == getattr(obj, a) for a in attrs) for p in objects) == 1:
            return attrs
    return None


def _phrase(obj: SceneObject, attrs: Sequence[str]) -> str:
    return " ".join(getattr(obj, a) for a in ("size", "color", "shape") if a in attrs)


def candidate_questions(
    scene: Scene,
    rng: np.random.Generator,
    image_size: int,
    heldout: set[tuple[str, str]],
    allow_heldout: bool,
    preset: SyntheticPreset = DEFAULT_PRESET,
) -> list[QA]:
    """All unambiguous questions for a scene (only uniquely identifiable objects are referred to).

    ``allow_heldout=False`` keeps held-out combinations out of the question text (train/val/test)."""
    colors, shapes, plurals = preset.colors, preset.shapes, preset.plurals
    objs = scene.objects
    out: list[QA] = []
    is_ho = [o.combo in heldout for o in objs]

    for o, ho in zip(objs, is_ho):
        attrs = _unique_attrs(o, objs, [("shape",), ("size", "shape")])
        if attrs:
            tmpl = _pick(rng, ("What color is the {}?", "What is the color of the {}?"))
            out.append(QA(tmpl.format(_phrase(o, attrs)), o.color, "color", ho))
        attrs = _unique_attrs(o, objs, [("color",), ("size", "color")])
        if attrs:
            tmpl = _pick(rng, ("What shape is the {} object?", "What is the shape of the {} object?"))
            out.append(QA(tmpl.format(_phrase(o, attrs)), o.shape, "shape", ho))

    any_ho = any(is_ho)
    out.append(QA("How many objects are there?", str(len(objs)), "count", any_ho))
    present_colors = sorted({o.color for o in objs})
    absent_colors = [c for c in colors if c not in present_colors]
    for c in present_colors + [_pick(rng, absent_colors)]:
        hit = [h for o, h in zip(objs, is_ho) if o.color == c]
        out.append(QA(f"How many {c} objects are there?", str(len(hit)), "count", any(hit)))
    present_shapes = sorted({o.shape for o in objs})
    absent_shapes = [s for s in shapes if s not in present_shapes]
    for s in present_shapes + [_pick(rng, absent_shapes)]:
        hit = [h for o, h in zip(objs, is_ho) if o.shape == s]
        out.append(QA(f"How many {plurals[s]} are there?", str(len(hit)), "count", any(hit)))
    for size in sorted({o.size for o in objs}):
        hit = [h for o, h in zip(objs, is_ho) if o.size == size]
        out.append(QA(f"How many {size} objects are there?", str(len(hit)), "count", any(hit)))

    present = {o.combo for o in objs}
    present_sized = {(o.size, o.shape, o.color) for o in objs}
    for o, ho in zip(objs, is_ho):
        out.append(QA(f"Is there {_article(o.color)} {o.color} {o.shape}?", "yes", "exist", ho))
        out.append(QA(f"Is there a {o.size} {o.color} {o.shape}?", "yes", "exist", ho))
        other = "small" if o.size == "large" else "large"
        if (other, o.shape, o.color) not in present_sized:
            out.append(QA(f"Is there a {other} {o.color} {o.shape}?", "no", "exist", ho))
        # near-miss negatives: right shape with a wrong colour, right colour with a wrong shape
        for shape, color in ((o.shape, _pick(rng, list(colors))), (_pick(rng, shapes), o.color)):
            if (shape, color) in present or (not allow_heldout and (shape, color) in heldout):
                continue
            out.append(
                QA(f"Is there {_article(color)} {color} {shape}?", "no", "exist", (shape, color) in heldout)
            )

    threshold = 0.12 * image_size
    ref_options = [("color", "shape"), ("shape",), ("size", "color", "shape"), ("size", "shape")]
    for i, a in enumerate(objs):
        da = _unique_attrs(a, objs, ref_options)
        for j, b in enumerate(objs):
            db = _unique_attrs(b, objs, ref_options)
            if i == j or not da or not db:
                continue
            ho = is_ho[i] or is_ho[j]
            pa, pb = _phrase(a, da), _phrase(b, db)
            if abs(a.x - b.x) >= threshold:
                rel, opp = ("left of", "right of") if a.x < b.x else ("right of", "left of")
                out.append(QA(f"Is the {pa} {rel} the {pb}?", "yes", "spatial", ho))
                out.append(QA(f"Is the {pa} {opp} the {pb}?", "no", "spatial", ho))
            if abs(a.y - b.y) >= threshold:
                rel, opp = ("above", "below") if a.y < b.y else ("below", "above")
                out.append(QA(f"Is the {pa} {rel} the {pb}?", "yes", "spatial", ho))
                out.append(QA(f"Is the {pa} {opp} the {pb}?", "no", "spatial", ho))
    if preset.size_questions:
        out += _size_questions(scene, rng, is_ho)
    if preset.relation_questions:
        out += _relation_questions(scene, image_size, is_ho, ref_options)
    return out


def _size_questions(scene: Scene, rng: np.random.Generator, is_ho: Sequence[bool]) -> list[QA]:
    """``What size is the X?`` and ``Is the X larger/smaller than the Y?`` (objects named without their size)."""
    objs, out = scene.objects, []
    options = [("shape",), ("color", "shape")]
    for o, ho in zip(objs, is_ho):
        attrs = _unique_attrs(o, objs, options)
        if attrs:
            tmpl = _pick(rng, ("What size is the {}?", "How big is the {}?"))
            out.append(QA(tmpl.format(_phrase(o, attrs)), o.size, "size", ho))
    for i, a in enumerate(objs):
        da = _unique_attrs(a, objs, options)
        for j, b in enumerate(objs):
            db = _unique_attrs(b, objs, options)
            if i == j or not da or not db or a.size == b.size:
                continue
            ho = is_ho[i] or is_ho[j]
            pa, pb = _phrase(a, da), _phrase(b, db)
            bigger = a.radius > b.radius
            out.append(QA(f"Is the {pa} larger than the {pb}?", "yes" if bigger else "no", "compare", ho))
            out.append(QA(f"Is the {pa} smaller than the {pb}?", "no" if bigger else "yes", "compare", ho))
    return out


def _relation_questions(scene: Scene, image_size: int, is_ho: Sequence[bool],
                        ref_options: Sequence[tuple[str, ...]]) -> list[QA]:
    """Two-hop questions: ``What color/shape is the object left of the X?``, asked only when exactly one other
    object lies on that side of X (by at least the spatial threshold) and no other object is on that side at all."""
    objs, out = scene.objects, []
    threshold = 0.12 * image_size
    sides = {  # relation -> signed offset of the other object from the reference (positive: on that side)
        "left of": lambda o, b: b.x - o.x, "right of": lambda o, b: o.x - b.x,
        "above": lambda o, b: b.y - o.y, "below": lambda o, b: o.y - b.y,
    }
    for j, b in enumerate(objs):
        db = _unique_attrs(b, objs, ref_options)
        if not db:
            continue
        for rel, offset in sides.items():
            on_side = [i for i, o in enumerate(objs) if i != j and offset(o, b) > 0]
            if len(on_side) != 1 or offset(objs[on_side[0]], b) < threshold:
                continue
            a = objs[on_side[0]]
            ho = is_ho[on_side[0]] or is_ho[j]
            pb = _phrase(b, db)
            out.append(QA(f"What color is the object {rel} the {pb}?", a.color, "relation", ho))
            out.append(QA(f"What shape is the object {rel} the {pb}?", a.shape, "relation", ho))
    return out


def select_questions(cands: Sequence[QA], rng: np.random.Generator, n: int, prefer_heldout: bool) -> list[QA]:
    """Pick ``n`` distinct questions, spreading categories and balancing yes/no answers."""
    chosen: list[QA] = []
    used_q: set[str] = set()
    used_cat: set[str] = set()
    for _ in range(n):
        pool = [c for c in cands if c.question not in used_q]
        if prefer_heldout and any(c.heldout for c in pool):
            pool = [c for c in pool if c.heldout]
        if not pool:
            break
        cats = sorted({c.category for c in pool})
        fresh = [c for c in cats if c not in used_cat] or cats
        cat = _pick(rng, fresh)
        pool = [c for c in pool if c.category == cat]
        if QUESTION_TYPES[cat][1] == "yes/no":
            want = _pick(rng, ("yes", "no"))
            pool = [c for c in pool if c.answer == want] or pool
        qa = _pick(rng, pool)
        chosen.append(qa)
        used_q.add(qa.question)
        used_cat.add(cat)
    return chosen


def annotator_answers(qa: QA, rng: np.random.Generator, preset: SyntheticPreset = DEFAULT_PRESET) -> list[str]:
    """10 answers, all the ground truth except, for a few questions, 1-2 plausible mistakes."""
    colors, shapes = preset.colors, preset.shapes
    answers = [qa.answer] * ANSWERS_PER_QUESTION
    if rng.random() < NOISY_QUESTION_RATE:
        for idx in rng.choice(ANSWERS_PER_QUESTION, int(rng.integers(1, 3)), replace=False):
            if qa.category in ("exist", "spatial", "compare"):
                wrong = "no" if qa.answer == "yes" else "yes"
            elif qa.category == "size":
                wrong = _pick(rng, [z for z in preset.sizes if z != qa.answer])
            elif qa.category == "relation" and qa.answer in colors:
                wrong = _pick(rng, [c for c in colors if c != qa.answer])
            elif qa.category == "count":
                wrong = str(max(0, int(qa.answer) + _pick(rng, (-1, 1))) if qa.answer != "0" else 1)
            elif qa.category == "color":
                wrong = _pick(rng, [c for c in colors if c != qa.answer])
            else:
                wrong = _pick(rng, [s for s in shapes if s != qa.answer])
            answers[int(idx)] = wrong
    return answers


# ----------------------------------------------------------------------------------------------- captions


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _region(o: SceneObject, image_size: int) -> str:
    col = min(int(3 * o.x / image_size), 2)
    row = min(int(3 * o.y / image_size), 2)
    names = [
        ["top left", "top", "top right"],
        ["left", "center", "right"],
        ["bottom left", "bottom", "bottom right"],
    ]
    return names[row][col]


def make_captions(scene: Scene, rng: np.random.Generator, image_size: int) -> list[str]:
    """Five distinct, accurate, lowercase captions in different phrasings (objects listed left to right)."""
    objs = sorted(scene.objects, key=lambda o: (o.x, o.y))
    n = len(objs)

    def phrases(with_size: bool) -> list[str]:
        words = [f"{o.size} {o.color} {o.shape}" if with_size else f"{o.color} {o.shape}" for o in objs]
        return [f"{_article(w)} {w}" for w in words]

    def listing() -> str:
        return _join(phrases(bool(rng.random() < 0.5)))

    num, noun = NUMBER_WORDS[n], ("object" if n == 1 else "objects")
    if n == 1:
        o = objs[0]
        spatial = f"a single {o.size} {o.color} {o.shape} in the {_region(o, image_size)}"
    else:
        spatial = "from left to right: " + _join(phrases(True))
    templates: list[Callable[[], str]] = [
        listing,
        lambda: f"there {'is' if n == 1 else 'are'} {num} {noun}: {listing()}",
        lambda: f"{num} {'shape' if n == 1 else 'shapes'} on a {scene.tone} background: {listing()}",
        lambda: spatial,
        lambda: f"a picture of {listing()}",
        lambda: f"an image showing {listing()} on a {scene.tone} background",
    ]
    order = rng.permutation(len(templates))[:CAPTIONS_PER_IMAGE]
    return [templates[int(i)]() for i in order]


# ----------------------------------------------------------------------------------------------- writing


def _dump(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=True) + "\n", encoding="utf-8")


def image_file_name(split: str, image_id: int) -> str:
    """Path of an image relative to the dataset directory."""
    return f"images/{split}/{split}_{image_id:06d}.png"


def _info(split: str, seed: int) -> dict:
    return {
        "description": f"mmoe synthetic shapes dataset ({split} split)",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "contributor": "mmoe data_scripts/make_synthetic.py",
    }


def _vocabulary_texts(preset: SyntheticPreset = DEFAULT_PRESET) -> list[str]:
    """Every word the generator can emit, so the tokenizer never depends on which samples were drawn."""
    numbers = range(1, preset.max_objects + 1)
    words = (list(preset.shapes) + list(preset.plurals.values()) + list(preset.colors) + list(preset.sizes)
             + [NUMBER_WORDS[k] for k in numbers])
    extra = []
    if preset.size_questions:
        extra.append("what size is the how big is the is the larger than the is the smaller than the")
    if preset.relation_questions:
        extra.append("what color is the object left of the right of the above the below the what shape")
    return [
        " ".join(words),
        " ".join(str(k) for k in range(preset.max_objects + 1)) + " yes no dark light , :",
        CAPTION_PROMPT,
        SHORT_ANSWER_SUFFIX,
        USER_PREFIX + ASSISTANT_PREFIX,
        "top left top right bottom left bottom right center single",
        *extra,
    ]


def generate_split(
    out_dir: Path,
    split: str,
    n_images: int,
    first_image_id: int,
    seed: int,
    *,
    image_size: int,
    questions_per_image: int,
    heldout: list[tuple[str, str]],
    log: Callable[[str], None] = print,
    preset: SyntheticPreset = DEFAULT_PRESET,
    workers: int = 1,
) -> dict[str, list]:
    """Render one split's images and return its records (questions, annotations, captions, llava, scenes).

    ``workers`` > 1 renders contiguous ranges of images in that many processes; every image draws from its own
    generator, so the files are the same as with one."""
    img_dir = out_dir / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    job = _SplitJob(out_dir, split, n_images, first_image_id, seed, image_size, questions_per_image, heldout,
                    preset)
    if workers <= 1 or n_images < 2 * workers:
        return _render_range(job, 0, n_images, log)
    from concurrent.futures import ProcessPoolExecutor

    bounds = [n_images * k // workers for k in range(workers + 1)]
    starts, stops = bounds[:-1], bounds[1:]
    rec: dict[str, list] = {}
    with ProcessPoolExecutor(workers) as pool:
        for part in pool.map(_render_range, [job] * workers, starts, stops, [None] * workers):
            for k, v in part.items():
                rec.setdefault(k, []).extend(v)
    log(f"[make_synthetic] {split}: {n_images}/{n_images} images ({workers} workers)")
    return rec


@dataclass(frozen=True)
class _SplitJob:
    """One split's rendering settings (see :func:`generate_split`), shared by the processes that render it."""

    out_dir: Path
    split: str
    n_images: int
    first_image_id: int
    seed: int
    image_size: int
    questions_per_image: int
    heldout: list[tuple[str, str]]
    preset: SyntheticPreset


def _render_range(job: _SplitJob, start: int, stop: int, log: Callable[[str], None] | None) -> dict[str, list]:
    """Images ``start``..``stop - 1`` of a split (see :func:`generate_split`)."""
    out_dir, split, n_images, first_image_id = job.out_dir, job.split, job.n_images, job.first_image_id
    seed, image_size, heldout, preset = job.seed, job.image_size, job.heldout, job.preset
    split_index = SPLITS.index(split)
    all_combos = preset.combos
    ho_set = set(heldout)
    allowed = [c for c in all_combos if c not in ho_set]
    rec: dict[str, list] = {
        k: [] for k in ("questions", "annotations", "images", "captions", "llava", "scenes")
    }
    step = max(1, n_images // 4)
    for i in range(start, stop):
        rng = np.random.default_rng([seed, split_index, i])
        image_id = first_image_id + i
        is_ho_split = split == "heldout"
        scene = sample_scene(
            rng,
            image_size,
            all_combos if is_ho_split else allowed,
            required=_pick(rng, heldout) if is_ho_split else None,
            preset=preset,
        )
        file_name = image_file_name(split, image_id)
        render_scene(scene, image_size, rng).save(
            out_dir / file_name, format="PNG", optimize=False, compress_level=6
        )

        qas = select_questions(
            candidate_questions(scene, rng, image_size, ho_set, allow_heldout=is_ho_split, preset=preset),
            rng,
            job.questions_per_image,
            prefer_heldout=is_ho_split,
        )
        turns: list[tuple[str, str]] = []
        for k, qa in enumerate(qas):
            qid = image_id * 100 + k
            qtype, atype = QUESTION_TYPES[qa.category]
            rec["questions"].append({"image_id": image_id, "question": qa.question, "question_id": qid})
            answers = annotator_answers(qa, rng, preset)
            rec["annotations"].append(
                {
                    "question_id": qid,
                    "image_id": image_id,
                    "question_type": qtype,
                    "answer_type": atype,
                    "multiple_choice_answer": qa.answer,
                    "answers": [
                        {"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                        for j, a in enumerate(answers)
                    ],
                }
            )
            turns.append((qa.question + SHORT_ANSWER_SUFFIX, qa.answer))

        captions = make_captions(scene, rng, image_size)
        rec["images"].append(
            {"id": image_id, "file_name": file_name, "height": image_size, "width": image_size}
        )
        rec["captions"] += [
            {"id": image_id * 10 + j, "image_id": image_id, "caption": c} for j, c in enumerate(captions)
        ]
        if split == "train":
            # at a random turn on purpose: questions after the caption can be answered from its text, and that
            # easier lesson teaches the QA skill that image tokens then reuse (docs/results.md, caption position)
            turns.insert(int(rng.integers(len(turns) + 1)), (CAPTION_PROMPT, _pick(rng, captions)))
        if turns:
            turns[0] = (f"{IMAGE_TOKEN}\n{turns[0][0]}", turns[0][1])
            convs = [{"from": role, "value": v} for q, a in turns for role, v in (("human", q), ("gpt", a))]
            rec["llava"].append({"id": f"{split}_{image_id:06d}", "image": file_name, "conversations": convs})
        rec["scenes"].append(
            {
                "image_id": image_id,
                "file_name": file_name,
                "background": list(scene.background),
                "tone": scene.tone,
                "noise_std": scene.noise_std,
                "objects": [o.to_json() for o in scene.objects],
            }
        )
        if log is not None and ((i + 1) % step == 0 or i + 1 == n_images):
            log(f"[make_synthetic] {split}: {i + 1}/{n_images} images")
    return rec


def object_categories(preset: SyntheticPreset = DEFAULT_PRESET) -> list[dict]:
    """COCO categories, one per (colour, shape) pair: the object classes of the synthetic world."""
    return [{"id": i + 1, "name": f"{c} {s}", "supercategory": s} for i, (s, c) in enumerate(preset.combos)]


def instances_json(split: str, seed: int, rec: dict[str, list], preset: SyntheticPreset = DEFAULT_PRESET) -> dict:
    """COCO instances (object boxes and classes) of a split, from its scene records; what vision-tower
    pretraining reads (`mmoe.data.instances`), as it would read COCO's own instances files."""
    cat_id = {c["name"]: c["id"] for c in object_categories(preset)}
    anns = []
    for scene in rec["scenes"]:
        for o in scene["objects"]:
            r = o["radius"]
            anns.append({"id": len(anns) + 1, "image_id": scene["image_id"],
                         "category_id": cat_id[f"{o['color']} {o['shape']}"],
                         "bbox": [round(o["x"] - r, 2), round(o["y"] - r, 2), round(2 * r, 2), round(2 * r, 2)],
                         "area": round(4 * r * r, 2), "iscrowd": 0})
    return {"info": _info(split, seed), "licenses": [LICENSE], "images": rec["images"], "annotations": anns,
            "categories": object_categories(preset)}


def write_split(out_dir: Path, split: str, seed: int, rec: dict[str, list],
                preset: SyntheticPreset = DEFAULT_PRESET) -> None:
    """Write the split's VQAv2 questions/annotations, COCO captions, LLaVA conversations and scene records."""
    info = _info(split, seed)
    _dump(
        out_dir / f"{split}_questions.json",
        {
            "info": info,
            "task_type": "Open-Ended",
            "data_type": "synthetic",
            "data_subtype": split,
            "license": LICENSE,
            "questions": rec["questions"],
        },
    )
    _dump(
        out_dir / f"{split}_annotations.json",
        {
            "info": info,
            "data_type": "synthetic",
            "data_subtype": split,
            "license": LICENSE,
            "annotations": rec["annotations"],
        },
    )
    _dump(
        out_dir / f"{split}_captions.json",
        {
            "info": info,
            "licenses": [LICENSE],
            "type": "captions",
            "images": rec["images"],
            "annotations": rec["captions"],
        },
    )
    _dump(out_dir / f"{split}_llava.json", rec["llava"])
    _dump(out_dir / f"{split}_instances.json", instances_json(split, seed, rec, preset))
    _dump(out_dir / f"{split}_scenes.json", {"info": info, "split": split, "scenes": rec["scenes"]})


def generate_dataset(
    out_dir: str | Path,
    seed: int,
    *,
    n_train: int = 4000,
    n_val: int = 300,
    n_test: int = 500,
    n_heldout: int = 300,
    image_size: int = 64,
    questions_per_image: int = 3,
    train_questions_per_image: int | None = 6,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    preset: str | SyntheticPreset = "default",
    workers: int = 1,
) -> dict:
    """Generate all splits, the tokenizer and ``meta.json`` into ``out_dir``; returns the meta dict.

    ``preset`` names the world (:data:`PRESETS`): ``default`` or ``hard``. ``workers`` processes render the
    images (same files for any number)."""
    from mmoe.data.tokenizer import train_tokenizer  # local: keeps transformers out of plain rendering

    preset = get_preset(preset)

    sizes = {"train": n_train, "val": n_val, "test": n_test, "heldout": n_heldout}
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if any(n < 0 for n in sizes.values()):
        raise ValueError(f"split sizes must be >= 0, got {sizes}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 to draw 4 separable objects, got {image_size}")
    train_qpi = questions_per_image if train_questions_per_image is None else train_questions_per_image
    for name, n in (("questions_per_image", questions_per_image), ("train_questions_per_image", train_qpi)):
        if not 1 <= n <= 50:
            raise ValueError(f"{name} must be in 1..50, got {n}")
    out = Path(out_dir)
    stale = [p for s in SPLITS for p in sorted((out / "images" / s).glob(f"{s}_*.png"))]
    if stale and not overwrite:
        raise FileExistsError(
            f"{out} already holds generated images ({len(stale)} files); pass overwrite=True "
            "(--overwrite) to replace them"
        )
    for p in stale:
        p.unlink()
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    heldout = choose_heldout_combos(seed, preset=preset)
    texts = _vocabulary_texts(preset)
    next_id, split_meta = 1, {}
    for split in SPLITS:
        rec = generate_split(
            out, split, sizes[split], next_id, seed, image_size=image_size,
            questions_per_image=train_qpi if split == "train" else questions_per_image, heldout=heldout, log=log,
            preset=preset, workers=workers,
        )
        write_split(out, split, seed, rec, preset)
        texts += [q["question"] for q in rec["questions"]] + [
            a["multiple_choice_answer"] for a in rec["annotations"]
        ]
        texts += [c["caption"] for c in rec["captions"]]
        split_meta[split] = {
            "n_images": sizes[split],
            "first_image_id": next_id,
            "n_questions": len(rec["questions"]),
            "n_captions": len(rec["captions"]),
        }
        next_id += sizes[split]
    tokenizer = train_tokenizer(texts, out, phrases=[SHORT_ANSWER_SUFFIX], inflections=preset.inflections)
    meta = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "questions_per_image": questions_per_image,
        "train_questions_per_image": train_qpi,
        "shapes": list(preset.shapes),
        "colors": list(preset.colors),
        "sizes": list(preset.sizes),
        "heldout_combos": [list(c) for c in heldout],
        "splits": split_meta,
        "caption_prompt": CAPTION_PROMPT,
        "short_answer_suffix": SHORT_ANSWER_SUFFIX,
        "tokenizer_vocab_size": len(tokenizer),
    }
    if preset.name != "default":  # the default's meta.json stays byte-identical to earlier generators'
        meta["preset"] = preset.name
    _dump(out / "meta.json", meta)
    n_img = sum(m["n_images"] for m in split_meta.values())
    n_q = sum(m["n_questions"] for m in split_meta.values())
    log(
        f"[make_synthetic] done: {n_img} images, {n_q} questions, {n_img * CAPTIONS_PER_IMAGE} captions, "
        f"vocab {len(tokenizer)}, held-out combos {heldout}, {time.perf_counter() - t0:.1f}s -> {out}"
    )
    return meta
