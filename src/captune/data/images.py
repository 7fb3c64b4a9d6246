"""The one way captune opens an image: fully decoded, RGB, or an `ImageError` that says why not.

The training dataset, `captune data check` and `captune caption` all call `load_rgb`, so an image that passes the data
check is an image training can read.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from captune.errors import CaptuneError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
"""File suffixes (lower case, with the dot, as `Path.suffix` gives them) taken as images when listing a folder."""

_WHITE = (255, 255, 255, 255)
# What Pillow's decoders raise for damaged data (beyond the cases load_rgb names on their own).
_CORRUPT = (OSError, SyntaxError, ValueError, EOFError)


class ImageError(CaptuneError):
    """An image file that cannot be used; the message is `"<path>: <reason>"`."""


def load_rgb(path: Path, min_size: tuple[int, int] | None = None) -> Image.Image:
    """Open an image, decode every pixel and convert it to 8-bit RGB.

    Transparent images (RGBA, LA, PA, palette or L/RGB with a transparent colour) are composited on white; 16-bit
    greyscale (`I;16*`, and `I` as Pillow opens 16-bit PNG and TIFF) is scaled to 8 bits instead of clipped.

    Args:
        path: Image file.
        min_size: (width, height) the image may shrink to while decoding: a JPEG at least twice as large is decoded
            at 1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling (Pillow's `draft`), staying at least this large. A
            12-megapixel photo then decodes ~10x faster; other formats and smaller JPEGs decode as without it.

    Returns:
        A loaded RGB image, independent of the (closed) file.

    Raises:
        ImageError: The file is missing, not an image, truncated or corrupt, has more pixels than
            `PIL.Image.MAX_IMAGE_PIXELS` (checked from the header, before decoding), or has a mode with no RGB
            conversion.
    """
    image = _open_loaded(path, min_size)
    try:
        return _to_rgb(image)
    except ValueError as exc:
        raise ImageError(f"{path}: unsupported image mode {image.mode}: {exc}") from exc


def decode_size(image_processor: object) -> tuple[int, int] | None:
    """The `min_size` for `load_rgb` before an image processor: twice its output size, so that its own resize (bicubic,
    224 x 224 for BLIP-2) still starts from at least twice the pixels it keeps (measured: at most one grey level of
    difference from a full decode); None when the processor's size is not a fixed height and width."""
    size = getattr(image_processor, "size", None)  # transformers' SizeDict (or a plain dict in older configs)
    height = size.get("height") if isinstance(size, dict) else getattr(size, "height", None)
    width = size.get("width") if isinstance(size, dict) else getattr(size, "width", None)
    return (2 * width, 2 * height) if isinstance(height, int) and isinstance(width, int) else None


def processed_pixels(path: Path, image_processor: Any) -> Any:
    """An image file as the model takes it: `load_rgb` at `decode_size`, then the image processor; (3, H, W) tensor."""
    image = load_rgb(path, decode_size(image_processor))
    return image_processor(image, return_tensors="pt")["pixel_values"][0]


Normalisation = Callable[[torch.Tensor, float, torch.Tensor, torch.Tensor], torch.Tensor]


def _rescaled_in_float64(raw: torch.Tensor, scale: float, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """transformers' PIL image processors: rescaled in float64, then float32 minus the mean, over the std."""
    return ((raw.double() * scale).float() - mean) / std


def _fused_into_mean_and_std(raw: torch.Tensor, scale: float, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """transformers' torchvision image processors: the rescale factor folded into the mean and std, in float32."""
    return (raw.float() - mean * (1.0 / scale)) / (std * (1.0 / scale))


NORMALISATIONS: dict[str, Normalisation] = {
    "rescaled_in_float64": _rescaled_in_float64,
    "fused_into_mean_and_std": _fused_into_mean_and_std,
}
"""How image processors rescale and normalise 8-bit pixels, as `device_pixels` may do it on a GPU."""

_NORMALISED_AS: weakref.WeakKeyDictionary[Any, str | None] = weakref.WeakKeyDictionary()
"""Per image processor, the NORMALISATIONS entry that gave its pixel values bit for bit (None: none did)."""


def device_pixels(image_processor: Any, images: Sequence[Image.Image], device: torch.device) -> torch.Tensor:
    """What `image_processor(images, return_tensors="pt")["pixel_values"]` gives, as float32 on `device`, with the
    rescaling and normalisation done there: the processor only converts and resizes (on the host, to 8-bit pixels),
    so a single caption spends less host time before its GPU work (measured on this project's CPU for a 640x480 image:
    3.95 -> 2.8 ms with the PIL processor; the image processor took 7.7-12 ms on an H100 machine's CPU) and copies a
    quarter of the bytes. The first call for a processor also runs it whole and keeps the device's way only if it
    gives the same values bit for bit; otherwise, and for processors that pad or do not rescale and normalise, the
    processor does it all, as before."""
    rescale = getattr(image_processor, "do_rescale", False) and getattr(image_processor, "do_normalize", False)
    try:
        known = _NORMALISED_AS.get(image_processor, "unchecked")
    except TypeError:  # a processor that cannot be a weak dictionary's key (unhashable): the processor does it all
        known = None

    def processed(**options: Any) -> torch.Tensor:
        return image_processor(list(images), return_tensors="pt", **options)["pixel_values"]

    if not rescale or getattr(image_processor, "do_pad", False) or known is None:
        return processed().to(device, non_blocking=True)
    raw = processed(do_rescale=False, do_normalize=False)
    scale = float(image_processor.rescale_factor)
    # (non_blocking: from pageable memory through a staging buffer, without waiting for the GPU's queue)
    mean, std = (
        torch.tensor(values, dtype=torch.float32).view(-1, 1, 1).to(device, non_blocking=True)
        for values in (image_processor.image_mean, image_processor.image_std)
    )
    on_device = raw.to(device, non_blocking=True)
    if known == "unchecked":  # the first call: which way, if any, gives the processor's own values?
        whole = processed()
        matching = [
            name
            for name, normalise in NORMALISATIONS.items()
            if raw.dtype == torch.uint8 and torch.equal(normalise(on_device, scale, mean, std).cpu(), whole)
        ]
        _NORMALISED_AS[image_processor] = known = matching[0] if matching else None
        if known is None:
            return whole.to(device, non_blocking=True)
    return NORMALISATIONS[known](on_device, scale, mean, std)


def _open_loaded(path: Path, min_size: tuple[int, int] | None = None) -> Image.Image:
    try:
        image = Image.open(path)
    except FileNotFoundError:
        raise ImageError(f"{path}: missing: no such file") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{path}: decompression bomb: {exc}") from None
    except (PermissionError, IsADirectoryError) as exc:
        raise ImageError(f"{path}: cannot read: {exc}") from None
    except _CORRUPT as exc:
        raise ImageError(f"{path}: truncated or corrupt: {exc}") from None
    with image:
        # Pillow raises beyond twice the limit but only warns between 1x and 2x; refuse both before decoding pixels.
        width, height = image.size
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and width * height > limit:
            raise ImageError(
                f"{path}: decompression bomb: {width}x{height} = {width * height} pixels exceeds the limit of {limit} "
                "(PIL.Image.MAX_IMAGE_PIXELS); raise that limit if the image is genuine"
            )
        if min_size is not None:
            image.draft(None, min_size)  # JPEG only; a no-op elsewhere
        try:
            image.load()
        except _CORRUPT as exc:
            # A truncated JPEG opens fine (only the header is read) and fails here.
            raise ImageError(f"{path}: truncated or corrupt: {exc}") from None
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode == "I" or image.mode.startswith("I;16"):
        # Pillow's own I -> L conversion clips at 255, which turns a 16-bit image white; scale 0..65535 to 0..255.
        image = image.convert("I").point(lambda value: value / 257 + 0.5).convert("L")
    if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
        return Image.alpha_composite(Image.new("RGBA", image.size, _WHITE), image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


PixelItem = tuple[int, torch.Tensor | None, str | None]
"""An image's position in the input, its pixels, and the error that kept it from having pixels."""


class PixelFiles(Dataset):
    """Image files as the model takes them (decoded, resized, normalised: `processed_pixels`), each item
    `(position, pixels, None)`, or `(position, None, the error)` for a file that cannot be used: a bulk run reports
    it and goes on."""

    def __init__(self, paths: Sequence[Path], image_processor: Any) -> None:
        self.paths, self.image_processor = list(paths), image_processor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> PixelItem:
        try:
            return index, processed_pixels(self.paths[index], self.image_processor), None
        except CaptuneError as err:
            return index, None, str(err)


def worker_share(batch_size: int, workers: int) -> int:
    """Images each DataLoader worker makes at a time: a share of a batch (batch_size / workers), not a whole one, so
    that all workers make the first batch together and it is ready after 1 / workers of the time one would take."""
    return -(-batch_size // workers) if workers else batch_size


Chunk = TypeVar("Chunk", list[Any], torch.Tensor)


def rebatched(chunks: Iterable[Chunk], size: int, join: Callable[[list[Chunk]], Chunk]) -> Iterator[Chunk]:
    """The items of consecutive chunks (lists, or tensors' rows), in order, in chunks of `size` (the last one
    shorter); `join` concatenates chunks (`torch.cat` for tensors)."""
    pending: list[Chunk] = []
    count = 0
    for chunk in chunks:
        pending.append(chunk)
        count += len(chunk)
        while count >= size:
            joined = join(pending) if len(pending) > 1 else pending[0]
            yield joined[:size]
            pending, count = ([joined[size:]], count - size) if count > size else ([], 0)
    if pending:
        yield join(pending) if len(pending) > 1 else pending[0]
