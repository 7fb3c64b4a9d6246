"""Reading a run configuration: defaults, then a YAML file, then `key=value` arguments, then the checks.

A YAML file has one section per dataclass (`model`, `lora`, `data`, `train`, `generate`). An override names a field
as `section.field=value`, or just `field=value` when the name is unique across sections (`lr=3e-4`,
`data_dir=~/data/flickr8k`, `resume_from=runs/x/checkpoints/step-000100`). Two shorthands mirror how people talk:
`model=<hub id or dir>` sets `model.name` and `data=<format>` sets `data.format`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from captune.config import VQA_GENERATE, Config, validate
from captune.errors import CaptuneError
from captune.files import read_utf8
from captune.training_modes import QFORMER_LORA_DEFAULT, TRAINING_MODES, VIT_LORA_DEFAULT

SHORTHANDS = {"model": ("model", "name"), "data": ("data", "format"), "task": ("data", "task")}


def _sections(config: Config) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def _field_owner(config: Config, key: str, source: str) -> tuple[Any, str]:
    """Finds the dataclass holding `key` (`section.field` or a field name unique across sections)."""
    sections = _sections(config)
    if key in SHORTHANDS:
        section, name = SHORTHANDS[key]
        return sections[section], name
    if "." in key:
        section, name = key.split(".", 1)
        if section in sections and name in {f.name for f in dataclasses.fields(sections[section])}:
            return sections[section], name
    else:
        owners = [s for s in sections.values() if key in {f.name for f in dataclasses.fields(s)}]
        if len(owners) == 1:
            return owners[0], key
        if owners:
            names = " or ".join(f"{s}.{key}" for s, obj in sections.items() if obj in owners)
            raise CaptuneError(f"{source}: {key!r} is in several sections; write {names}")
    known = [f"{s}.{f.name}" for s, obj in sections.items() for f in dataclasses.fields(obj)]
    hint = difflib.get_close_matches(key, known + [k.split(".")[1] for k in known], n=3)
    raise CaptuneError(
        f"{source}: unknown config key {key!r}."
        + (f" Did you mean {', '.join(hint)}?" if hint else "")
        + " Run `captune train --help-config` for every key."
    )


def _convert(value: Any, annotation: Any, where: str) -> Any:
    """Converts a YAML value or a command-line string to a field's declared type."""
    hint = typing.get_type_hints(type("_", (), {"__annotations__": {"x": annotation}}))["x"]
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _convert(value, next(a for a in args if a is not type(None)), where)
    origin = typing.get_origin(hint)
    if value is None or (isinstance(value, bool) and hint is not bool):
        raise CaptuneError(f"{where}: {value!r} is not a valid {getattr(hint, '__name__', hint)}")
    try:
        if origin is dict:  # a YAML mapping; on the command line written as YAML (`lora.options="{tinit: 10}"`)
            value = (yaml.safe_load(value) or {}) if isinstance(value, str) else value
            if not isinstance(value, dict):
                raise ValueError(value)
            return {str(k): v for k, v in value.items()}
        if origin is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            return [_convert(v, args[0], where) for v in value]
        if hint is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError(value)
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return hint(value)
    except (TypeError, ValueError, yaml.YAMLError):
        name = getattr(hint, "__name__", str(hint))
        raise CaptuneError(f"{where}: {value!r} is not a valid {name}") from None


def _set(config: Config, key: str, value: Any, source: str) -> str:
    """Sets one key; returns it as `section.field`."""
    owner, name = _field_owner(config, key, source)
    annotation = next(f.type for f in dataclasses.fields(owner) if f.name == name)
    setattr(owner, name, _convert(value, annotation, f"{source}: {key}"))
    return next(f"{section}.{name}" for section, obj in _sections(config).items() if obj is owner)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Builds a Config from defaults, then a YAML file, then `key=value` overrides.

    Args:
        path: YAML file with sections `model`, `lora`, `data`, `train`, `generate` (a section may also be a plain
            string for the shorthands `model: <name>` and `data: <format>`).
        overrides: `key=value` strings from the command line.

    Raises:
        CaptuneError: missing file, invalid YAML, unknown key or a value of the wrong type; the message names it.
    """
    config = Config()
    given: set[str] = set()  # the keys the file and the overrides set, for the defaults that depend on another key
    if path is not None:
        path = Path(path).expanduser()
        if path.is_dir():
            raise CaptuneError(f"--config {path} is a folder; give a YAML file in it (the shipped configs are in "
                               "configs/)")  # fmt: skip
        if not path.is_file():
            raise CaptuneError(f"config file {path} does not exist; the shipped configs are in configs/")
        try:
            loaded = yaml.safe_load(read_utf8(path)) or {}
        except yaml.YAMLError as err:
            raise CaptuneError(f"{path}: invalid YAML: {' '.join(str(err).split())}") from None
        if not isinstance(loaded, dict):
            raise CaptuneError(f"{path}: expected a mapping of sections at the top level")
        sections = _sections(config)
        for section, values in loaded.items():
            if values is None and section in sections:
                continue  # a section whose keys are all commented out
            if isinstance(values, dict):
                for key, value in values.items():
                    given.add(_set(config, f"{section}.{key}", value, str(path)))
            elif section in sections and section not in SHORTHANDS:
                keys = ", ".join(f.name for f in dataclasses.fields(sections[section])[:3])
                raise CaptuneError(f"{path}: section {section!r} is {values!r}; it must hold keys, e.g. "
                                   f"`{section}:` then indented `key: value` lines ({keys}, ...)")  # fmt: skip
            else:
                given.add(_set(config, str(section), values, str(path)))
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CaptuneError(f"override {item!r} is not of the form key=value (e.g. lr=3e-4)")
        given.add(_set(config, key.strip(), value.strip(), "command line"))
    _fill_defaults(config, given)
    validate(config)
    return config


def config_from_dict(values: dict[str, Any], source: str) -> Config:
    """A Config from `to_dict` output (e.g. the copy saved in a model directory's captune.json)."""
    config = Config()
    given: set[str] = set()
    for section, fields in values.items():
        for key, value in fields.items():
            given.add(_set(config, f"{section}.{key}", value, source))
    _fill_defaults(config, given)
    validate(config)
    return config


def _fill_defaults(config: Config, given: set[str]) -> None:
    """Defaults that depend on another key: a mode with Q-Former LoRA and no Q-Former targets gets query and value,
    one with ViT LoRA and no ViT targets `VIT_LORA_DEFAULT`; a `task: vqa` run gets answer lengths (`VQA_GENERATE`)
    for the `generate` keys not `given` (set by the file or the overrides)."""
    mode = TRAINING_MODES.get(config.train.mode)
    if mode is not None and mode.lora_on_qformer and not config.lora.qformer_target_modules:
        config.lora.qformer_target_modules = list(QFORMER_LORA_DEFAULT)
    if mode is not None and mode.lora_on_vit and not config.lora.vit_target_modules:
        config.lora.vit_target_modules = list(VIT_LORA_DEFAULT)
    if config.data.task == "vqa":
        for name, value in VQA_GENERATE.items():
            if f"generate.{name}" not in given:
                setattr(config.generate, name, value)
