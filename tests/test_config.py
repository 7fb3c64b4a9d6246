"""Run configuration: the checks that name the field, the shipped configs, save/load round trip and `describe`."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from captune.config import Config, describe, save_config, validate
from captune.config_loading import load_config
from captune.errors import CaptuneError

REPO = Path(__file__).parents[1]
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


# --- validate --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("train.batch_size=0", "train.batch_size"),
        ("grad_accum=0", "train.grad_accum"),
        ("lr=0", "train.lr"),
        ("epochs=0", "train.epochs"),
        ("max_steps=0", "train.max_steps"),
        ("r=0", "lora.r"),
        ("dropout=1.0", "lora.dropout"),
        ("target_modules=", "no target modules"),
        ("num_beams=0", "generate.num_beams"),
        ("min_new_tokens=31", "min_new_tokens <= max_new_tokens"),
        ("dtype=fp8", "model.dtype"),
        ("lr=inf", "train.lr"),
        ("lr=nan", "train.lr"),
        ("lr=-1e-4", "train.lr"),
        ("lr=2", "train.lr"),
        ("weight_decay=-0.1", "train.weight_decay"),
        ("weight_decay=nan", "train.weight_decay"),
        ("max_grad_norm=-1", "train.max_grad_norm"),
        ("max_grad_norm=inf", "train.max_grad_norm"),
        ("alpha=0", "lora.alpha"),
        ("r=-3", "lora.r"),
        ("dropout=nan", "lora.dropout"),
        ("dropout=-0.1", "lora.dropout"),
        ("repetition_penalty=0", "generate.repetition_penalty"),
        ("repetition_penalty=-1", "generate.repetition_penalty"),
        ("repetition_penalty=inf", "generate.repetition_penalty"),
        ("val_fraction=1.5", "data.val_fraction"),
        ("test_fraction=nan", "data.test_fraction"),
        ("val_fraction=0.9", "data.val_fraction"),
        ("restval=maybe", "data.restval"),
        ("feature_batch_size=0", "train.feature_batch_size"),
    ],
)
def test_validate_rejects_and_names_the_field(override: str, field: str) -> None:
    with pytest.raises(CaptuneError, match=rf"invalid config: .*{field}"):
        load_config(None, [override])


def test_epochs_zero_is_allowed_with_max_steps() -> None:
    assert load_config(None, ["epochs=0", "max_steps=10"]).train.max_steps == 10


def test_lora_on_the_qformer_only_is_valid() -> None:
    config = load_config(None, ["target_modules=", "qformer_target_modules=query,value", "mode=lora-lm+qformer"])
    assert (config.lora.target_modules, config.lora.qformer_target_modules) == ([], ["query", "value"])


@pytest.mark.parametrize("override", ["generate.batch_size=0", "log_every=0"])
def test_validate_rejects_zero_batch_size_and_log_interval(override: str) -> None:
    with pytest.raises(CaptuneError, match="invalid config"):
        load_config(None, [override])


# --- shipped configs -------------------------------------------------------------------------------------------


def test_configs_are_shipped() -> None:
    assert {p.name for p in SHIPPED} >= {"demo.yaml", "blip2-opt-2.7b-flickr8k.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_loads(path: Path) -> None:
    validate(load_config(path))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_opens_with_the_command_that_runs_it(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    assert re.match(rf"# captune (train --config configs/{re.escape(path.name)}|demo)( |$)", first), first


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_packaged_copy_equals_the_shipped_config(path: Path) -> None:
    # `captune demo` reads the copy inside the package; the two must not drift apart.
    assert (REPO / "src" / "captune" / "configs" / path.name).read_text() == path.read_text()


# --- save and describe -----------------------------------------------------------------------------------------


def test_save_then_load_round_trips(tmp_path: Path) -> None:
    config = load_config(
        None,
        ["model=Salesforce/blip2-opt-2.7b", "lr=3e-4", "max_steps=12", "images_dir=Images",
         "qformer_target_modules=query,value", "mode=lora-lm+qformer", "prompt=a photo of", "skip_bad_images=true",
         "validate=false"],
    )  # fmt: skip
    path = tmp_path / "config.yaml"
    save_config(config, path)
    assert load_config(path) == config


def test_saved_config_opens_with_the_command_that_reproduces_the_run(tmp_path: Path) -> None:
    save_config(Config(), tmp_path / "config.yaml")
    assert (tmp_path / "config.yaml").read_text().splitlines()[0] == "# captune train --config config.yaml"


def _described() -> dict[str, str]:
    """`describe()` parsed back: `section.field` -> its docstring line."""
    docs: dict[str, str] = {}
    section = key = ""
    for line in describe().splitlines():
        if not line.startswith(" "):
            section = line.rstrip(":")
        elif line.startswith("      "):
            docs[key] = line.strip()
        else:
            key = f"{section}.{line.split(' = ')[0].strip()}"
    return docs


def test_describe_lists_every_field_with_its_docstring() -> None:
    expected = {
        f"{s.name}.{f.name}" for s in dataclasses.fields(Config) for f in dataclasses.fields(getattr(Config(), s.name))
    }
    docs = _described()
    assert set(docs) == expected
    assert [key for key, doc in docs.items() if not doc] == []


def test_describe_shows_defaults() -> None:
    assert "\n  lr = 0.0001\n" in describe()


def test_every_config_key_is_in_the_configuration_docs() -> None:
    doc = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    keys = [f"{section.name}.{field.name}" for section in dataclasses.fields(Config)
            for field in dataclasses.fields(section.default_factory())]  # type: ignore[misc]  # fmt: skip
    missing = [key for key in keys if f"| `{key}` |" not in doc]
    assert not missing, f"docs/configuration.md lacks {missing}"
