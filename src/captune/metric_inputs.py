"""The scoring inputs: COCO-format reference and prediction files read, and every reference and prediction checked
before any scorer starts (ids as strings, captions as text); each error names the file, entry or image."""

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from captune.errors import CaptuneError

_MAX_IDS_SHOWN = 10

_V = TypeVar("_V")


def load_references(path: Path) -> dict[str, list[str]]:
    """Loads reference captions from a COCO captions annotation file.

    The file is `{"images": [{"id": ...}, ...], "annotations": [{"image_id": ..., "caption": ...}, ...]}`;
    `images` is optional (the ids then come from the annotations), other keys are ignored.

    Args:
        path: The annotation JSON file.

    Returns:
        Image id (as a string) -> its reference captions, in file order.

    Raises:
        CaptuneError: The file cannot be read or is not JSON, has the wrong shape, an entry lacks a key or has a
            non-string caption, an annotation names an image missing from `images`, or a listed image has no
            annotation.
    """
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise CaptuneError(
            f"{path}: expected a COCO captions annotation file, an object with an 'annotations' list "
            f"(and optionally 'images'), got {_shape(data)}; point to the captions_*.json file"
        )
    listed = _listed_images(path, data["images"]) if "images" in data else None
    references: dict[str, list[str]] = {image_id: [] for image_id in listed or []}
    for index, entry in enumerate(data["annotations"]):
        image_id, caption = _caption_entry(f"{path}: annotations[{index}]", entry)
        if listed is not None and image_id not in references:
            raise CaptuneError(
                f"{path}: annotations[{index}] is for image_id {image_id!r}, which is not in 'images'; "
                "add the image to 'images' or remove the annotation"
            )
        references.setdefault(image_id, []).append(caption)
    unannotated = [image_id for image_id, captions in references.items() if not captions]
    if unannotated:
        raise CaptuneError(
            f"{path}: {len(unannotated)} images in 'images' have no annotation: {some_ids(unannotated)}; "
            "add their reference captions or remove them from 'images'"
        )
    if not references:
        raise CaptuneError(f"{path}: 'annotations' is empty; the file has no reference captions")
    return references


def load_predictions(path: Path) -> dict[str, str]:
    """Loads predicted captions from a COCO results file, `[{"image_id": ..., "caption": ...}, ...]`.

    Other keys in an entry (a score, an id) are ignored.

    Args:
        path: The results JSON file.

    Returns:
        Image id (as a string) -> its predicted caption.

    Raises:
        CaptuneError: The file cannot be read or is not JSON, is not a list, an entry lacks a key or has a
            non-string caption, or two entries are for the same image (the official toolkit would silently score
            both; that is almost always a bug in the script that wrote the file).
    """
    data = _read_json(path)
    if not isinstance(data, list):
        raise CaptuneError(
            f"{path}: expected a COCO results file, a list of {{'image_id': ..., 'caption': ...}}, got {_shape(data)}"
        )
    predictions: dict[str, str] = {}
    first_index: dict[str, int] = {}
    for index, entry in enumerate(data):
        image_id, caption = _caption_entry(f"{path}: entry {index}", entry)
        if image_id in predictions:
            raise CaptuneError(
                f"{path}: entries {first_index[image_id]} and {index} are both for image_id {image_id!r}; "
                "write one caption per image"
            )
        predictions[image_id] = caption
        first_index[image_id] = index
    return predictions


def checked_references(references: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Returns the references keyed by string id, refusing anything but a non-empty list of strings per image."""
    checked: dict[str, list[str]] = {}
    for image_id, captions in _string_ids(references.items(), "references"):
        if isinstance(captions, str) or not captions or not all(isinstance(c, str) for c in captions):
            raise CaptuneError(
                f"references for image {image_id!r} must be a non-empty list of caption strings, got {captions!r}"
            )
        for caption in captions:
            _require_utf8(caption, f"a reference caption of image {image_id!r}")
        checked[image_id] = list(captions)
    return checked


def checked_predictions(predictions: Mapping[str, str], source: str) -> dict[str, str]:
    """Returns the predictions keyed by string id, refusing non-string captions."""
    checked: dict[str, str] = {}
    for image_id, caption in _string_ids(predictions.items(), source):
        if not isinstance(caption, str):
            raise CaptuneError(f"{source}: the prediction for image {image_id!r} is {caption!r}, not a string")
        _require_utf8(caption, f"{source}: the prediction for image {image_id!r}")
        checked[image_id] = caption
    return checked


def _require_utf8(caption: str, what: str) -> None:
    """Refuses text with an unpaired surrogate (JSON allows "\\udcff"): it cannot be written to Java as UTF-8."""
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError as err:
        raise CaptuneError(
            f"{what}, {caption!r}, has an unpaired surrogate U+{ord(caption[err.start]):04X} at character {err.start}, "
            "which is not text; fix or drop that character"
        ) from err


def _string_ids(items: Iterable[tuple[object, _V]], source: str) -> list[tuple[str, _V]]:
    """Turns ids into strings, refusing two keys (such as 1 and "1") that become the same id."""
    seen: set[str] = set()
    out: list[tuple[str, _V]] = []
    for key, value in items:
        image_id = str(key)
        if image_id in seen:
            raise CaptuneError(f"{source}: image id {image_id!r} appears twice (as an int and a string); use one type")
        seen.add(image_id)
        out.append((image_id, value))
    return out


def _read_json(path: Path) -> object:
    """Parses a JSON file, turning every way it can fail into an error that names the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise CaptuneError(f"{path}: cannot read it ({err.strerror}); check the path") from err
    except UnicodeDecodeError as err:
        raise CaptuneError(f"{path}: not UTF-8 text (byte {err.start}); save the file as UTF-8 JSON") from err
    except json.JSONDecodeError as err:
        raise CaptuneError(
            f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); fix or regenerate the file"
        ) from err


def _listed_images(path: Path, images: object) -> list[str]:
    """Returns the ids of the annotation file's `images` list."""
    if not isinstance(images, list):
        raise CaptuneError(f"{path}: 'images' is {_shape(images)}, expected a list of {{'id': ...}} objects")
    ids = []
    for index, image in enumerate(images):
        if not isinstance(image, dict) or "id" not in image:
            raise CaptuneError(f"{path}: images[{index}] has no 'id'; every image needs one")
        ids.append(_image_id(f"{path}: images[{index}].id", image["id"]))
    return ids


def _caption_entry(where: str, entry: object) -> tuple[str, str]:
    """Returns (image id, caption) of one `{"image_id": ..., "caption": ...}` entry; `where` names it in errors."""
    if not isinstance(entry, dict):
        raise CaptuneError(f"{where} is {_shape(entry)}, expected an object with 'image_id' and 'caption'")
    for key in ("image_id", "caption"):
        if key not in entry:
            raise CaptuneError(f"{where} has no {key!r}; every entry needs 'image_id' and 'caption'")
    caption = entry["caption"]
    if not isinstance(caption, str):
        raise CaptuneError(f"{where} has caption {caption!r}, expected a string; write the caption text")
    return _image_id(f"{where}.image_id", entry["image_id"]), caption


def _image_id(where: str, value: object) -> str:
    """Normalises an image id to `str`: COCO ids are ints, Flickr ids are file names."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise CaptuneError(f"{where} is {value!r}; image ids must be integers (COCO) or strings (file names)")
    return str(value)


def _shape(value: object) -> str:
    """Describes a JSON value's type for an error message."""
    names: dict[type, str] = {dict: "an object", list: "a list", str: "a string", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def some_ids(ids: Sequence[object]) -> str:
    """Formats the first few ids of a list for an error message."""
    shown = ", ".join(repr(some_id) for some_id in ids[:_MAX_IDS_SHOWN])
    return shown if len(ids) <= _MAX_IDS_SHOWN else f"{shown}, ... ({len(ids)} in all)"
