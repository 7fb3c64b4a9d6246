"""Which captioning path a run takes, and at which batch size, when the user did not say: one decision for
`captune caption`, `captune eval`, validation during training and `captune serve`, logged in one line.

`generate.static_cache` and `generate.batch_size` are None by default ("captune decides"); a value forces it. The
rules, from H200 measurements (random-weight blip2-opt-2.7b, bf16, 30 new tokens; benchmarks/results/
caption-bulk-h200-dynamic.json and issue 23's table):

- The plain path (transformers' `generate`) on a CPU, for models or options the static loops do not cover (Flan-T5,
  a repetition penalty), and for runs too short to earn the static loops' compiling warm-up.
- The static loops on a GPU from `PAYS_FROM_*` images: greedy 503 captions/s against 183 for `generate` at batch
  256; their warm-up at batch 512 is ~4 s in any process (a large batch's decode step is the eager step recorded
  as a CUDA graph: nothing to trace or compile; results/caption-warm-up-h200-graphed-step-*.json), so they pay from
  ~1,000 images. Beam 5, 136 against 33.5 (batch 64): its cache reorder is compiled, ~58 s in a machine's first
  process and ~4 s once it is on disk (`compile_cache`), so from ~2,500 images cold and ~200 warm.
- Batch size: 512 images greedy and 128 with beams on the static loops, 256 and 64 on the plain path on a GPU, 16
  on a CPU; never more than the KV caches and image side fit in half the free GPU memory, and never more than the
  run's images (rounded up to a power of two, the shapes the static loops compile).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch

from captune.config import GenerateConfig
from captune.generation.compile_cache import compiled_batches
from captune.generation.core import filled_size
from captune.generation.static import uses_static_loops
from captune.model import Blip2Like, blip_of

logger = logging.getLogger(__name__)

STATIC_BATCH = {True: 512, False: 128}
"""Static loops: images per batch, greedy (True) and with beams (False)."""
PLAIN_BATCH = {True: 256, False: 64}
"""transformers' `generate` on a GPU: images per batch, greedy and with beams."""
CPU_BATCH = 16
PAYS_FROM_COLD = {True: 1_000, False: 2_500}
"""Images from which the static loops, compiled in this process, beat `generate`: greedy and with beams."""
PAYS_FROM_WARM = {True: 1_000, False: 200}
"""The same with the compiled code already on disk."""
MEMORY_SHARE = 0.5
"""The share of the free GPU memory a batch's KV caches and image side may take."""


@dataclass(frozen=True)
class Facts:
    """What the decision depends on, gathered from the model and the machine (`facts_of`)."""

    device_type: str
    covered: bool
    """The static loops cover this model and these options."""
    free_bytes: int | None
    """Free memory on the model's GPU (None on a CPU)."""
    bytes_per_row: int
    """Memory one row (an image, times the beams) takes while captioning: its KV caches and image side."""
    compiled: frozenset[int] = frozenset()
    """Batch sizes at which the static loops compiled this model on this machine before (`compile_cache`)."""


@dataclass(frozen=True)
class Choice:
    """The decided options (static_cache and batch_size set) and the one line that says what and why."""

    options: GenerateConfig
    line: str


DOING = {"images": "captioning", "questions": "answering"}
"""What a run does, by what it counts (`choose`'s `unit`)."""


def choose(options: GenerateConfig, facts: Facts, images: int | None, unit: str = "images") -> Choice:
    """Fills in what the user left to captune (`static_cache`, `batch_size` None); keeps what they set.

    Args:
        options: The generation options, as configured.
        facts: The model and the machine.
        images: Rows the run will generate for (images, or questions: one row each); None for a server (an
            open-ended run).
        unit: What the rows are, `images` or `questions` (`DOING`), for the line. A question's answer is a row as a
            caption is: the same thresholds (measured for 30-token captions; short answers earn the warm-up later).
    """
    greedy = options.num_beams == 1
    warm = _batch(options, facts, images, greedy, static=True, unit=unit)[0] in facts.compiled
    static, why = _static(options, facts, images, greedy, warm, unit)
    batch, batch_why = _batch(options, facts, images, greedy, static, unit)
    path = "static loops" if static else "transformers generate"
    line = f"{DOING[unit]}: {path} ({why}), batch {batch} ({batch_why})"
    return Choice(dataclasses.replace(options, static_cache=static, batch_size=batch), line)


def _static(
    options: GenerateConfig, facts: Facts, images: int | None, greedy: bool, warm: bool, unit: str
) -> tuple[bool, str]:
    if options.static_cache is not None:
        return options.static_cache, "generate.static_cache set"
    if facts.device_type != "cuda":
        return False, f"on {facts.device_type}, nothing to compile"
    if not facts.covered:
        return False, "the static loops cover decoder-only models without a repetition penalty"
    if images is None:
        return True, "a server: compiled once, for every request"
    pays_from = (PAYS_FROM_WARM if warm else PAYS_FROM_COLD)[greedy]
    state = "compiled code on disk" if warm else "compiling first"
    if images < pays_from:
        return False, f"{images} {unit}, fewer than the {pays_from} from which the static loops pay ({state})"
    return True, f"{images} {unit}, from {pays_from} the static loops pay ({state})"


def _batch(
    options: GenerateConfig, facts: Facts, images: int | None, greedy: bool, static: bool, unit: str
) -> tuple[int, str]:
    if options.batch_size is not None:
        return options.batch_size, "generate.batch_size set"
    if facts.device_type != "cuda":
        return CPU_BATCH, "CPU"
    wanted = (STATIC_BATCH if static else PLAIN_BATCH)[greedy]
    why = "the fastest measured"
    if images is not None and images < wanted:
        wanted, why = filled_size(images, wanted, powers_of_two=True), f"{images} {unit}"
    if facts.free_bytes is not None:
        rows = int(facts.free_bytes * MEMORY_SHARE) // max(1, facts.bytes_per_row * options.num_beams)
        fits = _power_of_two_below(max(1, rows))
        if fits < wanted:
            wanted, why = fits, f"what fits in half of the {facts.free_bytes / 2**30:.1f} GiB free"
    return wanted, why


def _power_of_two_below(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def facts_of(model: Blip2Like, options: GenerateConfig) -> Facts:
    """The facts `choose` needs, from the model (its device, language model size), the GPU's free memory and the
    record of earlier compilations."""
    parameter = next(model.parameters())
    device = parameter.device
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    return Facts(
        device_type=device.type,
        covered=uses_static_loops(model, options),
        free_bytes=free,
        bytes_per_row=_bytes_per_row(model, options, parameter.element_size()),
        compiled=compiled_batches(model, options) if device.type == "cuda" else frozenset(),
    )


def _bytes_per_row(model: Blip2Like, options: GenerateConfig, element_size: int) -> int:
    """One row's KV caches (every layer's keys and values over the query tokens, prompt and new tokens) and its image
    side's largest activation (the vision MLP over the patches, twice for input and output)."""
    config: Any = blip_of(model).config
    text = config.text_config
    layers = getattr(text, "num_hidden_layers", None) or text.num_layers
    hidden = getattr(text, "hidden_size", None) or text.d_model
    tokens = config.num_query_tokens + 32 + options.max_new_tokens  # 32: a generous prompt
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2 + 1
    return (2 * layers * hidden * tokens + 2 * patches * vision.intermediate_size) * element_size


def log_choice(choice: Choice) -> None:
    """Logs the decision in one line (captune's CLI shows INFO lines of its loggers on stderr)."""
    logger.info(choice.line)
