"""Fixtures of the training tests (the tiny model, the synthetic set and image files come from tests/conftest.py)."""

import pytest
import torch

from captune.config_loading import load_config
from captune.model import LoadedModel, apply_lora


@pytest.fixture
def lora(tiny: LoadedModel) -> LoadedModel:
    """The tiny model with the default LoRA, its LoRA B matrices made non-zero so that LoRA changes the loss."""
    tiny.model = apply_lora(tiny.model, load_config(None, []).lora)
    torch.manual_seed(0)
    for name, parameter in tiny.model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.05)
    return tiny
