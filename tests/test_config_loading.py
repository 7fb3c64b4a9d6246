"""Reading a run configuration: defaults, YAML sections and shorthands, key=value overrides, errors that name the
key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from captune.config import Config
from captune.config_loading import load_config
from captune.errors import CaptuneError


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


# --- defaults and YAML -----------------------------------------------------------------------------------------


def test_no_file_and_no_overrides_gives_the_dataclass_defaults() -> None:
    assert load_config() == Config()


def test_yaml_sections_set_their_fields_and_leave_the_rest_at_default(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "train:\n  lr: 3.0e-4\n  epochs: 2\nlora:\n  target_modules: [q_proj, k_proj]\n")
    config = load_config(path)
    assert (config.train.lr, config.train.epochs, config.lora.target_modules) == (3e-4, 2, ["q_proj", "k_proj"])
    assert config.train.batch_size == Config().train.batch_size


def test_yaml_float_without_a_dot_is_read_as_a_float(tmp_path: Path) -> None:
    # PyYAML reads `1e-3` (no dot) as a string; the field's type still makes it a float.
    assert load_config(_yaml(tmp_path, "train:\n  lr: 1e-3\n")).train.lr == 1e-3


def test_yaml_model_shorthand_sets_model_name(tmp_path: Path) -> None:
    assert load_config(_yaml(tmp_path, "model: Salesforce/blip2-opt-2.7b\n")).model.name == "Salesforce/blip2-opt-2.7b"


def test_yaml_data_shorthand_sets_data_format(tmp_path: Path) -> None:
    assert load_config(_yaml(tmp_path, "data: karpathy\n")).data.format == "karpathy"


def test_yaml_task_at_the_top_level_sets_the_data_task(tmp_path: Path) -> None:
    config = load_config(_yaml(tmp_path, "task: vqa\ndata:\n  format: vqav2\n"))
    assert (config.data.task, config.data.format) == ("vqa", "vqav2")
    assert load_config(None, ["task=vqa"]).data.task == "vqa"


@pytest.mark.parametrize(
    ("override", "message"),
    [("task=retrieve", "data.task is 'retrieve'; use one of caption, vqa"),
     ("question_template=Q: A:", "it must hold the question's place, {}, once")],
)  # fmt: skip
def test_a_task_or_template_no_run_can_use_is_refused(override: str, message: str) -> None:
    from captune.config import validate

    with pytest.raises(CaptuneError, match=re.escape(message)):
        validate(load_config(None, [override]))


def test_empty_yaml_file_gives_the_defaults(tmp_path: Path) -> None:
    assert load_config(_yaml(tmp_path, "# nothing yet\n")) == Config()


def test_yaml_section_with_every_key_commented_out_is_empty(tmp_path: Path) -> None:
    assert load_config(_yaml(tmp_path, "model:\n  # name: Salesforce/blip2-opt-2.7b\ntrain:\n")) == Config()


# --- key=value overrides ---------------------------------------------------------------------------------------


def test_dotted_override_sets_the_field() -> None:
    assert load_config(None, ["generate.batch_size=3"]).generate.batch_size == 3


def test_bare_override_of_a_unique_name_finds_its_section() -> None:
    config = load_config(None, ["lr=3e-4", "data_dir=~/data/flickr8k"])
    assert (config.train.lr, config.data.data_dir) == (3e-4, "~/data/flickr8k")


def test_model_and_data_shorthand_overrides() -> None:
    config = load_config(None, ["model=Salesforce/blip2-opt-2.7b", "data=flickr8k"])
    assert (config.model.name, config.data.format) == ("Salesforce/blip2-opt-2.7b", "flickr8k")


def test_overrides_win_over_the_yaml_file(tmp_path: Path) -> None:
    assert load_config(_yaml(tmp_path, "train:\n  epochs: 2\n"), ["epochs=7"]).train.epochs == 7


def test_list_override_splits_on_commas_and_drops_blanks() -> None:
    assert load_config(None, ["target_modules=q_proj, k_proj,,v_proj,"]).lora.target_modules == [
        "q_proj",
        "k_proj",
        "v_proj",
    ]


@pytest.mark.parametrize("text", ["None", "none", "null", ""])
def test_optional_override_reads_none(text: str) -> None:
    config = load_config(None, ["max_steps=5", f"max_steps={text}"])
    assert config.train.max_steps is None


@pytest.mark.parametrize(
    ("text", "expected"), [("true", True), ("1", True), ("yes", True), ("False", False), ("0", False), ("no", False)]
)
def test_bool_override(text: str, expected: bool) -> None:
    assert load_config(None, [f"skip_bad_images={text}"]).data.skip_bad_images is expected


def test_int_and_float_overrides_get_their_types() -> None:
    config = load_config(None, ["warmup_steps=50", "dropout=0.25", "alpha=16"])
    assert (config.train.warmup_steps, config.lora.dropout, config.lora.alpha) == (50, 0.25, 16)
    assert isinstance(config.train.warmup_steps, int)
    assert isinstance(config.lora.dropout, float)


def test_override_value_keeps_later_equals_signs() -> None:
    assert load_config(None, ["prompt=a = b"]).data.prompt == "a = b"


# --- errors that name the key or value -------------------------------------------------------------------------


def test_unknown_key_names_it_and_suggests_the_close_one() -> None:
    with pytest.raises(CaptuneError, match=r"unknown config key 'train\.lrr'.*Did you mean train\.lr"):
        load_config(None, ["train.lrr=1"])


def test_unknown_key_in_yaml_names_the_file(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "train:\n  epoch: 2\n")
    with pytest.raises(
        CaptuneError, match=rf"{re.escape(str(path))}: unknown config key 'train\.epoch'.*train\.epochs"
    ):
        load_config(path)


def test_ambiguous_bare_key_names_both_sections() -> None:
    with pytest.raises(CaptuneError, match=r"'batch_size'.*write train\.batch_size or generate\.batch_size"):
        load_config(None, ["batch_size=4"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lr=fast", r"lr: 'fast' is not a valid float"),
        ("epochs=2.5", r"epochs: '2\.5' is not a valid int"),
        ("validate=maybe", r"validate: 'maybe' is not a valid bool"),
    ],
)
def test_wrong_type_names_key_and_value(override: str, message: str) -> None:
    with pytest.raises(CaptuneError, match=message):
        load_config(None, [override])


def test_wrong_type_in_yaml_names_file_and_key(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "train:\n  epochs: 2.5\n")
    with pytest.raises(CaptuneError, match=rf"{re.escape(str(path))}: train\.epochs: 2\.5 is not a valid int"):
        load_config(path)


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(CaptuneError, match=rf"config file {re.escape(str(tmp_path / 'absent.yaml'))} does not exist"):
        load_config(tmp_path / "absent.yaml")


def test_invalid_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "train:\n  lr: [1\n")
    with pytest.raises(CaptuneError, match=rf"{re.escape(str(path))}: invalid YAML(?s:.*)line 2, column 7"):
        load_config(path)


def test_yaml_top_level_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "- train\n- lora\n")
    with pytest.raises(CaptuneError, match=rf"{re.escape(str(path))}: expected a mapping of sections"):
        load_config(path)


@pytest.mark.parametrize("item", ["lr", "=3e-4"])
def test_override_without_key_and_equals_sign_is_refused(item: str) -> None:
    with pytest.raises(CaptuneError, match=rf"override '{item}' is not of the form key=value"):
        load_config(None, [item])
