"""VQA training (`task: vqa`): rows laid out as generation lays out questions, labels the answer and the end token
generation stops at (the OPT and Flan-T5 twins), the answer choice and its weighted loss, the feature cache serving
every question of an image, a resume, and short runs of every training mode with validation by VQA accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from captune.cli import main
from captune.config import Config
from captune.config_loading import load_config
from captune.data.vqa import Question, read_vqa
from captune.generation.inputs import text_inputs
from captune.model import LoadedModel, apply_lora, blip_of, build_tiny, load_base
from captune.training import recipe
from captune.training.batches import CaptionCollator, CaptionPairs, ImageCaptions, PackedCaptionCollator, answer_rows
from captune.training.loss import IGNORE, CaptionLoss, label_tokens

from .test_recipe import _adapter

OPT_END = 50118  # blip2-opt's generation config EOS ("\n"); its tokenizer's EOS `</s>` is 2
TEMPLATE = "Question: {} Answer:"
ASKED = [
    ("what colour is the shape?", "red"),
    ("is there a circle?", "yes"),
    ("where is the big blue square?", "on the left"),
]


def _vqa_config(data_dir: Path, output_dir: Path, *overrides: str) -> Config:
    """A fast CPU run on the small synthetic set's questions: 24 train images, 120 questions, batch 10 -> 12 steps
    an epoch."""
    return load_config(None, ["task=vqa", "data.format=synthetic", f"data.data_dir={data_dir}",
                              f"train.output_dir={output_dir}", "train.batch_size=10", "train.lr=1e-3",
                              "train.warmup_steps=3", "train.validate=false",
                              "lora.modules_to_save=language_projection", "model.dtype=fp32", "generate.num_beams=1",
                              *overrides])  # fmt: skip


def _items(size: int, asked: list[tuple[str, str]] = ASKED) -> list[dict]:
    return [{"pixel_values": torch.zeros(3, size, size), "prompt": TEMPLATE.format(q), "caption": a} for q, a in asked]


@pytest.fixture(scope="module")
def opt_twin() -> LoadedModel:
    return load_base("twin-blip2-opt-2.7b")


@pytest.fixture(scope="module")
def t5_twin() -> LoadedModel:
    return load_base("twin-blip2-flan-t5-xl")


# --- rows and labels --------------------------------------------------------------------------------------------


def test_opt_twin_rows_are_the_generation_inputs_then_answer_then_newline(opt_twin: LoadedModel) -> None:
    tokenizer = opt_twin.processor.tokenizer
    batch = CaptionCollator.for_model(opt_twin.model, opt_twin.processor)(_items(224))
    prompts = [TEMPLATE.format(q) for q, _ in ASKED]
    fed = text_inputs(opt_twin.model, opt_twin.processor, len(prompts), prompts)  # what generation feeds, left-padded
    start = batch["caption_start"]
    assert start == fed["input_ids"].shape[1]
    assert torch.equal(batch["input_ids"][:, :start], fed["input_ids"])
    assert torch.equal(batch["attention_mask"][:, :start], fed["attention_mask"])
    assert (batch["labels"][:, :start] == IGNORE).all()  # image tokens, padding, BOS, question: no loss
    for row, (prompt, (_, answer)) in enumerate(zip(prompts, ASKED, strict=True)):
        labels = [i for i in batch["labels"][row].tolist() if i != IGNORE]
        whole = tokenizer(f"{prompt} {answer}").input_ids  # BPE: the answer joins the prompt with a space
        assert labels == whole[len(tokenizer(prompt).input_ids) :] + [OPT_END]
        assert batch["input_ids"][row, start : start + len(labels)].tolist() == labels


def test_t5_twin_encoder_reads_the_generation_inputs_and_labels_are_the_answer_then_eos(t5_twin: LoadedModel) -> None:
    tokenizer = t5_twin.processor.tokenizer
    batch = CaptionCollator.for_model(t5_twin.model, t5_twin.processor)(_items(224))
    prompts = [TEMPLATE.format(q) for q, _ in ASKED]
    fed = text_inputs(t5_twin.model, t5_twin.processor, len(prompts), prompts)  # right-padded for T5
    assert torch.equal(batch["input_ids"], fed["input_ids"]) and torch.equal(
        batch["attention_mask"], fed["attention_mask"]
    )
    for row, (_, answer) in enumerate(ASKED):
        labels = [i for i in batch["labels"][row].tolist() if i != IGNORE]
        assert labels == tokenizer(answer).input_ids and labels[-1] == tokenizer.eos_token_id == 1


def test_a_question_holding_the_image_token_is_refused(tiny: LoadedModel) -> None:
    items = _items(32, [("what is <image> here?", "red")])
    with pytest.raises(Exception, match="question prompt .* holds the image token"):
        CaptionCollator.for_model(tiny.model, tiny.processor)(items)


def _question(*answers: str) -> Question:
    return Question(1, "what colour?", "a.png", Path("/a.png"), answers, "train")


def test_the_most_frequent_answer_trains_and_a_tie_goes_to_the_answer_given_first() -> None:
    assert answer_rows(_question("blue", "red", "red", "blue", "green"), "most-frequent") == [("blue", 1.0)]
    assert answer_rows(_question("red", "blue", "blue"), "most-frequent") == [("blue", 1.0)]


def test_weighted_answers_are_each_distinct_answer_with_its_vqa_soft_score() -> None:
    rows = answer_rows(_question("blue", "red", "red", "red", "red", "blue", "green"), "weighted")
    assert rows == [("red", 1.0), ("blue", pytest.approx(2 / 3)), ("green", pytest.approx(1 / 3))]


def test_weighted_rows_carry_their_weights_into_the_batch(tiny: LoadedModel, synthetic_dir: Path) -> None:
    questions = read_vqa("synthetic", synthetic_dir).split("train")[:2]
    asked = [Question(q.question_id, q.question, q.image_id, q.image_path, ("red", "red", "blue"), "train")
             for q in questions]  # fmt: skip
    pairs = CaptionPairs.from_questions(asked, tiny.processor, TEMPLATE, "weighted")
    assert [pairs.captions[i] for i in range(len(pairs))] == ["red", "blue", "red", "blue"]
    batch = CaptionCollator.for_model(tiny.model, tiny.processor)([pairs[i] for i in range(len(pairs))])
    assert batch["weights"].tolist() == pytest.approx([2 / 3, 1 / 3, 2 / 3, 1 / 3])
    assert label_tokens(batch).item() == pytest.approx(2.0)  # what the loss divides by: the weights' sum


# --- the loss ---------------------------------------------------------------------------------------------------

WEIGHTED = [("what colour is the shape?", "red"), ("which shape is it?", "a large square"), ("is there a circle?", "a")]


@pytest.mark.parametrize("name", ["tiny", "tiny-t5"])
def test_the_weighted_loss_is_the_weighted_mean_of_each_rows_own_loss(name: str) -> None:
    loaded = build_tiny(0, name)
    loaded.model.eval()
    collate = CaptionCollator.for_model(loaded.model, loaded.processor)
    loss = CaptionLoss(loaded.model).eval()
    items = _items(32, WEIGHTED)
    weights = [1.0, 2 / 3, 1 / 3]
    with torch.no_grad():
        # Each row alone, unweighted: its mean over its answer tokens (and no left padding: a row of its own).
        alone = [loss(**collate([item])).item() for item in items]
        weighted = loss(**collate([item | {"weight": w} for item, w in zip(items, weights, strict=True)])).item()
    expected = sum(w * row for w, row in zip(weights, alone, strict=True)) / sum(weights)
    assert len(set(alone)) == 3 and weighted == pytest.approx(expected, rel=1e-5)


def test_left_padding_leaves_each_rows_loss_as_alone(tiny: LoadedModel) -> None:
    # Unweighted rows average over tokens: a batch's loss is the token-weighted mean of its rows' losses.
    tiny.model.eval()
    collate = CaptionCollator.for_model(tiny.model, tiny.processor)
    loss = CaptionLoss(tiny.model).eval()
    items = _items(32, WEIGHTED)
    with torch.no_grad():
        alone = [(loss(**collate([item])).item(), label_tokens(collate([item])).item()) for item in items]
        together = loss(**collate(items)).item()
    assert together == pytest.approx(sum(v * n for v, n in alone) / sum(n for _, n in alone), rel=1e-5)


# --- packed rows: an image's questions share its image tokens ----------------------------------------------------


def _packed_and_rows(loaded: LoadedModel, synthetic_dir: Path, answers: str) -> tuple[dict, dict]:
    """Three images' 15 questions, packed (a row per image) and as `question_rows` (a row per answer)."""
    questions = read_vqa("synthetic", synthetic_dir).split("train")[:15]
    if answers == "weighted":  # two distinct answers a question, of one and of three words
        questions = [Question(q.question_id, q.question, q.image_id, q.image_path,
                              (q.answers[0],) * 4 + ("a large red",) * 2, "train") for q in questions]  # fmt: skip
    pairs = CaptionPairs.from_questions(questions, loaded.processor, TEMPLATE, answers)
    images = ImageCaptions(pairs)
    packed = PackedCaptionCollator.for_model(loaded.model, loaded.processor)([images[i] for i in range(len(images))])
    rows = CaptionCollator.for_model(loaded.model, loaded.processor)([pairs[i] for i in range(len(pairs))])
    return packed, rows


def _loss_and_grads(model: torch.nn.Module, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = CaptionLoss(model).eval()(**batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


@pytest.mark.parametrize("answers", ["most-frequent", "weighted"])
@pytest.mark.parametrize(("name", "attention"), [("tiny", "sdpa"), ("tiny", "eager"), ("twin-blip2-opt-2.7b", "sdpa")])
def test_packed_questions_give_the_loss_and_gradients_of_a_row_per_answer(
    synthetic_dir: Path, name: str, attention: str, answers: str
) -> None:
    loaded = load_base(name)
    model = apply_lora(loaded.model, load_config(None, ["lora.modules_to_save=language_projection"]).lora)
    loaded = LoadedModel(model, loaded.processor, name)
    blip_of(model).language_model.config._attn_implementation = attention
    model.eval()
    packed, rows = _packed_and_rows(loaded, synthetic_dir, answers)
    samples = packed.pop("samples")
    assert len(packed["input_ids"]) == 3 and samples == len(rows["input_ids"]) == (
        15 if answers == "most-frequent" else 30
    )
    assert label_tokens(packed).item() == pytest.approx(label_tokens(rows).item())
    loss, grads = _loss_and_grads(model, packed)
    reference, reference_grads = _loss_and_grads(model, rows)
    assert loss == pytest.approx(reference, rel=1e-5)
    assert len(grads) > 0 and grads.keys() == reference_grads.keys()
    for key, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[key], rtol=1e-4, atol=1e-6, msg=key)
    # The image tokens once an image instead of once a question.
    assert packed["input_ids"].numel() < rows["input_ids"].numel()
    if name.startswith("twin"):  # blip2-opt: every answer ends at "\n", where generation stops
        ends = [i for i, t in enumerate(packed["labels"].tolist()) if t == OPT_END]
        assert len(ends) == samples


def test_vqa_runs_pack_an_images_questions_for_opt_and_not_for_t5(synthetic_dir: Path, tmp_path: Path) -> None:
    opt = recipe.setup(_vqa_config(synthetic_dir, tmp_path / "opt", "train.max_steps=1"))
    assert isinstance(opt.loader.dataset, ImageCaptions) and len(opt.loader.dataset) == 24
    t5 = recipe.setup(_vqa_config(synthetic_dir, tmp_path / "t5", "train.max_steps=1", "model.name=tiny-t5"))
    assert isinstance(t5.loader.dataset, CaptionPairs) and len(t5.loader.dataset) == 120


# --- the feature cache, a resume and whole runs -----------------------------------------------------------------


def test_the_feature_cache_computes_each_image_once_for_all_its_questions(synthetic_dir: Path, tmp_path: Path) -> None:
    config = _vqa_config(synthetic_dir, tmp_path / "run", "train.max_steps=1", "lora.modules_to_save=",
                         "train.pack_captions=false")  # fmt: skip
    run = recipe.setup(config)  # LoRA on the language model only: nothing upstream of it trains
    pairs = run.loader.dataset
    assert isinstance(pairs, CaptionPairs) and run.features is not None
    assert len(pairs) == 120 and len(run.features) == len(pairs.paths) == 24  # five questions an image
    first = pairs[0]
    assert "pixel_values" not in first and {pairs[i]["image_index"] for i in range(5)} == {first["image_index"]}
    # A cached batch gives the loss of the same batch from pixels.
    collate = CaptionCollator.for_model(run.loaded.model, run.loaded.processor, "", 40)
    cached = collate([pairs[i] for i in range(6)])
    rows = cached.pop("image_index")
    pairs.with_pixels = True
    with_pixels = collate([pairs[i] for i in range(6)])
    loss = CaptionLoss(run.loaded.model).eval()
    with torch.no_grad():
        assert loss(**cached, image_features=run.features[rows]).item() == pytest.approx(
            loss(**with_pixels).item(), rel=1e-5
        )


def test_resuming_a_vqa_run_gives_the_uninterrupted_adapter_bit_for_bit(synthetic_dir: Path, tmp_path: Path) -> None:
    common = ["train.max_steps=16", "train.save_every=5", "lora.dropout=0.1", "data.vqa_answers=weighted"]
    recipe.train(_vqa_config(synthetic_dir, tmp_path / "full", *common, "train.keep_checkpoints=10"))
    checkpoint = tmp_path / "full" / "checkpoints" / "step-000005"
    state = recipe.train(_vqa_config(synthetic_dir, tmp_path / "resumed", *common, f"train.resume_from={checkpoint}"))
    assert state.global_step == 16
    expected, actual = _adapter(tmp_path / "full" / "final"), _adapter(tmp_path / "resumed" / "final")
    assert expected.keys() == actual.keys() and len(expected) > 0
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    assert any(v.abs().sum() > 0 for k, v in actual.items() if "lora_B" in k)


@pytest.mark.parametrize(
    ("model", "mode"),
    [("tiny", "lora-lm"), ("tiny", "qformer"), ("tiny-t5", "lora-lm"), ("tiny-t5", "lora-lm+qformer")],
)
def test_every_training_mode_trains_on_questions_and_keeps_best_by_vqa_accuracy(
    synthetic_dir: Path, tmp_path: Path, model: str, mode: str
) -> None:
    config = _vqa_config(synthetic_dir, tmp_path / "run", f"model.name={model}", f"train.mode={mode}",
                         "train.max_steps=4", "train.validate=true")  # fmt: skip
    state = recipe.train(config)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert state.best_step == 4 and results["best_vqa_accuracy"] == state.best_cider and "best_cider" not in results
    metrics = json.loads((tmp_path / "run" / "val" / "step-000004.json").read_text())
    assert set(metrics["predictions"]) == {
        str(q.question_id) for q in read_vqa("synthetic", synthetic_dir).split("val")
    }
    assert metrics["metrics"]["vqa_accuracy"] == results["best_vqa_accuracy"]
    assert json.loads((tmp_path / "run" / "best" / "metrics.json").read_text()) == metrics["metrics"]
    assert state.train_samples == 40  # 4 steps of 10 questions


CONFIGS = Path(__file__).parents[2] / "configs"


@pytest.mark.parametrize(
    ("file", "twin"),
    [("blip2-opt-2.7b-vqav2.yaml", "twin-blip2-opt-2.7b"), ("blip2-flan-t5-xl-vqav2.yaml", "twin-blip2-flan-t5-xl")],
)
def test_the_shipped_vqa_configs_train_their_checkpoints_twin_on_questions(
    synthetic_dir: Path, tmp_path: Path, file: str, twin: str
) -> None:
    overrides = [f"model.name={twin}", "data.format=synthetic", f"data.data_dir={synthetic_dir}",
                 f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.grad_accum=1",
                 "train.batch_size=4", "data.num_workers=0", "train.validate=false"]  # fmt: skip
    config = load_config(CONFIGS / file, overrides)
    assert (config.data.task, config.data.vqa_answers, config.generate.max_new_tokens) == ("vqa", "weighted", 10)
    state = recipe.train(config)
    assert state.global_step == 2 and (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()


def test_captune_train_with_task_vqa_trains_validates_and_says_the_best_accuracy(
    synthetic_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["train", "task=vqa", f"data.data_dir={synthetic_dir}", f"train.output_dir={tmp_path / 'run'}",
                 "train.max_steps=3", "train.batch_size=8", "model.dtype=fp32", "generate.num_beams=1"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "done: 3 steps; best model (val VQA accuracy" in out
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert (saved.data.task, saved.generate.min_new_tokens, saved.generate.max_new_tokens) == ("vqa", 1, 10)
