"""The built-in synthetic dataset: one drawn shape per image, described by five reference captions, and asked about
in five questions (`--task vqa`: what colour, which shape, where, how big, is there a <shape>?).

Shape, colour, size and position vary, so a captioner must look at the image to score well; everything is
deterministic for a seed, and the images are written once as PNG files so the normal file-based path reads them.
The questions are made from each image's drawing when read; both tasks share the images and their splits, so the
test images are held out from training in both.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from captune.data import CaptionSet, ReadOptions, Record
from captune.data.vqa import QuestionListing, VqaReadOptions, VqaSet, usable_questions
from captune.errors import CaptuneError

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 215, 30)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 7, "large": 14}
POSITIONS = {"left": (16, 32), "right": (48, 32), "top": (32, 16), "bottom": (32, 48)}
TEMPLATES = (
    "a {size} {colour} {shape} on the {position}",
    "a {colour} {shape} at the {position}",
    "there is a {size} {colour} {shape} on the {position}",
    "{size} {colour} {shape} in the {position}",
    "a picture of a {colour} {shape} on the {position}",
)
MANIFEST = "synthetic.json"
QUESTIONS = (
    ("what colour is the shape?", "colour", "what color is the"),
    ("which shape is it?", "shape", "which"),
    ("where is the {shape}?", "position", "where is the"),
    ("how big is the {shape}?", "size", "how"),
)
"""(question, the drawing's attribute that answers it, VQAv2's question type) of the open questions; each image also
gets `is there a <shape>?`, about its own shape on every other image and about another shape on the rest."""
ANNOTATORS = 10
"""Answers per question, all the same, as VQAv2's ten: with one answer the official accuracy could never be 1."""


@dataclass(frozen=True)
class SyntheticSpec:
    """How many images per split and the seed; stored in the manifest so a folder is regenerated when it changes."""

    train: int = 1200
    val: int = 100
    test: int = 100
    seed: int = 0
    image_size: int = 64
    distinct_test: bool = False
    """Draw each test image with a colour, shape, size and position no other test image has (at most 96 test
    images), so that a held-out caption naming all four fits one image only (the retrieval demo's test split; the
    captions without the size fit at most two). Train and val images are the same as without it."""


@dataclass(frozen=True)
class Drawing:
    """What one image shows, drawn from the seeded random stream before it is rendered."""

    colour: str
    shape: str
    size: str
    """`small` or `large`."""
    position: str
    centre: tuple[float, float]
    radius: float
    background: tuple[int, ...]


def _drawing(rng: random.Random, size: int) -> Drawing:
    """The next image's attributes; the random calls (their number and order) fix every later image of a seed."""
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    scale, position = rng.choice(list(SIZES)), rng.choice(list(POSITIONS))
    factor = size / 64
    cx, cy = (c * factor + rng.uniform(-3, 3) * factor for c in POSITIONS[position])
    background = tuple(rng.randint(225, 255) for _ in range(3))
    return Drawing(colour, shape, scale, position, (cx, cy), SIZES[scale] * factor, background)


def _render(drawing: Drawing, size: int) -> Image.Image:
    (cx, cy), radius, fill = drawing.centre, drawing.radius, COLOURS[drawing.colour]
    image = Image.new("RGB", (size, size), drawing.background)
    pen = ImageDraw.Draw(image)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if drawing.shape == "circle":
        pen.ellipse(box, fill=fill)
    elif drawing.shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
    return image


def _captions(drawing: Drawing) -> tuple[str, ...]:
    words = {"size": drawing.size, "colour": drawing.colour, "shape": drawing.shape, "position": drawing.position}
    return tuple(t.format(**words) for t in TEMPLATES)


def draw(rng: random.Random, size: int) -> tuple[Image.Image, tuple[str, ...]]:
    """One image and its five captions."""
    drawing = _drawing(rng, size)
    return _render(drawing, size), _captions(drawing)


def drawings(spec: SyntheticSpec) -> Iterator[tuple[str, str, Drawing]]:
    """(file name, split, drawing) of each image of `spec`, in generation order, without rendering."""
    kinds = len(COLOURS) * len(SHAPES) * len(SIZES) * len(POSITIONS)
    if spec.distinct_test and spec.test > kinds:
        raise CaptuneError(f"synthetic data: {spec.test} distinct test images asked for, but only {kinds} "
                           "combinations of colour, shape, size and position exist")  # fmt: skip
    rng = random.Random(spec.seed)
    for split in ("train", "val", "test"):
        seen: set[tuple[str, ...]] = set()
        for i in range(getattr(spec, split)):
            drawing = _drawing(rng, spec.image_size)
            while split == "test" and spec.distinct_test and _attributes(drawing) in seen:
                drawing = _drawing(rng, spec.image_size)
            seen.add(_attributes(drawing))
            yield f"{split}-{i:05d}.png", split, drawing


def _attributes(drawing: Drawing) -> tuple[str, ...]:
    return drawing.colour, drawing.shape, drawing.size, drawing.position


ATTRIBUTES = {"colour": tuple(COLOURS), "shape": SHAPES, "size": tuple(SIZES), "position": tuple(POSITIONS)}
"""Each attribute a synthetic image's captions name, with its words."""


def attribute_accuracy(data_dir: Path, captions: dict[str, str]) -> dict[str, float]:
    """The share (0-1) of `captions` (image file name -> generated caption, of images of the folder's spec) that name
    each attribute of their image right (`colour_right`, `shape_right`, `size_right`, `position_right`): the image's
    word and no other word of that attribute. `size_right` counts a caption without a size as wrong, as two of the
    five reference templates leave it out; `size_named` is the share that name one at all.

    Raises:
        CaptuneError: a caption's image is not one of the folder's.
    """
    spec = SyntheticSpec(**json.loads((data_dir / MANIFEST).read_text())["spec"])
    attributes = {name: drawing for name, _, drawing in drawings(spec)}
    unknown = sorted(set(captions) - set(attributes))
    if unknown:
        raise CaptuneError(f"{data_dir / MANIFEST}: no image {unknown[0]!r} ({len(unknown)} captions of unknown "
                           "images); score captions of that folder's images only")  # fmt: skip
    right = dict.fromkeys([*ATTRIBUTES, "size_named"], 0)
    for name, caption in captions.items():
        words = set(caption.lower().split())
        for attribute, values in ATTRIBUTES.items():
            named = words & set(values)
            right[attribute] += named == {getattr(attributes[name], attribute)}
            if attribute == "size":
                right["size_named"] += bool(named)
    return {(key if key == "size_named" else f"{key}_right"): count / max(len(captions), 1)
            for key, count in right.items()}  # fmt: skip


def generate_synthetic(data_dir: Path, spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Writes the images and `synthetic.json` into data_dir unless the same spec is already there."""
    manifest = data_dir / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()).get("spec") == asdict(spec):
        return manifest
    (data_dir / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for name, split, drawing in drawings(spec):
        _render(drawing, spec.image_size).save(data_dir / "images" / name)
        entries.append({"image": name, "split": split, "captions": list(_captions(drawing))})
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text(json.dumps({"spec": asdict(spec), "images": entries}))
    tmp.replace(manifest)
    return manifest


def read_synthetic(data_dir: Path, options: ReadOptions) -> CaptionSet:
    """Reads the synthetic folder, generating it with the default spec on first use."""
    manifest = data_dir / MANIFEST
    if not manifest.is_file():
        generate_synthetic(data_dir)
    entries = json.loads(manifest.read_text())["images"]
    records = [
        Record(e["image"], (data_dir / "images" / e["image"]).resolve(), tuple(e["captions"]), e["split"])
        for e in entries
    ]
    return CaptionSet(records)


def synthetic_questions(drawing: Drawing, number: int) -> list[tuple[int, str, str, str, str]]:
    """(question id, question, answer, answer type, question type) of the five questions about the `number`-th image
    (in generation order); ids are `number * 10 + k`."""
    asked = [(text.format(shape=drawing.shape), getattr(drawing, attribute), "other", kind)
             for text, attribute, kind in QUESTIONS]  # fmt: skip
    # Half the images are asked about their own shape (yes), half about one of the others, in turn (no).
    other = SHAPES[(SHAPES.index(drawing.shape) + 1 + number // 2 % 2) % len(SHAPES)]
    shape, answer = (drawing.shape, "yes") if number % 2 == 0 else (other, "no")
    asked.append((f"is there a {shape}?", answer, "yes/no", "is there a"))
    return [(number * 10 + k, *question) for k, question in enumerate(asked)]


def read_synthetic_vqa(data_dir: Path, options: VqaReadOptions) -> VqaSet:
    """The questions about the synthetic folder's images (generated with the default spec on first use), by split."""
    manifest = data_dir / MANIFEST
    if not manifest.is_file():
        generate_synthetic(data_dir)
    spec = SyntheticSpec(**json.loads(manifest.read_text())["spec"])
    return usable_questions(
        QuestionListing(question_id, question, name, (data_dir / "images" / name).resolve(), (answer,) * ANNOTATORS,
                        split, f"{manifest}: {name}", answer_type, question_type)
        for number, (name, split, drawing) in enumerate(drawings(spec))
        for question_id, question, answer, answer_type, question_type in synthetic_questions(drawing, number)
    )  # fmt: skip
