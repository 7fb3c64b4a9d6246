"""Run configuration: defaults, YAML sections and shorthands, key=value overrides, errors that name the key, the
shipped configs, save/load round trip and `describe`."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from captune.config import Config, describe, load_config, save_config, validate
from captune.errors import CaptuneError

REPO = Path(__file__).parents[1]
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


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
