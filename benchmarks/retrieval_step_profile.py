"""Where a retrieval training step's time goes (issue 25): captune's training forward (`RetrievalLoss` on cached ViT
outputs: the Q-Former's image pass, text pass, contrastive loss, hard negatives and the matching pass over 3 x batch
rows), its backward and the fused AdamW step, one GPU, random cached features and captions of 7-42 tokens.

    PYTHONPATH=src:benchmarks python benchmarks/retrieval_step_profile.py --model-dir DIR --output OUT.json
    (DIR from `python benchmarks/random_blip2.py --arch itm-vit-g --output DIR`; --tiny for a CPU dry run)

Per variant, 5 warm-up steps then `--steps` timed (ms a step, pairs/s, peak GiB):
- `full`: ITC + ITM, as `captune train task=retrieval train.mode=qformer` runs it;
- `unshared`: `full` with each matching row's cross-attention keys and values projected again
  (`RetrievalLoss(share_image_keys=False)`), not taken from the image's (`captune.retrieval.SharedImageKeys`);
- `itc`: the contrastive loss alone (what the matching pass costs is the difference);
- `compiled`: `full` with each Q-Former layer `torch.compile`d (its compilation timed apart);
- `eager`: `full` with the Q-Former's attention in transformers' eager implementation instead of SDPA.
Then one `full` step under PyTorch's profiler: the GPU's busy time against the step's wall time (host-bound or not)
and the top kernels by GPU time. The weights are random: speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from train_throughput import _environment, _sync

from captune.retrieval import RetrievalLoss, _image_embeddings_from, contrastive_loss, load_retrieval, text_embeddings


def batch(model: Any, size: int, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """A batch as the retrieval collator gives it: pairs of `size // 5` images with five captions each (shuffled),
    the vision encoder's outputs of each pair's image, captions padded to the longest."""
    generator = torch.Generator().manual_seed(seed)
    vision = model.config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2 + 1
    image_ids = torch.randperm(size, generator=generator) // 5
    lengths = torch.randint(7, 43, (size,), generator=generator)
    width = int(lengths.max())
    vocab = model.config.qformer_config.vocab_size
    input_ids = torch.randint(vocab // 3, vocab - 1, (size, width), generator=generator)
    attention_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    features = torch.randn(size // 5 + 1, patches, vision.hidden_size, generator=generator)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "image_ids": image_ids.to(device),
        "image_features": features[image_ids].to(device, model.query_tokens.dtype),
        "two_images": True,
    }


def contrastive_only(model: Any) -> Any:
    """The contrastive loss alone, on the same inputs (the Q-Former's image and text passes, no matching pass)."""

    def loss(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_ids: torch.Tensor,
             image_features: torch.Tensor, two_images: bool) -> torch.Tensor:  # fmt: skip
        images = _image_embeddings_from(model, image_features)
        texts = text_embeddings(model, input_ids, attention_mask)
        return contrastive_loss(images, texts, image_ids, model.temperature())[0]

    return loss


def time_steps(model: Any, inputs: dict[str, Any], steps: int, device: torch.device, variant: str) -> dict[str, Any]:
    loss_fn = (
        contrastive_only(model) if variant == "itc" else RetrievalLoss(model, share_image_keys=variant != "unshared")
    )
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-5, fused=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(5 + steps):
        if i == 5:
            _sync(device)
            start = time.perf_counter()
        loss = loss_fn(**inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync(device)
    seconds = time.perf_counter() - start
    size = len(inputs["image_ids"])
    return {"ms_per_step": 1000 * seconds / steps, "pairs_per_s": steps * size / seconds,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
            "loss": round(float(loss.detach()), 4)}  # fmt: skip


def profiled(model: Any, inputs: dict[str, Any], device: torch.device, top: int) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    loss_fn = RetrievalLoss(model)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-5, fused=device.type == "cuda")
    for _ in range(3):
        loss_fn(**inputs).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        loss_fn(**inputs).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
    rows = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:top]
    return {
        "wall_ms": 1000 * wall,
        "gpu_busy_ms": kernel_us / 1000,
        "top": [{"name": e.key[:120], "gpu_ms": e.self_device_time_total / 1000, "calls": e.count} for e in rows],
        "table": prof.key_averages().table(sort_by="self_device_time_total" if device.type == "cuda"
                                           else "self_cpu_time_total", row_limit=top),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", help="a Blip2ForImageTextRetrieval directory (default with --tiny: the twin)")
    parser.add_argument("--tiny", action="store_true", help="CPU dry run on tiny-retrieval")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--variants", default="full,unshared,itc,eager,compiled")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result: dict[str, Any] = {"what": __doc__.splitlines()[0], "batch_size": args.batch_size,
                              **_environment(device, argv), "variants": {}}  # fmt: skip

    def model_with(attention: str) -> Any:
        loaded = load_retrieval("tiny-retrieval" if args.tiny else args.model_dir)
        model = loaded.model.to(device, dtype)
        model.config.qformer_config._attn_implementation = attention
        model.qformer.config._attn_implementation = attention
        model.vision_model.requires_grad_(False)
        return model.train()

    model = model_with("sdpa")
    inputs = batch(model, args.batch_size, device)
    for variant in args.variants.split(","):
        if variant == "eager":
            del model
            model = model_with("eager")
        if variant == "compiled":
            del model
            model = model_with("sdpa")
            for layer in model.qformer.encoder.layer:
                layer.compile()
            start = time.perf_counter()
            RetrievalLoss(model)(**inputs).backward()  # the compilation, timed alone
            _sync(device)
            result["compile_seconds"] = time.perf_counter() - start
            model.zero_grad(set_to_none=True)
        result["variants"][variant] = time_steps(model, inputs, args.steps, device, variant)
        print(variant, result["variants"][variant], flush=True)
        args.output.write_text(json.dumps(result, indent=2))
    model = model_with("sdpa")
    result["profile"] = profiled(model, inputs, device, args.top)
    print(result["profile"]["table"])
    print({k: v for k, v in result["profile"].items() if k in ("wall_ms", "gpu_busy_ms")})
    args.output.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
