"""The built-in synthetic captioning dataset: one drawn shape per image, described by five reference captions.

Shape, colour, size and position vary, so a captioner must look at the image to score well; everything is
deterministic for a seed, and the images are written once as PNG files so the normal file-based path reads them.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from captune.data import CaptionSet, ReadOptions, Record

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


@dataclass(frozen=True)
class SyntheticSpec:
    """How many images per split and the seed; stored in the manifest so a folder is regenerated when it changes."""

    train: int = 1200
    val: int = 100
    test: int = 100
    seed: int = 0
    image_size: int = 64


def draw(rng: random.Random, size: int) -> tuple[Image.Image, tuple[str, ...]]:
    """One image and its five captions."""
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    scale, position = rng.choice(list(SIZES)), rng.choice(list(POSITIONS))
    factor = size / 64
    radius = SIZES[scale] * factor
    cx, cy = (c * factor + rng.uniform(-3, 3) * factor for c in POSITIONS[position])
    background = tuple(rng.randint(225, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    pen = ImageDraw.Draw(image)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        pen.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        pen.rectangle(box, fill=COLOURS[colour])
    else:
        pen.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=COLOURS[colour])
    words = {"size": scale, "colour": colour, "shape": shape, "position": position}
    return image, tuple(t.format(**words) for t in TEMPLATES)


def generate_synthetic(data_dir: Path, spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Writes the images and `synthetic.json` into data_dir unless the same spec is already there."""
    manifest = data_dir / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()).get("spec") == asdict(spec):
        return manifest
    (data_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(spec.seed)
    entries = []
    for split in ("train", "val", "test"):
        for i in range(getattr(spec, split)):
            image, captions = draw(rng, spec.image_size)
            name = f"{split}-{i:05d}.png"
            image.save(data_dir / "images" / name)
            entries.append({"image": name, "split": split, "captions": list(captions)})
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
