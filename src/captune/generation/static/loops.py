"""captune's own greedy and beam-search loops over `StaticDecoder`: `generate`'s tokens without waiting for the GPU at
every step."""

from __future__ import annotations

import torch

from captune.config import GenerateConfig
from captune.generation.static.decoder import StaticDecoder
from captune.generation.static.fast_path import StaticCaches, fast_path
from captune.model import Blip2Like


def _check_at(index: int, options: GenerateConfig, every: int) -> bool:
    """Whether the static loops look after new token number `index` if generation has ended: every `every` steps
    (`StaticOptions.check_every`), once a row may have ended (EOS is banned before `min_new_tokens`, so no earlier
    check can stop anything, and each one drains the GPU's queue)."""
    return (index + 1) % every == 0 and index >= options.min_new_tokens


@torch.no_grad()
def static_greedy(
    model: Blip2Like,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    options: GenerateConfig,
    caches: StaticCaches | None = None,
    image_features: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy captions as `generate` makes them (min/max new tokens; a row that emitted EOS gets padding after it),
    over `StaticDecoder`, without waiting for the GPU at every token: `generate` reads its stopping criteria from the
    GPU after each step, so the host cannot queue the next one. Here the host looks only every
    `StaticOptions.check_every` steps. `attention_mask`: that of left-padded rows (prompts of different lengths), as
    `text_inputs` makes it; None: every row has the same prompt. Returns the new tokens only, (rows, up to
    max_new_tokens)."""
    every = fast_path(model).options.check_every
    decoder = StaticDecoder(model, input_ids, pixel_values, options.max_new_tokens, caches=caches,
                             image_features=image_features, attention_mask=attention_mask)  # fmt: skip
    rows, eos, pad = decoder.rows, decoder.eos, decoder.pad
    tokens = torch.full((rows, options.max_new_tokens), pad, dtype=torch.long, device=input_ids.device)
    unfinished = torch.ones(rows, dtype=torch.bool, device=input_ids.device)
    logits = decoder.first_logits
    for i in range(options.max_new_tokens):
        scores = decoder.logits_after_ban(logits, i, options.min_new_tokens)
        chosen = torch.where(unfinished, scores.argmax(-1), pad)
        tokens[:, i] = chosen
        unfinished &= ~torch.isin(chosen, eos)
        if i + 1 == options.max_new_tokens or (_check_at(i, options, every) and not bool(unfinished.any())):
            return tokens[:, : i + 1]
        logits = decoder.step(chosen, i)
    return tokens


@torch.no_grad()
def static_beam(
    model: Blip2Like,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    options: GenerateConfig,
    caches: StaticCaches | None = None,
    image_features: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Beam search as transformers' `generate` does it (its vectorised beam search of 4.50+: the top 2 x beams
    continuations of each image, EOS-ended ones scored with `length_penalty` into the finished set, `early_stopping`
    as the language model's generation config says), over `StaticDecoder` with each image's beams as rows: the
    prompt is prefilled once per image (its cache rows repeated for the beams), the cache reordered in place after
    each step (only the new tokens' keys and values move), and the host checks whether to stop only every
    `StaticOptions.check_every` steps (steps past the point where `generate` stops change nothing: no candidate can
    enter a finished set then). `attention_mask` as `static_greedy` takes it. Returns the best finished beam's new
    tokens per image, (images, max_new_tokens), padded after EOS."""
    beams, new = options.num_beams, options.max_new_tokens
    every = fast_path(model).options.check_every
    decoder = StaticDecoder(model, input_ids, pixel_values, new, copies=beams, caches=caches,
                             image_features=image_features, attention_mask=attention_mask)  # fmt: skip
    images, device = input_ids.shape[0], input_ids.device
    config = decoder.lm.generation_config
    # What generate takes: the language model's generation config, unset fields at transformers' defaults.
    length_penalty = 1.0 if config.length_penalty is None else config.length_penalty
    early_stopping = False if config.early_stopping is None else config.early_stopping
    keep = max(2, 1 + len(decoder.eos)) * beams  # enough continuations that `beams` of them do not end
    among_top = torch.arange(keep, device=device) < beams
    never = -1.0e9
    running = torch.full((images, beams, new), decoder.pad, dtype=torch.long, device=device)
    running_scores = torch.zeros((images, beams), device=device)
    running_scores[:, 1:] = never  # the beams start equal: only the first one's continuations count at first
    finished = running.clone()
    finished_scores = torch.full((images, beams), never, device=device)
    is_finished = torch.zeros((images, beams), dtype=torch.bool, device=device)
    improvable = torch.ones((images, 1), dtype=torch.bool, device=device)
    first_row = torch.arange(images, device=device)[:, None] * beams
    logits = decoder.first_logits
    for i in range(new):
        scores = decoder.logits_after_ban(logits, i, options.min_new_tokens, log=True)
        vocabulary = scores.shape[-1]
        scores = (scores.view(images, beams, vocabulary) + running_scores[:, :, None]).view(images, -1)
        top_scores, top = scores.topk(keep)
        parent, token = top // vocabulary, top % vocabulary
        candidates = running.gather(1, parent[:, :, None].expand(-1, -1, new))
        candidates[:, :, i] = token
        ends = torch.isin(token, decoder.eos) | (i + 1 >= new)
        # The best `beams` candidates that did not end run on.
        alive_scores = top_scores + ends.to(torch.float32) * never
        chosen = alive_scores.topk(beams)[1]
        running = candidates.gather(1, chosen[:, :, None].expand(-1, -1, new))
        running_scores = alive_scores.gather(1, chosen)
        sources = (parent + first_row).gather(1, chosen).flatten()
        # Ended candidates among the top `beams` enter the finished set if they beat its worst.
        just_ended = ends & among_top
        ended_scores = top_scores / ((i + 1) ** length_penalty)
        ended_scores += (is_finished.all(-1, keepdim=True) & (early_stopping is True)).to(torch.float32) * never
        ended_scores += (~improvable).to(torch.float32) * never
        ended_scores += (~just_ended) * never
        merged_scores = torch.cat((finished_scores, ended_scores), dim=1)
        best = merged_scores.topk(beams)[1]
        finished = torch.cat((finished, candidates), dim=1).gather(1, best[:, :, None].expand(-1, -1, new))
        finished_scores = merged_scores.gather(1, best)
        is_finished = torch.cat((is_finished, just_ended), dim=1).gather(1, best)
        # Can a running beam still beat the worst finished one? (generate's heuristic, by early_stopping)
        length = new if early_stopping == "never" and length_penalty > 0.0 else i + 1
        worst = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True)[0], never)
        improvable &= (running_scores[:, :1] / (length**length_penalty) > worst).any(dim=-1, keepdim=True)
        if i + 1 == new:
            break
        if _check_at(i, options, every):
            going = improvable.any() & ~(is_finished.all() & (early_stopping is True)) & ~ends.all()
            if not bool(going):
                break
        decoder.reorder(sources, i)
        logits = decoder.step(running[:, :, i].flatten(), i)
    return finished[:, 0]
