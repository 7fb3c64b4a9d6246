"""THE training recipe: setup -> fit -> validate -> save, on accelerate.

Runs unchanged on one CPU, one GPU or under `accelerate launch` with several processes: accelerate shards the batches,
averages gradients and decides who writes (rank 0 writes files and logs; every rank saves its own RNG state).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, set_seed
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from captune.card import CARD_FILE, model_card
from captune.config import Config, save_config, to_dict, training_mode
from captune.data import Record
from captune.data.vqa import Question
from captune.errors import CaptuneError
from captune.evaluation import answer_questions, predict_records, references_of, write_references
from captune.files import check_writable, write_json
from captune.metrics import FAST_METRICS, METRIC_NAMES, score_captions
from captune.model import (
    BUILT_IN,
    LoadedModel,
    apply_train_mode,
    attention_kernels,
    blip_of,
    load_configured_base,
    resolve_device,
    resolve_dtype,
    trainable_summary,
    vision_model_of,
    vision_trains,
)
from captune.model_dir import load_saved_weights, save_base
from captune.peft_methods import adalora_orthogonal_penalty, is_adalora, is_mutating_init, set_total_step
from captune.retrieval import RetrievalLoss, RetrievalModel, evaluate_retrieval, is_retrieval
from captune.training.batches import (
    CaptionCollator,
    CaptionPairs,
    ImageCaptions,
    PackedCaptionCollator,
    RetrievalCollator,
    load_training_data,
    load_vqa_training_data,
    training_loader,
    use_packing,
)
from captune.training.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint, save_model
from captune.training.features import train_image_features, use_feature_cache
from captune.training.loss import CaptionLoss, label_tokens
from captune.training.sampling import EpochShuffle, LengthGroupedShuffle
from captune.training.state import (
    NO_STEP,
    Run,
    Throughput,
    TrainState,
    mark_nonfinite,
    results,
    stop_if_diverged,
)
from captune.vqa_accuracy import VqaAccuracy, vqa_accuracy

log = logging.getLogger(__name__)


def _checkpoint_activations(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing in a transformers model's layers (`train.gradient_checkpointing`), by
    the method's new name where transformers has it (`gradient_checkpointing_enable` is its deprecated alias)."""
    enable: Any = getattr(model, "activation_checkpointing_enable", None)
    if callable(enable):
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # type: ignore[operator]


def setup(config: Config) -> Run:
    """Accelerator, data, model with LoRA, optimizer and schedule; resumes when asked."""
    # 1. The accelerator decides device and precision; bf16 on GPUs that have it, fp32 on CPU.
    dtype = resolve_dtype(config.model.dtype, resolve_device("auto"))
    # bf16 weights train in bf16 throughout, as the usual PEFT recipe does (LoRA weights stay float32): autocast on
    # top would only run layer norms and softmaxes in float32, slower and with more activation memory. fp16 weights
    # need autocast's loss scaling.
    precision = "fp16" if dtype == torch.float16 else "no"
    output_dir = Path(config.train.output_dir).expanduser()
    accelerator = Accelerator(
        gradient_accumulation_steps=config.train.grad_accum,
        mixed_precision=precision,
        log_with="tensorboard",
        project_dir=str(output_dir),
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise CaptuneError(
            f"launched as {launched} processes, but accelerate runs {accelerator.num_processes}: each would train "
            "alone into the same folder. Without GPUs set ACCELERATE_USE_CPU=true (or use `accelerate launch --cpu`)"
        )
    if accelerator.distributed_type == DistributedType.FSDP and config.train.validate:
        raise CaptuneError(
            "train.validate=true under FSDP: generating captions with sharded weights is not supported yet. Set "
            "train.validate=false and score the saved adapter with `captune eval --model-dir RUN/final` (one GPU)"
        )
    needs_whole = config.lora.method == "adalora" or is_mutating_init(config.lora)
    if accelerator.distributed_type == DistributedType.FSDP and training_mode(config).lora and needs_whole:
        raise CaptuneError(
            f"lora.method={config.lora.method} (init_lora_weights={config.lora.init_lora_weights}) under FSDP: "
            "AdaLoRA's rank allocator and the PiSSA/OLoRA conversion read whole weights, which FSDP shards; train on "
            "one GPU or with DDP (`accelerate launch` without FSDP), or with lora.method=lora"
        )
    set_seed(config.train.seed)
    main = accelerator.is_main_process
    if main:  # a folder that cannot be written fails now, not after the data and the model are loaded
        check_writable(output_dir, "train.output_dir")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # results.json reports this run's peak, not an earlier one's

    # 2. Data first: a bad dataset should fail before minutes of model loading. VQA: questions, validated by the
    # questions of the first val_max_images val images.
    vqa = config.data.task == "vqa"
    val_questions: list[Question] = []
    if vqa:
        questions = load_vqa_training_data(config, main)
        val_images = list(dict.fromkeys(q.image_path for q in questions.split("val")))[: config.train.val_max_images]
        val_questions = [q for q in questions.split("val") if q.image_path in set(val_images)]
        val_records: list[Record] = []
    else:
        captions = load_training_data(config, main)
        val_records = captions.split("val")[: config.train.val_max_images]

    # 3. The base model, then LoRA on the configured layers only.
    loaded = load_configured_base(config, dtype)
    base_dir = None
    if loaded.base_name in BUILT_IN:
        # A built-in base is random: keep its weights so every saved model directory can be reloaded on its own.
        base_dir = output_dir / "base-model"
        if main:
            save_base(base_dir, loaded)
    # A quantised model is not passed through PEFT's prepare_model_for_kbit_training: it casts every bf16 weight to
    # float32, the frozen ViT and Q-Former too (1.1 B parameters: +2.2 GB for blip2-opt-2.7b), and its input-gradient
    # hook serves only reentrant checkpointing, which captune does not use. Training stays bf16 as for unquantised
    # models (bf16 is also the 4-bit compute dtype); the loss is float32 either way.
    retrieval = config.data.task == "retrieval"
    if retrieval and not is_retrieval(loaded.model):
        raise CaptuneError(f"task retrieval: model.name={config.model.name} is a captioning BLIP-2; retrieval trains "
                           "a Blip2ForImageTextRetrieval (tiny-retrieval, twin-blip2-itm-vit-g, "
                           "Salesforce/blip2-itm-vit-g or a directory of one)")  # fmt: skip
    if not retrieval and is_retrieval(loaded.model):
        raise CaptuneError(f"task {config.data.task}: model.name={config.model.name} is a retrieval BLIP-2 (no "
                           "language model to generate with); set task: retrieval, or a captioning model")  # fmt: skip
    if config.train.gradient_checkpointing and not retrieval:
        _checkpoint_activations(blip_of(loaded.model).language_model)
    loaded.model = apply_train_mode(loaded.model, config)
    if config.train.gradient_checkpointing and vision_trains(loaded.model):
        _checkpoint_activations(vision_model_of(loaded.model))
    if main:
        log.info("model %s: %s", config.model.name, trainable_summary(loaded.model))

    # 4. Loader: every caption (VQA: every question's answer rows) is a sample, batched by caption or (packed) by
    # image; the sampler's order depends only on (seed, epoch).
    cached = use_feature_cache(config, loaded.model)
    if vqa:
        pairs = CaptionPairs.from_questions(questions.split("train"), loaded.processor, config.data.question_template,
                                            config.data.vqa_answers, with_pixels=not cached)  # fmt: skip
        if main:
            log.info("train rows: %d answers to %d questions about %d images (data.vqa_answers=%s)", len(pairs),
                     len(questions.split("train")), len(pairs.paths), config.data.vqa_answers)  # fmt: skip
    else:
        pairs = CaptionPairs(captions.split("train"), loaded.processor, with_pixels=not cached)
        pairs.image_ids = retrieval
    items: CaptionPairs | ImageCaptions = pairs
    collator, batch_size = CaptionCollator, config.train.batch_size
    if use_packing(config, loaded.model):
        items, collator = ImageCaptions(pairs), PackedCaptionCollator
        batch_size = items.images_per_batch(config.train.batch_size)
        if main:
            shared = "questions sharing its image tokens" if vqa else "captions sharing its image tokens and prompt"
            log.info("batches: %d whole images (~%d %s), each image's %s (train.pack_captions)", batch_size,
                     round(batch_size * len(pairs) / len(items)), "answers" if vqa else "captions", shared)  # fmt: skip
    sampler: EpochShuffle = (
        LengthGroupedShuffle(items.caption_lengths(), batch_size, config.train.seed, accelerator.num_processes)
        if config.train.group_by_length and not retrieval  # retrieval: short texts, and batches of one length
        else EpochShuffle(len(items), config.train.seed)  # would hold captions of one template each
    )
    collate: CaptionCollator | RetrievalCollator
    tokenizer = loaded.processor.tokenizer
    if retrieval:
        collate = RetrievalCollator(tokenizer, config.data.max_caption_tokens)
    else:
        collate = collator.for_model(loaded.model, loaded.processor, config.data.prompt,
                                     config.data.max_caption_tokens)  # fmt: skip
    if main and isinstance(collate, CaptionCollator) and collate.end_token_id != tokenizer.eos_token_id:
        log.info("captions end with token %d (%r), where generation stops (the language model's generation "
                 "config), not with the tokenizer's EOS %s", collate.end_token_id,
                 tokenizer.decode([collate.end_token_id]), tokenizer.eos_token_id)  # fmt: skip
    loader = training_loader(items, sampler, collate, config, batch_size, accelerator.device.type == "cuda")
    fused = config.train.fused_optimizer and accelerator.device.type == "cuda"
    groups = parameter_groups(loaded.model, config.train.lr, config.train.lr_scales)
    if main and config.train.lr_scales:
        log.info("learning rates: %s", ", ".join(f"{g['name']} {g['lr']:g} ({len(g['params'])} tensors)"
                                                 for g in groups))  # fmt: skip
    optimizer = torch.optim.AdamW(groups, lr=config.train.lr, weight_decay=config.train.weight_decay, fused=fused)
    if config.train.compile:
        _compile_decoder_layers(loaded.model)
    # The feature pass runs before accelerate prepares the model: under FSDP the weights are sharded after that, and
    # only the training forward gathers them. A quantised model is already on its GPU.
    features, feature_seconds = None, 0.0
    if cached:
        if config.model.quantization == "none":
            loaded.model.to(accelerator.device)
        start = time.perf_counter()
        with attention_kernels(config.model.cudnn_attention):
            features = train_image_features(config, loaded, pairs, accelerator)
        feature_seconds = time.perf_counter() - start
        if main:
            log.info("image features of %d train images ready in %.1f s, kept on %s", len(features),
                     feature_seconds, features.device)  # fmt: skip
    # accelerate prepares the training forward (DDP must see it); loaded.model stays the model it holds (under FSDP
    # sharded in place).
    forward = RetrievalLoss(loaded.model) if retrieval else CaptionLoss(loaded.model, config.train.caption_logits_only)
    step, optimizer, loader = accelerator.prepare(forward, optimizer, loader)

    # 5. Schedule in optimizer steps; not handed to accelerate, which would step it once per process.
    steps_per_epoch = math.ceil(len(loader) / config.train.grad_accum)
    total_steps = config.train.max_steps or steps_per_epoch * config.train.epochs
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(config.train.warmup_steps, total_steps), total_steps)
    if is_adalora(loaded.model):  # its rank budget runs over the run's optimizer steps, known only now
        set_total_step(loaded.model, total_steps)
    run = Run(
        config, accelerator, loaded, optimizer, scheduler, loader, sampler, step, features, val_records, output_dir,
        base_dir, steps_per_epoch, total_steps, feature_seconds, val_questions,
    )  # fmt: skip
    if config.train.resume_from:
        load_checkpoint(run, resolve_checkpoint(config.train.resume_from, output_dir))
    return run


_PEFT_SEGMENTS = ("base_model.model.", "modules_to_save.default.", "original_module.")
"""What PEFT puts into a parameter's name (its wrapper, and the trained copy of a `modules_to_save` module): taken out
before `train.lr_scales` paths are matched, so they name the BLIP-2's own modules."""


def model_path(parameter_name: str) -> str:
    """A trainable parameter's name as the BLIP-2 names it, without PEFT's wrapper segments."""
    for segment in _PEFT_SEGMENTS:
        parameter_name = parameter_name.replace(segment, "")
    return parameter_name


def parameter_groups(model: nn.Module, lr: float, scales: dict[str, float]) -> list[dict[str, Any]]:
    """AdamW parameter groups of the trainable parameters: one at `lr` for those no `scales` path covers, then one
    per path (the longest matching path of a parameter wins) at `lr` x its factor, in a fixed order (the model's),
    so a resumed optimizer's state goes back into the same groups.

    Raises:
        CaptuneError: a path under which no parameter trains, naming the parts of the model that do.
    """
    paths = sorted(scales, key=len, reverse=True)
    groups: dict[str, list[nn.Parameter]] = {"": []}
    trained: list[str] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        path = model_path(name)
        trained.append(path)
        key = next((p for p in paths if path == p or path.startswith(p + ".")), "")
        groups.setdefault(key, []).append(param)
    unused = [p for p in scales if p not in groups]
    if unused:
        parts = ", ".join(sorted({path.split(".")[0] for path in trained}))
        raise CaptuneError(f"train.lr_scales: nothing trains under {', '.join(unused)}; the trained parameters are "
                           f"under {parts} (train.mode and lora.modules_to_save say what trains)")  # fmt: skip
    return [{"params": params, "lr": lr * float(scales.get(key, 1.0)), "name": key or "the rest"}
            for key, params in groups.items() if params]  # fmt: skip


def _compile_decoder_layers(model: nn.Module) -> None:
    """torch.compile each decoder layer of the language model in place (dynamic shapes: lengths vary by batch)."""
    lm = blip_of(model).language_model.base_model
    layers = getattr(getattr(lm, "decoder", lm), "layers", None)
    if layers is None:
        raise CaptuneError(f"train.compile: no decoder layers found in {type(lm).__name__}; set train.compile=false")
    for layer in layers:
        layer.compile(dynamic=True)


def fit(run: Run) -> TrainState:
    """The loop: epochs of accumulated steps, a checkpoint every `save_every` steps and at each epoch end, validation
    at each epoch end, best/ by CIDEr (VQA: by accuracy), final/ at the end. Forward and backward run under one
    choice of attention kernels (`model.cudnn_attention`; validation's generation makes its own)."""
    with attention_kernels(run.config.model.cudnn_attention):
        return _fit(run)


def _fit(run: Run) -> TrainState:
    config, accelerator, state = run.config, run.accelerator, run.state
    main = accelerator.is_main_process
    if main:
        run.output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run.output_dir / "config.yaml")
        if run.val_records:
            write_references(run.output_dir / "val" / "references.json", run.val_records)
        if run.val_questions:
            write_val_questions(run.output_dir / "val" / "questions.json", run.val_questions)
    accelerator.init_trackers("tensorboard", config=_flat_hparams(config))
    # A terminal gets a live bar; a log file (CI, nohup) gets a line every 30 s instead of thousands of redraws.
    interval = 0.5 if sys.stderr.isatty() else 30.0
    bar = tqdm(total=run.total_steps, initial=state.global_step, disable=not main, desc="train", unit="step",
               mininterval=interval)  # fmt: skip
    model = run.step
    model.train()
    setup_peak = None
    if torch.cuda.is_available():
        # Training's own peak from here on: loading (under FSDP the whole model is on each GPU until it is sharded)
        # and the feature pass are reported apart.
        setup_peak = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    speed = Throughput()
    adalora = is_adalora(run.loaded.model)
    run.first_nonfinite = torch.full((), NO_STEP, dtype=torch.long, device=accelerator.device)
    with bar:  # closed on an error too, so the message starts a line of its own
        while state.global_step < run.total_steps:
            # 1. Continue mid-epoch after a resume by skipping the batches the checkpoint had already seen.
            # accelerate's loader sets its sampler's epoch to its own count at every pass: set that count, so each epoch
            # (also one a resume starts in) gets the order (seed, epoch) gives.
            run.loader.set_epoch(state.epoch)  # type: ignore[attr-defined]  # accelerate's DataLoaderShard
            done_in_epoch = state.global_step - state.epoch * run.steps_per_epoch
            loader = run.loader
            if done_in_epoch:  # a new DataLoader (new worker processes): only for the epoch a resume starts inside
                loader = accelerator.skip_first_batches(run.loader, done_in_epoch * config.train.grad_accum)
            for batch in loader:
                speed.fetched()
                if run.features is not None:
                    rows = batch.pop("image_index").to(run.features.device)
                    batch["image_features"] = run.features[rows].to(accelerator.device, non_blocking=True)
                samples = batch.pop("samples") if "samples" in batch else len(batch["input_ids"])  # packed: captions
                if accelerator.num_processes > 1 and "labels" in batch:  # (retrieval's losses gather their own)
                    # DDP averages the ranks' gradients: dividing each rank's summed loss by the mean caption-token
                    # count over ranks makes that average the loss of the global batch, as one process would compute.
                    local = label_tokens(batch)
                    batch["token_count"] = accelerator.reduce(local, reduction="sum") / accelerator.num_processes
                with accelerator.accumulate(model):
                    loss = model(**batch)
                    if adalora:  # the term PEFT's AdaLoRA forward adds to a model's own loss, which captune's bypasses
                        loss = loss + adalora_orthogonal_penalty(run.loaded.model)
                    accelerator.backward(loss)
                    grad_norm = None
                    if accelerator.sync_gradients:
                        # Clipping off (0) still takes the norm (an infinite bound scales by 1), to see it is finite.
                        bound = config.train.max_grad_norm or math.inf
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), bound)
                    mark_nonfinite(run, loss, grad_norm, state.global_step + 1)
                    run.optimizer.step()
                    if adalora and accelerator.sync_gradients:  # after the step, before the gradients are cleared
                        run.loaded.model.base_model.update_and_allocate(state.global_step)
                    run.optimizer.zero_grad()
                speed.add(samples * accelerator.num_processes)
                state.train_samples += samples * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                # 2. One optimizer step done: schedule, log, maybe checkpoint.
                run.scheduler.step()
                state.global_step += 1
                # train.lr on its schedule (groups of train.lr_scales run at their multiples of it)
                lr = run.scheduler.get_last_lr()[0] * config.train.lr / run.optimizer.param_groups[0]["initial_lr"]
                rate = speed.window_rate()
                bar.update(1)
                # Reading the loss makes the CPU wait for the GPU, which then idles while the next step is queued: only
                # at logging steps (so is the finite flag the steps above set on the GPU).
                if state.global_step % config.train.log_every == 0:
                    stop_if_diverged(run)  # this step waits for the GPU anyway
                    # Every rank takes part: the mean over ranks is the global batch's loss (see token_count above).
                    global_loss = accelerator.reduce(loss.detach(), reduction="mean").item()
                    scalars = {"loss": global_loss, "lr": lr, "samples_per_s": rate,
                               "data_wait_fraction": speed.window_wait_fraction()}  # fmt: skip
                    bar.set_postfix(
                        loss=f"{scalars['loss']:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}", refresh=False
                    )
                    accelerator.log({f"train/{k}": v for k, v in scalars.items()}, step=state.global_step)
                    if main:  # the same scalars as JSON lines, for the report and for scripts
                        line = {"step": state.global_step, "epoch": state.epoch, **scalars, **allocator_counters()}
                        with open(run.output_dir / "train_log.jsonl", "a") as out:
                            out.write(json.dumps(line) + "\n")
                    speed.new_window()
                if config.train.save_every and state.global_step % config.train.save_every == 0:
                    save_checkpoint(run, f"step-{state.global_step:06d}")
                    speed.skip()
                if state.global_step >= run.total_steps:
                    break
            # 3. Epoch end (or the last step): validate, keep the best, checkpoint.
            epoch_finished = state.global_step % run.steps_per_epoch == 0
            if epoch_finished:
                state.epoch += 1
                speed.end_epoch()
            if epoch_finished or state.global_step >= run.total_steps:
                stop_if_diverged(run)
                validate_and_keep_best(run)
                model.train()  # generation switched the model to eval mode and back to plain train mode
                save_checkpoint(run, f"step-{state.global_step:06d}")
                speed.skip()
    save_model(run, run.output_dir / "final")
    finish_validation(run)
    if main:
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        summary = {
            "total_steps": state.global_step,
            "train_samples": state.train_samples,
            "train_seconds": speed.seconds,
            "samples_per_second": speed.samples / max(speed.seconds, 1e-9),
            "samples_per_second_by_epoch": speed.epochs,
            "peak_gpu_memory_gib": peak,
            "setup_peak_gpu_memory_gib": setup_peak,
            "image_features_cached": run.features is not None,
            "feature_pass_seconds": run.feature_pass_seconds,
        }
        write_json(run.output_dir / "results.json", summary | results(state, config.data.task))
        _write_report(run.output_dir)
    if accelerator.num_processes > 1:
        # DDP's reducer holds the process group: let it go while every process is still here, so that
        # end_training's destroying the group is its last use (a rank freeing its reducer only after rank 0 had
        # exited hung once in gloo's teardown, tests/test_distributed.py's resume run on a loaded 2-core machine).
        accelerator.wait_for_everyone()
        del model
        run.step = nn.Identity()  # (the prepared module: only the training loop above uses it)
        accelerator.free_memory()
        accelerator.wait_for_everyone()
    accelerator.end_training()
    return state


def allocator_counters() -> dict[str, int]:
    """The CUDA caching allocator's running counts of device allocations (cudaMalloc calls, which wait for the GPU)
    and of retries after freeing its cache; empty without CUDA. In the training log they show whether a slow
    stretch of steps is the allocator growing for new batch shapes."""
    if not torch.cuda.is_available():
        return {}
    stats = torch.cuda.memory_stats()
    return {"cuda_mallocs": int(stats.get("num_device_alloc", -1)),
            "cuda_alloc_retries": int(stats.get("num_alloc_retries", -1))}  # fmt: skip


def _write_report(run_dir: Path) -> None:
    """The HTML report; a failure there is reported but does not undo a finished training run."""
    from captune.report import write_report

    try:
        log.info("report: %s", write_report(run_dir))
    except Exception as err:  # noqa: BLE001 - the trained model is saved; say why the report is missing
        log.warning("the run report could not be written (%s); retry with `captune report %s`", err, run_dir)


def validate_and_keep_best(run: Run) -> dict[str, float] | None:
    """Captions the val images (sharded over processes, gathered once), scores them on rank 0, logs, keeps best/
    (by CIDEr; with `task: vqa` answers the val questions and keeps best/ by VQA accuracy)."""
    if not run.config.train.validate or not (run.val_records or run.val_questions):
        return None
    accelerator, state = run.accelerator, run.state
    model = accelerator.unwrap_model(run.loaded.model)
    options = run.config.generate
    if run.config.train.val_num_beams is not None:
        options = dataclasses.replace(options, num_beams=run.config.train.val_num_beams)
    retrieval = run.config.data.task == "retrieval"
    if retrieval:  # every image and caption is embedded once, on rank 0: recall ranks each query against all
        predictions: dict[Any, str] = {}
    elif run.val_questions:
        mine_questions = run.val_questions[accelerator.process_index :: accelerator.num_processes]
        predictions = answer_questions(
            model,
            run.loaded.processor,
            mine_questions,
            options,
            run.config.data.question_template,
            run.config.data.num_workers,
        )
    else:
        mine = run.val_records[accelerator.process_index :: accelerator.num_processes]
        predictions = predict_records(model, run.loaded.processor, mine, options, run.config.data.prompt,
                                      run.config.data.num_workers)  # fmt: skip
    gathered = dict(gather_object(list(predictions.items())))
    metrics = None
    if accelerator.is_main_process:
        if retrieval:
            metrics = retrieval_validation(run.loaded, model, run.val_records, run.config.train.val_k_test)
        elif run.val_questions:
            metrics = vqa_metrics(vqa_accuracy(gathered, run.val_questions))
        else:
            names = FAST_METRICS if run.config.train.val_metrics == "fast" else METRIC_NAMES
            metrics = score_captions(references_of(run.val_records), gathered, metrics=names).metrics
        accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=state.global_step)
        state.history.append({"epoch": state.epoch, "step": state.global_step, "metrics": metrics})
        write_json(run.output_dir / "val" / f"step-{state.global_step:06d}.json",
                   {"metrics": metrics, "predictions": gathered})  # fmt: skip
        log.info("step %d val: %s", state.global_step, " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    best = _broadcast_float(accelerator, metrics[_BEST_BY[run.config.data.task]] if metrics else 0.0)
    if state.best_cider is None or best > state.best_cider:
        state.best_cider, state.best_step = best, state.global_step
        save_model(run, run.output_dir / "best")
    return metrics


_BEST_BY = {"caption": "CIDEr", "vqa": "vqa_accuracy", "retrieval": "r_mean"}
"""The val metric that picks best/, by task."""


def retrieval_validation(loaded: LoadedModel, model: Any, records: list[Record], k_test: int) -> dict[str, float]:
    """Recall@1/5/10 both ways on the val images and their captions, in percent, LAVIS's keys (`txt_r1` ...
    `r_mean`): after the matching head re-ranked each query's top `k_test` (0: the contrastive scores), and the
    contrastive scores' own as `itc_*` when re-ranked."""
    retrieval = RetrievalModel(model, loaded.processor.tokenizer, loaded.processor.image_processor)
    return evaluate_retrieval(retrieval, records, k_test=k_test or None).metrics()


def vqa_metrics(accuracy: VqaAccuracy) -> dict[str, float]:
    """A validation's VQA numbers in percent: `vqa_accuracy` overall and `vqa_accuracy_<answer type>` (yes/no as
    yes_no), logged and kept like caption metrics."""
    per_type = {f"vqa_accuracy_{kind.replace('/', '_')}": value for kind, value in accuracy.per_answer_type.items()}
    return {"vqa_accuracy": accuracy.overall, **per_type}


def write_val_questions(path: Path, questions: list[Question]) -> None:
    """What the run report's gallery shows of each val question (`captune.report` reads it): question id, as the
    val/step-*.json predictions key it -> question, image (its absolute path), annotators' answers, answer and
    question type. Written atomically (`write_json`): a kill leaves the old file or the new one."""
    write_json(path, {str(q.question_id): {"question": q.question, "image_id": q.image_id,
                                           "image_path": str(q.image_path), "answers": list(q.answers),
                                           "answer_type": q.answer_type, "question_type": q.question_type}
                      for q in questions})  # fmt: skip


def finish_validation(run: Run) -> None:
    """The best step's numbers with every metric (METEOR too) in best/metrics.json and its model card (rank 0).

    When validation used the `generate` settings, its saved captions are scored again (with fast validation
    metrics; no generation is repeated) and the step's val file gets the full set. When it used fewer beams
    (`train.val_num_beams`), best/ is captioned once more with `generate.*` into `val/best-final.json`.
    """
    state, config = run.state, run.config
    regenerate = config.train.val_num_beams not in (None, config.generate.num_beams)
    if not run.accelerator.is_main_process or state.best_step is None or config.data.task == "retrieval":
        return  # (retrieval's validation computed every number: best/metrics.json holds them)
    # VQA accuracy has no slow metric to add: only answering again with other beams changes best/'s numbers.
    if not regenerate and (config.train.val_metrics == "full" or run.val_questions):
        return
    model = run.accelerator.unwrap_model(run.loaded.model)
    if regenerate:
        if state.best_step != state.global_step:  # the live model holds the last step's weights; final/ is saved
            load_saved_weights(model, run.output_dir / "best")
        predictions: dict[Any, str]
        if run.val_questions:
            predictions = answer_questions(model, run.loaded.processor, run.val_questions, config.generate,
                                           config.data.question_template, config.data.num_workers)  # fmt: skip
            metrics = vqa_metrics(vqa_accuracy(predictions, run.val_questions))
        else:
            predictions = predict_records(model, run.loaded.processor, run.val_records, config.generate,
                                          config.data.prompt, config.data.num_workers)  # fmt: skip
            metrics = score_captions(references_of(run.val_records), predictions).metrics
        val_file = run.output_dir / "val" / "best-final.json"
        write_json(val_file, {"step": state.best_step, "generate": to_dict(config)["generate"],
                              "metrics": metrics, "predictions": predictions})  # fmt: skip
    else:
        val_file = run.output_dir / "val" / f"step-{state.best_step:06d}.json"
        saved = json.loads(val_file.read_text())
        metrics = score_captions(references_of(run.val_records), saved["predictions"]).metrics
        write_json(val_file, saved | {"metrics": metrics})
        for entry in state.history:
            if entry["step"] == state.best_step:
                entry["metrics"] = metrics
    write_json(run.output_dir / "best" / "metrics.json", metrics)
    best = LoadedModel(model, run.loaded.processor, run.loaded.base_name)
    (run.output_dir / "best" / CARD_FILE).write_text(model_card(best, run.config, metrics))
    log.info("best step %d, all metrics (%s): %s", state.best_step, val_file,
             " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))  # fmt: skip


def _broadcast_float(accelerator: Accelerator, value: float) -> float:
    """Rank 0's value on every rank, so all ranks take the same branch."""
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return float(box[0])


def _flat_hparams(config: Config) -> dict[str, Any]:
    """TensorBoard's hparams take scalars and strings only."""
    flat = {}
    for section, values in to_dict(config).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def trained_model_dir(output_dir: str | Path) -> Path:
    """The model a finished run recommends: best/ (by val CIDEr) when validation ran, else final/."""
    run_dir = Path(output_dir).expanduser()
    return run_dir / "best" if (run_dir / "best").is_dir() else run_dir / "final"


def train(config: Config) -> TrainState:
    """Runs the whole recipe for a resolved config (the `captune train` command and the Python API)."""
    return fit(setup(config))
