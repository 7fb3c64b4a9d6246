"""BLIP-2 image-text retrieval training throughput (issue 25): a straightforward transformers loop computing the
contrastive (ITC) and matching (ITM) losses vs captune's real `captune train task=retrieval` path, one process, one
GPU, the same (image, caption) pairs.

    PYTHONPATH=src:benchmarks:.gpu/site python benchmarks/retrieval_train_throughput.py --model-dir DIR --output OUT
    (DIR from `python benchmarks/random_blip2.py --arch itm-vit-g --output DIR`; --tiny for a CPU dry run on the twin)

What runs, in order:
1. Data: `--images` generated JPEGs (500 x 375, `train_throughput.make_data`), five captions each (5-40 words of the
   synthetic vocabulary): `--images` x 5 pairs.
2. The straightforward loop, as a transformers user writes LAVIS's stage-1 losses: `Blip2ForImageTextRetrieval` in
   bf16 (`from_pretrained(dtype=torch.bfloat16)`), a `DataLoader` (shuffled pairs, `--workers` processes) giving
   each pair's pixels (`BlipImageProcessorPil`), its image id, and the captions tokenized by the model's BERT
   tokenizer (padded to the longest, cut at 42 tokens as captune's default); at every step the frozen ViT-g under
   `torch.no_grad()` on the batch's pixels, once (a frozen encoder's forward needs no graph; the matching pass reuses
   its output, as LAVIS's `blip2_qformer.py` does), then the Q-Former's image pass (32 queries) and text pass
   ([CLS]), ITC in-batch over the best of the 32 query-text cosines divided by a learnable temperature (0.07,
   clamped to [0.001, 0.5]), every caption of the same image a positive; ITM on the positive pairs plus one hard
   negative caption per image and one hard negative image per caption, sampled in proportion to the softmax of the
   contrastive scores (never the same image); `torch.optim.AdamW` on everything but the ViT (Q-Former, query tokens,
   text embeddings, both projections, matching head, temperature). Per batch size: 3 warm-up steps, then `--steps`
   timed, data loading included (the loader's workers run ahead while the GPU works).
3. The loss check: one batch in eval mode through the straightforward loop's losses and through captune's
   (`captune.retrieval.contrastive_loss`, `matching_loss`): ITC alone, and ITC + ITM with the hard negatives drawn
   by one seeded generator each (the same draws when the scores agree).
4. captune: `captune.training.recipe.train(config)` with `task=retrieval train.mode=qformer`, the real path (data
   check, the feature pass: the frozen ViT once per image, the loader with workers, the losses on cached features,
   fused AdamW, checkpoint at the end), one epoch at each `--batch-sizes`; its results.json gives samples (pairs) per
   second of the training steps, the feature pass's time and peak memory.

The speed and memory of a random-weight model are those of the real one (the compute does not depend on the values).
Writes `--output` (JSON: every number, the software versions, the GPU, this command) and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from train_throughput import _environment, _sync, make_data

from captune.config_loading import load_config
from captune.data.images import load_rgb
from captune.twins import write_checkpoint

TEMPERATURE_INIT, TEMPERATURE_RANGE = 0.07, (0.001, 0.5)  # LAVIS's `temp`
MAX_TOKENS = 42  # captune's default data.max_caption_tokens (40) + [CLS] and [SEP]


# --- the straightforward loop ------------------------------------------------------------------------------------


class Pairs(torch.utils.data.Dataset):
    """(pixels, caption, image id) for every caption of every image of the manifest."""

    def __init__(self, manifest: Path, image_processor: Any) -> None:
        self.processor = image_processor
        self.rows = []
        for image_id, line in enumerate(manifest.read_text().splitlines()):
            row = json.loads(line)
            self.rows += [(manifest.parent / row["image"], caption, image_id) for caption in row["caption"]]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, int]:
        path, caption, image_id = self.rows[index]
        return self.processor(load_rgb(path), return_tensors="pt")["pixel_values"][0], caption, image_id


class Collate:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, items: list[tuple[torch.Tensor, str, int]]) -> dict[str, torch.Tensor]:
        pixels, captions, ids = zip(*items, strict=True)
        text = self.tokenizer(list(captions), padding="longest", truncation=True, max_length=MAX_TOKENS,
                              return_tensors="pt")  # fmt: skip
        return {"pixel_values": torch.stack(pixels), "input_ids": text.input_ids,
                "attention_mask": text.attention_mask, "image_ids": torch.tensor(ids)}  # fmt: skip


def usual_model(model_dir: Path, device: torch.device, dtype: torch.dtype) -> tuple[Any, torch.nn.Parameter]:
    """The model in `dtype` with its ViT frozen, and the learnable temperature (float32)."""
    from transformers import Blip2ForImageTextRetrieval

    model = Blip2ForImageTextRetrieval.from_pretrained(model_dir, dtype=dtype).to(device)
    model.vision_model.requires_grad_(False)
    return model, torch.nn.Parameter(torch.tensor(TEMPERATURE_INIT, device=device))


def usual_losses(
    model: Any, temperature: torch.Tensor, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ITC, ITM) of one batch, written as a user would from the model's own forward and LAVIS's losses."""
    ids, mask, image_ids = batch["input_ids"], batch["attention_mask"], batch["image_ids"]
    with torch.no_grad():  # the frozen ViT-g, once a step
        vision = model.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state
    vision_mask = torch.ones(vision.shape[:-1], dtype=torch.long, device=vision.device)
    queries = model.query_tokens.expand(len(vision), -1, -1)
    image_out = model.qformer(query_embeds=queries, encoder_hidden_states=vision, encoder_attention_mask=vision_mask)
    image_feats = F.normalize(model.vision_projection(image_out.last_hidden_state), dim=-1)  # (B, 32, 256)
    text_out = model.qformer(query_embeds=model.embeddings(input_ids=ids), query_length=0, attention_mask=mask)
    text_feat = F.normalize(model.text_projection(text_out.last_hidden_state[:, 0, :]), dim=-1)  # (B, 256)
    # ITC: the best query for each image-text pair, over the temperature; every caption of an image a positive
    sim_i2t = torch.einsum("iqd,td->iqt", image_feats, text_feat).amax(dim=1) / temperature.clamp(*TEMPERATURE_RANGE)
    same = image_ids[:, None] == image_ids[None, :]
    targets = same.float() / same.sum(dim=1, keepdim=True)
    itc = (F.cross_entropy(sim_i2t.float(), targets) + F.cross_entropy(sim_i2t.t().float(), targets)) / 2
    # ITM: hard negatives sampled from the contrastive scores, never of the same image
    scores = sim_i2t.detach().float()
    negative_text = torch.multinomial(F.softmax(scores, 1).masked_fill(same, 0), 1, generator=generator).squeeze(1)
    negative_image = torch.multinomial(F.softmax(scores.t(), 1).masked_fill(same, 0), 1, generator=generator).squeeze(1)
    vision3 = torch.cat([vision, vision, vision[negative_image]])
    ids3, mask3 = torch.cat([ids, ids[negative_text], ids]), torch.cat([mask, mask[negative_text], mask])
    queries3 = model.query_tokens.expand(len(vision3), -1, -1)
    joint = model.qformer(
        query_embeds=model.embeddings(input_ids=ids3, query_embeds=queries3),
        query_length=queries3.shape[1],
        attention_mask=torch.cat([torch.ones(queries3.shape[:-1], dtype=mask.dtype, device=mask.device), mask3], 1),
        encoder_hidden_states=vision3,
        encoder_attention_mask=torch.ones(vision3.shape[:-1], dtype=torch.long, device=vision3.device),
    )
    logits = model.itm_head(joint.last_hidden_state[:, : queries3.shape[1], :]).mean(dim=1)
    labels = torch.cat([torch.ones(len(ids), dtype=torch.long), torch.zeros(2 * len(ids), dtype=torch.long)])
    itm = F.cross_entropy(logits.float(), labels.to(logits.device))
    return itc, itm


def usual_loader(manifest: Path, model_dir: Path, batch_size: int, workers: int) -> torch.utils.data.DataLoader:
    from transformers import AutoTokenizer, BlipImageProcessorPil

    pairs = Pairs(manifest, BlipImageProcessorPil.from_pretrained(model_dir))
    return torch.utils.data.DataLoader(pairs, batch_size=batch_size, shuffle=True, drop_last=True,
                                       num_workers=workers, pin_memory=torch.cuda.is_available(),
                                       collate_fn=Collate(AutoTokenizer.from_pretrained(model_dir)),
                                       persistent_workers=workers > 0)  # fmt: skip


def time_usual(
    model: Any, temperature: torch.nn.Parameter, loader: torch.utils.data.DataLoader, steps: int, device: torch.device
) -> dict[str, Any]:
    trained = [p for p in model.parameters() if p.requires_grad] + [temperature]
    optimizer = torch.optim.AdamW(trained, lr=1e-4, weight_decay=0.05)
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    batches, losses = iter(loader), []
    for i in range(3 + steps):
        if i == 3:
            _sync(device)
            start = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:  # a small data set: another epoch
            batches = iter(loader)
            batch = next(batches)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
        itc, itm = usual_losses(model, temperature, batch)
        (itc + itm).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i % 10 == 0:
            losses.append(round((itc + itm).item(), 4))
    _sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    del optimizer
    return {"samples_per_s": steps * loader.batch_size / seconds, "peak_gib": peak, "steps": steps, "seconds": seconds,
            "losses_every_10_steps": losses}  # fmt: skip


def loss_check(model: Any, loader: torch.utils.data.DataLoader, device: torch.device) -> dict[str, Any]:
    """One batch in eval mode: the straightforward loop's ITC and ITC + ITM against captune's, the hard negatives
    from one seeded generator each. Every weight matrix is redrawn first at std 2 / sqrt(fan-in): at the checkpoint's
    initialisation (ViT 1e-10, Q-Former 0.02) every embedding is nearly the same and both losses sit at their uniform
    values (ln pairs, ln 2), which any two computations agree on (on the twin: ITC 2.22 and ITM 1.00 against 2.08 and
    0.69 after the redraw). The model is not used after this."""
    from captune.retrieval import (
        Temperature,
        contrastive_loss,
        image_embeddings,
        image_side,
        matching_loss,
        text_embeddings,
    )

    batch = {k: v.to(device) for k, v in next(iter(loader)).items()}
    batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    ids, mask, image_ids = batch["input_ids"], batch["attention_mask"], batch["image_ids"]
    model.eval()
    with torch.no_grad():
        generator = torch.Generator(device=device).manual_seed(0)
        for parameter in model.parameters():
            if parameter.dim() >= 2:  # (LayerNorms and biases keep 1 and 0)
                parameter.normal_(std=2 * parameter[0].numel() ** -0.5, generator=generator)
    temperature = Temperature().to(device)
    with torch.no_grad():
        usual_itc, usual_itm = usual_losses(model, temperature(), batch, torch.Generator(device=device).manual_seed(0))
        vision = image_side(model, batch["pixel_values"])
        images, texts = image_embeddings(model, batch["pixel_values"]), text_embeddings(model, ids, mask)
        itc, local = contrastive_loss(images, texts, image_ids, temperature())
        itm = matching_loss(model, vision, ids, mask, image_ids, local, torch.Generator(device=device).manual_seed(0))
    usual = {"itc": usual_itc.item(), "itc_plus_itm": (usual_itc + usual_itm).item()}
    ours = {"itc": itc.item(), "itc_plus_itm": (itc + itm).item()}
    return {"pairs": len(ids), "usual": usual, "captune": ours, "uniform_itc_itm": [math.log(len(ids)), math.log(2)],
            "relative_difference": {k: abs(ours[k] - usual[k]) / abs(usual[k]) for k in usual}}  # fmt: skip


# --- captune -----------------------------------------------------------------------------------------------------


def run_captune(model_dir: Path, manifest: Path, output: Path, batch_size: int, workers: int) -> dict[str, Any]:
    from captune.config import TASKS
    from captune.training.recipe import train

    if "retrieval" not in TASKS:
        raise SystemExit("captune train task=retrieval is not in this checkout (captune.config.TASKS has no "
                         "'retrieval'): the captune side cannot run; the usual loop's numbers are in "
                         "--output")  # fmt: skip
    config = load_config(None, [
        "task=retrieval", f"model.name={model_dir}", "train.mode=qformer", "data=manifest", f"data.data_dir={manifest}",
        f"train.output_dir={output}", f"train.batch_size={batch_size}", "train.epochs=1", "train.validate=false",
        "train.warmup_steps=10", "train.log_every=10", "train.lr=1e-4", f"data.num_workers={workers}",
    ])  # fmt: skip
    shutil.rmtree(output, ignore_errors=True)  # a fresh run, never a continuation of an earlier one
    start = time.perf_counter()
    train(config)
    results = json.loads((output / "results.json").read_text())
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {
        "batch_size": batch_size,
        "samples_per_s": results["samples_per_second"],
        "train_samples": results["train_samples"],
        "train_seconds": results["train_seconds"],
        "feature_pass_seconds": results["feature_pass_seconds"],
        "image_features_cached": results["image_features_cached"],
        "peak_gib": results["peak_gpu_memory_gib"],
        # the whole epoch's rate: its training steps and the feature pass before them
        "samples_per_s_with_feature_pass": results["train_samples"]
        / (results["train_seconds"] + results["feature_pass_seconds"]),
        "wall_seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="a Blip2ForImageTextRetrieval directory")
    parser.add_argument("--tiny", action="store_true", help="CPU dry run on the twin of blip2-itm-vit-g, 40 images")
    parser.add_argument("--work", type=Path, default=Path(".bench"))
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--usual-batch-sizes", default="64,128,256")
    parser.add_argument("--batch-sizes", default="128,256", help="captune's batch sizes, one epoch each")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of the usual loop per batch size")
    parser.add_argument("--workers", type=int, default=8, help="data loader processes, both sides")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = args.model_dir
    if args.tiny:  # the twin: blip2-itm-vit-g's tokenizer layout and ids, config at tiny sizes, 224 px
        model_dir = write_checkpoint("Salesforce/blip2-itm-vit-g", args.work / "twin-itm")
        args.images, args.usual_batch_sizes, args.batch_sizes, args.steps, args.workers = 40, "8", "8", 3, 0
    assert model_dir is not None, "--model-dir or --tiny"
    manifest = make_data(args.work / "data", args.images)
    data = {"images": args.images, "pairs": args.images * 5}
    result: dict[str, Any] = {"what": __doc__.splitlines()[0], "data": data}
    result.update(_environment(device, argv))

    def save() -> None:  # after every stage, so that a run cut short keeps what it measured
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")

    model, temperature = usual_model(model_dir, device, dtype)
    result["usual"] = {}
    for batch_size in map(int, args.usual_batch_sizes.split(",")):
        loader = usual_loader(manifest, model_dir, batch_size, args.workers)
        try:
            result["usual"][batch_size] = time_usual(model, temperature, loader, args.steps, device)
        except torch.OutOfMemoryError:
            result["usual"][batch_size] = {"error": "out of memory"}
        loader = None
        gc.collect()
        print(f"usual loop, batch {batch_size}: {result['usual'][batch_size]}", flush=True)
        save()
    result["loss_check"] = loss_check(model, usual_loader(manifest, model_dir, 32 if not args.tiny else 8, 0), device)
    print(f"loss check: {result['loss_check']}", flush=True)
    save()
    model = temperature = None
    gc.collect()
    torch.cuda.empty_cache() if device.type == "cuda" else None
    result["captune"] = []
    for batch_size in map(int, args.batch_sizes.split(",")):
        run = run_captune(model_dir, manifest, args.work / f"retrieval-run-{batch_size}", batch_size, args.workers)
        result["captune"].append(run)
        print(f"captune, batch {batch_size}: {run}", flush=True)
        save()
    usual_best = max((r["samples_per_s"] for r in result["usual"].values() if "samples_per_s" in r), default=0.0)
    ours_best = max(r["samples_per_s"] for r in result["captune"])
    whole_best = max(r["samples_per_s_with_feature_pass"] for r in result["captune"])
    result["speedup_over_usual_best"] = ours_best / usual_best if usual_best else None
    result["speedup_with_feature_pass"] = whole_best / usual_best if usual_best else None
    save()
    print(f"usual best {usual_best:.1f} pairs/s; captune best {ours_best:.1f}; "
          f"x{result['speedup_over_usual_best'] or 0:.2f} (x{result['speedup_with_feature_pass'] or 0:.2f} with the "
          f"feature pass); written to {args.output}")  # fmt: skip


if __name__ == "__main__":
    main()
