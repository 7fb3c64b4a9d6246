"""The training data as batches: the dataset read and checked, every (image, caption) pair by caption or by image
(with `task: vqa`, every (image, question prompt, answer) row), the collators that make model inputs and labels of
them, and the loader (the samplers that order an epoch: `captune.training.sampling`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers import Blip2Processor

from captune import data as datasets
from captune.config import Config, read_options, vqa_read_options
from captune.data import CaptionSet, Problem, Record
from captune.data.images import processed_pixels
from captune.data.vqa import Question, VqaSet, check_vqa_images, read_vqa
from captune.errors import CaptuneError
from captune.model import blip_of, caption_end_id
from captune.training.loss import IGNORE, PACKING_ATTENTION

log = logging.getLogger(__name__)


class CaptionPairs(Dataset):
    """Every (image, caption) pair of a split; images are decoded lazily, in DataLoader workers when there are any.

    Paths and captions are kept as UTF-8 bytes in flat numpy arrays, not as Python objects: a forked worker that
    reads a Python string writes its reference count, and the page it sits on is copied, so over an epoch each
    worker would grow by a copy of every caption (~100 MB per worker for COCO). Reading a numpy array writes nothing.

    With `with_pixels=False` (image features cached, see captune.training.features) an item carries its image's index in
    `records` instead of pixels, and no image is decoded.

    VQA rows (`from_questions`) are the same pairs with the answer as the caption, and each row carries its own prompt
    (the question in `data.question_template`) and, with `data.vqa_answers: weighted`, its weight in the loss.
    """

    prompts: _Texts | None = None
    """Each row's prompt (VQA), or None: every row takes the collator's one prompt (captions)."""
    weights: np.ndarray | None = None
    """Each row's weight in the loss (VQA with weighted answers), or None: rows count by their tokens."""

    def __init__(self, records: list[Record], processor: Blip2Processor, with_pixels: bool = True):
        self._rows([str(r.image_path) for r in records], [r.captions for r in records], processor, with_pixels)

    def _rows(
        self, paths: list[str], texts: list[tuple[str, ...]], processor: Blip2Processor, with_pixels: bool
    ) -> None:
        """Image i is paths[i]; its rows (captions or answers) are texts[i], kept together in this order."""
        self.paths = _Texts(paths)
        self.captions = _Texts([text for rows in texts for text in rows])
        counts = [len(rows) for rows in texts]
        self.image_of = np.repeat(np.arange(len(paths), dtype=np.int64), counts)
        self.first_caption = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])  # image i: [i] to [i + 1]
        self.image_processor = processor.image_processor
        self.with_pixels = with_pixels

    @classmethod
    def from_questions(
        cls, questions: list[Question], processor: Blip2Processor, template: str, answers: str, with_pixels: bool = True
    ) -> CaptionPairs:
        """The training rows of VQA questions: per question its answer rows (`answer_rows`), prompt
        `template.format(question)`; grouped by image (in the order images first appear), so that an image's
        questions share its pixels and, cached, its features (`image_index` is the image's index in `paths`)."""
        by_image: dict[Path, list[Question]] = {}
        for question in questions:
            by_image.setdefault(question.image_path, []).append(question)
        rows = [[(template.format(q.question), answer, weight)
                 for q in asked for answer, weight in answer_rows(q, answers)]
                for asked in by_image.values()]  # fmt: skip
        pairs = cls.__new__(cls)
        pairs._rows([str(path) for path in by_image], [tuple(a for _, a, _ in r) for r in rows], processor, with_pixels)
        pairs.prompts = _Texts([prompt for image in rows for prompt, _, _ in image])
        if answers == "weighted":
            pairs.weights = np.array([weight for image in rows for _, _, weight in image], dtype=np.float32)
        return pairs

    def __len__(self) -> int:
        return len(self.captions)

    image_ids: bool = False
    """Each item names its image (`image_id`, the index in `paths`): retrieval's losses treat two captions of one
    image as positives of each other."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_index = int(self.image_of[index])
        item: dict[str, Any] = {"caption": self.captions[index]}
        if self.image_ids:
            item["image_id"] = image_index
        if self.prompts is not None:
            item["prompt"] = self.prompts[index]
        if self.weights is not None:
            item["weight"] = float(self.weights[index])
        if not self.with_pixels:
            return {"image_index": image_index, **item}
        return {"pixel_values": self.pixels(image_index), **item}

    def caption_lengths(self) -> np.ndarray:
        """Each caption's length in UTF-8 bytes (VQA: the answer's and its prompt's): a cheap stand-in for its token
        count when grouping by length."""
        lengths = np.diff(self.captions.ends, prepend=0)
        return lengths if self.prompts is None else lengths + np.diff(self.prompts.ends, prepend=0)

    def pixels(self, image_index: int) -> torch.Tensor:
        return processed_pixels(Path(self.paths[image_index]), self.image_processor)


class ImageCaptions(Dataset):
    """The same pairs by image: item i is image i (pixels, or its index when features are cached) with all its
    captions, for `PackedCaptionCollator`."""

    def __init__(self, pairs: CaptionPairs) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs.first_caption) - 1

    def __getitem__(self, index: int) -> dict[str, Any]:
        first, end = int(self.pairs.first_caption[index]), int(self.pairs.first_caption[index + 1])
        item: dict[str, Any] = {"captions": [self.pairs.captions[i] for i in range(first, end)]}
        if self.pairs.prompts is not None:  # VQA: each row's question prompt (and weight)
            item["prompts"] = [self.pairs.prompts[i] for i in range(first, end)]
        if self.pairs.weights is not None:
            item["weights"] = [float(w) for w in self.pairs.weights[first:end]]
        if not self.pairs.with_pixels:
            return {"image_index": index, **item}
        return {"pixel_values": self.pairs.pixels(index), **item}

    def caption_lengths(self) -> np.ndarray:
        """Each image's captions' total length in UTF-8 bytes, for grouping images by length."""
        return np.add.reduceat(self.pairs.caption_lengths(), self.pairs.first_caption[:-1])

    def images_per_batch(self, captions_per_batch: int) -> int:
        """How many images make a batch of about `captions_per_batch` captions (at least one)."""
        return max(1, round(captions_per_batch * len(self) / len(self.pairs)))


class _Texts:
    """A list of strings stored as one UTF-8 byte array and offsets."""

    def __init__(self, texts: list[str]) -> None:
        encoded = [text.encode() for text in texts]
        self.ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)
        self.data = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, index: int) -> str:
        start = int(self.ends[index - 1]) if index > 0 else 0
        return self.data[start : int(self.ends[index])].tobytes().decode()


@dataclass
class CaptionCollator:
    """Builds the model's inputs and labels for a batch of captions.

    Decoder-only language models (OPT) read one sequence, `[<image>] * num_query_tokens + BOS + prompt + caption +
    END`, right-padded; labels equal input_ids except image placeholders, BOS, prompt tokens and padding, which are
    -100. Encoder-decoder models (T5, `encoder_decoder=True`) read `[<image>] * num_query_tokens + prompt + EOS` in
    the encoder, and the labels are the caption + END, right-padded with -100; the model shifts them into decoder
    inputs. Either way END, the token generation stops at (`end_token_id`, see captune.model.caption_end_id: 50118,
    "\\n", for blip2-opt), follows each caption as a label, so the model learns to stop where generation looks for it.
    `for_model` makes one for a model.
    """

    processor: Blip2Processor
    prompt: str = ""
    max_caption_tokens: int = 40
    encoder_decoder: bool = False
    end_token_id: int = field(kw_only=True)

    @classmethod
    def for_model(
        cls, model: nn.Module, processor: Blip2Processor, prompt: str = "", max_caption_tokens: int = 40
    ) -> CaptionCollator:
        """The collator for `model`'s language model (decoder-only or encoder-decoder) and the end it stops at."""
        encoder_decoder = not blip_of(model).config.use_decoder_only_language_model
        end = caption_end_id(model, processor.tokenizer)
        return cls(processor, prompt, max_caption_tokens, encoder_decoder, end_token_id=end)

    def __post_init__(self) -> None:
        tokenizer = self.processor.tokenizer
        self.num_query_tokens = int(self.processor.num_query_tokens)
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.processor.image_token.content)
        self.prefix = [self.image_token_id] * self.num_query_tokens + tokenizer(self.prompt).input_ids

    def caption_ids(self, texts: list[str], prompts: list[str] | None = None) -> list[list[int]]:
        """Each caption's token ids (its whitespace collapsed: blip2-opt's END is "\\n"), cut to max_caption_tokens,
        then END. `prompts`: each row's own prompt (VQA), else the collator's one."""
        tokenizer = self.processor.tokenizer
        # A prompt joins the caption with a space, so BPE tokenizers see the caption's first word as a new word.
        prompts = prompts or [self.prompt] * len(texts)
        texts = [("" if self.encoder_decoder or not prompt else " ") + " ".join(text.split())
                 for text, prompt in zip(texts, prompts, strict=True)]  # fmt: skip
        captions = [ids[: self.max_caption_tokens] + [self.end_token_id]
                    for ids in tokenizer(texts, add_special_tokens=False).input_ids]  # fmt: skip
        for text, ids in zip(texts, captions, strict=True):
            for token, what in ((self.image_token_id, "the image token"), (self.end_token_id, "the end token")):
                if token in ids[:-1]:
                    raise CaptuneError(f"caption {text.strip()!r} holds {what} {tokenizer.decode([token])!r} (id "
                                       f"{token}); it must not appear inside captions")  # fmt: skip
        if self.prefix.count(self.image_token_id) != self.num_query_tokens:
            raise CaptuneError(
                f"prompt {self.prompt!r} holds the image token {self.processor.image_token.content}; it must not "
                "appear in the prompt"
            )
        return captions

    def prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        """Each row's own prompt as the generation path tokenizes it (OPT: BOS + prompt; T5: prompt + EOS)."""
        rows = self.processor.tokenizer(prompts).input_ids
        for prompt, ids in zip(prompts, rows, strict=True):
            if self.image_token_id in ids:
                raise CaptuneError(f"question prompt {prompt!r} holds the image token "
                                   f"{self.processor.image_token.content}; it must not appear in a "
                                   "question")  # fmt: skip
        return rows

    @staticmethod
    def images(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if "pixel_values" in batch[0]:
            return {"pixel_values": torch.stack([item["pixel_values"] for item in batch])}
        return {"image_index": torch.tensor([item["image_index"] for item in batch])}

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        if "prompt" in batch[0]:
            return self.question_rows(batch)
        tokenizer = self.processor.tokenizer
        captions = self.caption_ids([item["caption"] for item in batch])
        if self.encoder_decoder:
            input_ids = torch.tensor([self.prefix] * len(batch))
            attention_mask = torch.ones_like(input_ids)
            labels = _padded(captions, IGNORE)
        else:
            input_ids = _padded([self.prefix + ids for ids in captions], tokenizer.pad_token_id)
            attention_mask = _padded([[1] * (len(self.prefix) + len(ids)) for ids in captions], 0)
            labels = _padded([[IGNORE] * len(self.prefix) + ids for ids in captions], IGNORE)
        return {
            **self.images(batch),
            "caption_start": 0 if self.encoder_decoder else len(self.prefix),  # labels' first caption column
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
        }

    def question_rows(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        """A batch of VQA rows, each with its own prompt, laid out as generation lays out a batch of questions
        (`captune.generation.inputs.text_inputs`), so the model trains on the positions and padding it answers with.

        Decoder-only: `[<image>] * num_query_tokens`, left padding, BOS + prompt, then answer + END and right padding;
        every answer starts in one column (`caption_start`), and OPT's positions, counted over the attention mask,
        skip the left padding as in generation. Encoder-decoder: `[<image>] * num_query_tokens + prompt + EOS`,
        right-padded, in the encoder; labels answer + END. Labels are -100 but for answer and END. With weighted
        answers `weights` holds each row's weight.
        """
        pad = self.processor.tokenizer.pad_token_id
        images = [self.image_token_id] * self.num_query_tokens
        prompts = [item["prompt"] for item in batch]
        texts, answers = self.prompt_ids(prompts), self.caption_ids([item["caption"] for item in batch], prompts)
        longest = max(map(len, texts))
        rows: dict[str, Any] = {**self.images(batch)}
        if self.encoder_decoder:
            rows |= {"caption_start": 0,
                     "input_ids": _padded([images + ids for ids in texts], pad),
                     "attention_mask": _padded([[1] * (len(images) + len(ids)) for ids in texts], 0),
                     "labels": _padded(answers, IGNORE)}  # fmt: skip
        else:
            rows_ids, masks = [], []
            for text, answer in zip(texts, answers, strict=True):
                left = longest - len(text)
                rows_ids.append(images + [pad] * left + text + answer)
                masks.append([1] * len(images) + [0] * left + [1] * (len(text) + len(answer)))
            rows |= {"caption_start": len(images) + longest,
                     "input_ids": _padded(rows_ids, pad),
                     "attention_mask": _padded(masks, 0),
                     "labels": _padded([[IGNORE] * (len(images) + longest) + a for a in answers], IGNORE)}  # fmt: skip
        if "weight" in batch[0]:
            rows["weights"] = torch.tensor([item["weight"] for item in batch], dtype=torch.float32)
        return rows


class PackedCaptionCollator(CaptionCollator):
    """Builds a batch of whole images (`ImageCaptions` items), one row per image, so that an image's captions share
    the work of its image tokens and prompt.

    Decoder-only language models: a row is `[<image>] * num_query_tokens + BOS + prompt`, then each caption + EOS in
    turn, right-padded. `attention_mask` (rows, 1, length, length) lets the prefix attend causally to itself and
    each caption token to the prefix and to its own caption's earlier tokens (padding only to itself); `position_ids`
    restart after the prefix for each caption, so every caption token has the position, and sees the tokens, that it
    has in a row of its own. `labels` are the caption tokens, flat, and `predict_from` the flat (row x length) index
    of the hidden state that predicts each: the prefix's last position for a caption's first token, else the token
    before. Encoder-decoder models (T5): `input_ids` hold one `[<image>] * num_query_tokens + prompt + EOS` per image,
    `labels` one caption + EOS per row and `caption_image` the image row each caption belongs to.
    """

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        if "prompts" in batch[0]:
            return self.question_images(batch)
        per_image = [self.caption_ids(item["captions"]) for item in batch]
        samples = sum(map(len, per_image))
        if self.encoder_decoder:
            input_ids = torch.tensor([self.prefix] * len(batch))
            return {
                **self.images(batch),
                "samples": samples,
                "input_ids": input_ids,
                "attention_mask": torch.ones_like(input_ids),
                "labels": _padded([ids for captions in per_image for ids in captions], IGNORE),
                "caption_image": torch.tensor([i for i, captions in enumerate(per_image) for _ in captions]),
            }
        start = len(self.prefix)
        length = max(start + sum(map(len, captions)) for captions in per_image)
        input_ids = torch.full((len(batch), length), self.processor.tokenizer.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((len(batch), length), dtype=torch.long)
        segment = torch.full((len(batch), length), -1, dtype=torch.long)  # 0 prefix, j caption j, -1 padding
        input_ids[:, :start] = torch.tensor(self.prefix)
        position_ids[:, :start] = torch.arange(start)
        segment[:, :start] = 0
        predict_from, labels = [], []
        for row, captions in enumerate(per_image):
            at = start
            for j, ids in enumerate(captions, start=1):
                n = len(ids)
                input_ids[row, at : at + n] = torch.tensor(ids)
                position_ids[row, at : at + n] = torch.arange(start, start + n)
                segment[row, at : at + n] = j
                base = row * length
                predict_from += [base + start - 1, *range(base + at, base + at + n - 1)]
                labels += ids
                at += n
        allowed = _block_mask(segment)
        return {
            **self.images(batch),
            "samples": samples,
            "input_ids": input_ids,
            "attention_mask": allowed.unsqueeze(1),
            "position_ids": position_ids,
            "predict_from": torch.tensor(predict_from),
            "labels": torch.tensor(labels),
        }

    def question_images(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        """VQA, decoder-only: a row per image, `[<image>] * num_query_tokens`, then each of its questions in turn as
        BOS + prompt + answer + END (one segment each), right-padded. Each segment attends to the image tokens and
        causally to itself, and its positions restart after the image tokens: every token has the position, and
        sees the tokens, that it has in a row of its own (`question_rows`, whose left padding generation and OPT's
        positions skip). `labels` are the answer tokens, flat, `predict_from` the flat index of the hidden state
        that predicts each (the prompt's last token for an answer's first), and with weighted answers
        `token_weights` each label's weight (its row's weight over the row's answer tokens) and `weights` the rows'
        (whose sum the loss divides by)."""
        assert not self.encoder_decoder, "T5's questions are encoded with their image: no rows to share"
        segments = [
            list(
                zip(self.prompt_ids(item["prompts"]), self.caption_ids(item["captions"], item["prompts"]), strict=True)
            )
            for item in batch
        ]
        start = self.num_query_tokens
        length = max(start + sum(len(t) + len(a) for t, a in rows) for rows in segments)
        input_ids = torch.full((len(batch), length), self.processor.tokenizer.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((len(batch), length), dtype=torch.long)
        segment = torch.full((len(batch), length), -1, dtype=torch.long)  # 0 image tokens, j question j, -1 padding
        input_ids[:, :start] = self.image_token_id
        position_ids[:, :start] = torch.arange(start)
        segment[:, :start] = 0
        predict_from: list[int] = []
        labels: list[int] = []
        for row, rows in enumerate(segments):
            at = start
            for j, (text, answer) in enumerate(rows, start=1):
                n = len(text) + len(answer)
                input_ids[row, at : at + n] = torch.tensor(text + answer)
                position_ids[row, at : at + n] = torch.arange(start, start + n)
                segment[row, at : at + n] = j
                first = row * length + at + len(text) - 1  # the prompt's last token predicts the answer's first
                predict_from += range(first, first + len(answer))
                labels += answer
                at += n
        allowed = _block_mask(segment)
        out = {
            **self.images(batch),
            "samples": sum(map(len, segments)),
            "input_ids": input_ids,
            "attention_mask": allowed.unsqueeze(1),
            "position_ids": position_ids,
            "predict_from": torch.tensor(predict_from),
            "labels": torch.tensor(labels),
        }
        if "weights" in batch[0]:
            weights = [w for item in batch for w in item["weights"]]
            answers = [len(a) for rows in segments for _, a in rows]
            out["weights"] = torch.tensor(weights, dtype=torch.float32)
            per_token = [w / n for w, n in zip(weights, answers, strict=True) for _ in range(n)]
            out["token_weights"] = torch.tensor(per_token, dtype=torch.float32)
        return out


@dataclass
class RetrievalCollator:
    """A batch of (image, caption) pairs for `captune.retrieval.RetrievalLoss`: the captions tokenized by the
    Q-Former's tokenizer (`[CLS] caption [SEP]`, padded to the longest, cut at `max_caption_tokens` + 2), each
    pair's image id, whether the pairs show two images or more (`two_images`: the matching loss needs negatives),
    and the pixels (or, features cached, the image indices)."""

    tokenizer: Any
    max_caption_tokens: int

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        tokens = self.tokenizer([item["caption"] for item in batch], padding="longest", truncation=True,
                                max_length=self.max_caption_tokens + 2, return_tensors="pt")  # fmt: skip
        ids = [item["image_id"] for item in batch]
        out = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],
               "image_ids": torch.tensor(ids), "two_images": len(set(ids)) > 1}  # fmt: skip
        if "pixel_values" in batch[0]:
            out["pixel_values"] = torch.stack([item["pixel_values"] for item in batch])
        else:
            out["image_index"] = torch.tensor([item["image_index"] for item in batch])
        return out


def _block_mask(segment: torch.Tensor) -> torch.Tensor:
    """(rows, length, length), True where a packed row's token may attend: `segment` (rows, length) is 0 for the
    shared prefix, j for the j-th caption or question and -1 for padding; a token sees the prefix and its own
    segment's earlier tokens, the prefix sees itself causally, padding only itself."""
    length = segment.shape[1]
    query, key = segment[:, :, None], segment[:, None, :]
    causal = torch.ones((length, length), dtype=torch.bool).tril()
    allowed = causal & ((key == 0) | (key == query))
    return torch.where(query >= 0, allowed, torch.eye(length, dtype=torch.bool))


def _padded(rows: list[list[int]], value: int) -> torch.Tensor:
    """Rows of different lengths as one tensor, right-padded with value."""
    out = torch.full((len(rows), max(map(len, rows))), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row)
    return out


def answer_rows(question: Question, answers: str) -> list[tuple[str, float]]:
    """What one question trains on, as (answer, weight in the loss): `most-frequent`, its most frequent annotator
    answer (ties: the one given first) with weight 1; `weighted`, each distinct answer with its VQA soft score
    min(1, count / 3) (VQAv2's ten annotators: an answer three of them gave scores 1)."""
    counts = question.answer_counts()
    if answers == "most-frequent":
        return [(counts[0][0], 1.0)]
    return [(answer, min(1.0, count / 3)) for answer, count in counts]


def use_packing(config: Config, model: nn.Module) -> bool:
    """Whether batches hold whole images with their captions packed (train.pack_captions); says why not."""
    if not config.train.pack_captions or config.data.task == "retrieval":  # retrieval: no language model to pack
        return False
    lm = blip_of(model).language_model
    if config.data.task == "vqa" and lm.config.is_encoder_decoder:
        log.info("train.pack_captions: off for task vqa with an encoder-decoder language model: each question is "
                 "encoded with its image, so an image's questions share no work; a row per answer")  # fmt: skip
        return False
    implementation = lm.config._attn_implementation
    if lm.config.is_encoder_decoder or implementation in PACKING_ATTENTION:
        return True
    log.warning("train.pack_captions: %s attention takes no block mask; one row per caption instead", implementation)
    return False


def training_loader(
    items: Dataset,
    sampler: Sampler[int],
    collate: CaptionCollator | RetrievalCollator,
    config: Config,
    batch_size: int,
    pin_memory: bool,
) -> DataLoader:
    """The training DataLoader: `data.num_workers` persistent worker processes decoding images, each at most
    `data.prefetch_factor` batches ahead, their garbage collector kept off the inherited heap."""
    workers = config.data.num_workers
    return DataLoader(
        items,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        prefetch_factor=config.data.prefetch_factor if workers else None,
        persistent_workers=workers > 0,  # forked once, not at every epoch
        worker_init_fn=datasets.freeze_inherited_objects,
        generator=torch.Generator().manual_seed(config.train.seed),
        pin_memory=pin_memory,
    )


def load_training_data(config: Config, main: bool) -> CaptionSet:
    """Reads the dataset, decodes every image once, and refuses to go on over problems unless told to skip them."""
    with PartialState().main_process_first():  # the synthetic set is generated once, by rank 0
        captions = datasets.read(config.data.format, config.data.data_dir, read_options(config.data))
    captions = datasets.check_images(captions, progress=main)
    _refuse_problems(config, captions.problems, f"{len(captions.records)} usable images", captions.left_out(), main)
    for note in captions.notes:
        log.info("data: %s", note)
    if not captions.split("train"):
        raise CaptuneError(f"{config.data.data_dir}: the train split has no usable images")
    return captions


def load_vqa_training_data(config: Config, main: bool) -> VqaSet:
    """`load_training_data` for `task: vqa`: the questions read with `data.format`'s VQA reader, every image decoded
    once; train and val questions must have answers (a test split's need not)."""
    with PartialState().main_process_first():  # the synthetic set is generated once, by rank 0
        vs = read_vqa(config.data.format, config.data.data_dir, vqa_read_options(config.data))
    vs = check_vqa_images(vs, progress=main)
    images = len({p.image for p in vs.problems})
    _refuse_problems(config, vs.problems, f"{len(vs.questions)} usable questions", images, main)
    for note in vs.notes:
        log.info("data: %s", note)
    if not vs.split("train"):
        raise CaptuneError(f"{config.data.data_dir}: the train split has no usable questions")
    for split in ("train", "val"):
        unanswered = [q for q in vs.split(split) if not q.answers]
        if unanswered:
            first = unanswered[0]
            raise CaptuneError(f"{config.data.data_dir}: {len(unanswered)} {split} question(s) have no answers (the "
                               f"first: question_id {first.question_id!r}, image {first.image_id}); training and "
                               "validation need each question's annotator answers")  # fmt: skip
    return vs


def _refuse_problems(config: Config, problems: list[Problem], usable: str, left_out: int, main: bool) -> None:
    """Stops over the dataset's problems, unless `data.skip_bad_images` (then says what is left out)."""
    if not problems:
        return
    listing = "\n".join(f"  {p.image}: {p.problem}" for p in problems[:10])
    more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
    if not config.data.skip_bad_images:
        raise CaptuneError(
            f"{config.data.data_dir}: {len(problems)} problem(s) in the dataset:\n{listing}{more}\n"
            f"Fix them, or pass --skip-bad-images (data.skip_bad_images=true) to train on the {usable}; "
            "`captune data check` writes the full list."
        )
    if main:
        log.warning("skipping %d unusable image(s) (%d problem(s) in the data):\n%s%s", left_out, len(problems),
                    listing, more)  # fmt: skip
