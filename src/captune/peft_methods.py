"""The PEFT methods a LoRA `train.mode` can train with (`lora.method`): one `PeftMethod` per method, the PEFT config
class it builds, the `lora.*` keys it reads, and what captune does around PEFT for it (AdaLoRA's rank budget, PiSSA's
and OLoRA's changed base weights).

Every method is PEFT's own (`peft.LoraConfig`, `AdaLoraConfig`, `IA3Config`, `LoHaConfig`, `LoKrConfig`); captune
only maps its keys onto them and refuses, naming the key and value, what a method cannot do.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from captune.errors import CaptuneError

if TYPE_CHECKING:
    from peft import PeftConfig

    from captune.config import LoraConfig


@dataclass(frozen=True)
class PeftMethod:
    """What one `lora.method` is and which `lora.*` keys it reads."""

    config_class: str
    """The PEFT config class (`peft.<name>`)."""
    uses: tuple[str, ...]
    """The `lora.*` keys beyond the targets that mean something to it; the others must keep their defaults."""
    markers: tuple[str, ...]
    """Substrings of its adapter parameters' names (for counting them: the model card, the benchmark)."""
    card: str
    """What the model card says the adapter is."""


METHODS = {
    "lora": PeftMethod(
        "LoraConfig",
        ("r", "alpha", "dropout", "use_dora", "use_rslora", "init_lora_weights"),
        ("lora_",),
        "LoRA: a low-rank update B A (rank `r`, scale alpha / r) beside each target layer",
    ),
    "adalora": PeftMethod(
        "AdaLoraConfig",
        ("r", "alpha", "dropout", "init_lora_weights"),
        ("lora_",),
        "AdaLoRA: an SVD-shaped update P diag(E) Q per target layer whose ranks are pruned from `init_r` towards an "
        "average of `r` over the run (PEFT's importance scores, updated every optimizer step)",
    ),
    "ia3": PeftMethod(
        "IA3Config",
        (),
        ("ia3_",),
        "IA³: one learned vector per target layer that scales its output (its input for feed-forward layers)",
    ),
    "loha": PeftMethod(
        "LoHaConfig",
        ("r", "alpha"),
        ("hada_",),
        "LoHa: a low-rank Hadamard-product update (two rank-`r` products multiplied elementwise) per target layer",
    ),
    "lokr": PeftMethod(
        "LoKrConfig",
        ("r", "alpha"),
        ("lokr_",),
        "LoKr: a Kronecker-product update (one factor low-rank, rank `r`) per target layer",
    ),
}
"""Every `lora.method`, by name."""

INIT_VALUES = ("true", "false", "gaussian", "orthogonal", "pissa", "pissa_niter_N", "olora")
"""The `lora.init_lora_weights` captune takes (PEFT's names; `pissa_niter_N` is PiSSA with N fast-SVD iterations)."""
MUTATING_INITS = ("pissa", "olora")
"""Initialisations that move the adapter's starting product out of the base weights (W = W_res + B0 A0): a saved
adapter is converted to a plain LoRA of twice the rank that applies to the unchanged base (PEFT's
`path_initial_model_for_weight_conversion`)."""
SET_BY_CAPTUNE = {
    "r": "lora.r",
    "target_r": "lora.r (AdaLoRA's average rank at the end)",
    "lora_alpha": "lora.alpha",
    "alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "target_modules": "lora.target_modules, lora.qformer_target_modules or lora.vit_target_modules",
    "feedforward_modules": "nothing: captune takes IA³'s feed-forward layers from the targets (fc1, fc2; T5's wi, wo)",
    "modules_to_save": "lora.modules_to_save",
    "use_dora": "lora.use_dora",
    "use_rslora": "lora.use_rslora",
    "init_lora_weights": "lora.init_lora_weights",
    "total_step": "nothing: captune sets it to the run's optimizer steps",
    "task_type": "nothing",
    "peft_type": "lora.method",
    "inference_mode": "nothing",
    "base_model_name_or_path": "nothing",
    "revision": "nothing",
    "auto_mapping": "nothing",
    "peft_version": "nothing",
}
"""PEFT config fields `lora.options` may not set, with the key that sets them."""
UNSUPPORTED = {
    "loftq_config": "LoftQ needs its own quantised loading; use model.quantization=4bit with plain LoRA",
    "eva_config": "EVA initialises from activations on data (init_lora_weights=eva), which captune does not run",
    "corda_config": "CorDA initialises from activations on data, which captune does not run",
    "lora_ga_config": "LoRA-GA initialises from gradients on data, which captune does not run",
    "megatron_config": "captune trains with accelerate, not Megatron",
    "layer_replication": "it changes the base model's layers, which captune's saved model directories do not record",
}
"""PEFT config fields captune refuses, and why."""
FEEDFORWARD = ("fc1", "fc2", "wi", "wo", "wi_0", "wi_1")
"""Feed-forward layer names (OPT and the ViT: fc1, fc2; T5: wi, wo, gated wi_0, wi_1): IA³ scales their input, the
others' output (PEFT's `feedforward_modules`)."""


def check_lora(lora: LoraConfig, quantization: str = "none") -> list[tuple[bool, str]]:
    """The method-related checks of the `lora` section (config.validate reads them), without building anything."""
    from captune.config import LoraConfig as Defaults  # (a cycle at import time otherwise)

    method = METHODS.get(lora.method)
    if method is None:
        return [(False, f"lora.method={lora.method!r}: use one of {', '.join(METHODS)}")]
    defaults = Defaults()
    unused = [key for key in ("r", "alpha", "dropout", "use_dora", "use_rslora", "init_lora_weights")
              if key not in method.uses and getattr(lora, key) != getattr(defaults, key)]  # fmt: skip
    init = lora.init_lora_weights.lower()
    known_init = init in INIT_VALUES or re.fullmatch(r"pissa_niter_\d+", init) is not None
    return [
        (
            not unused,
            f"lora.{unused[0]}={getattr(lora, unused[0])!r} means nothing with lora.method={lora.method} "
            f"({_what_instead(lora.method, unused[0])}); remove it"
            if unused
            else "",
        ),
        (
            known_init,
            f"lora.init_lora_weights={lora.init_lora_weights!r}: use one of {', '.join(INIT_VALUES)} (EVA, CorDA and "
            "LoftQ need data or quantised loading that captune does not run)",
        ),
        (
            lora.method != "adalora" or init in ("true", "false"),
            f"lora.init_lora_weights={lora.init_lora_weights} with lora.method=adalora: AdaLoRA takes true or false "
            "only (PEFT's AdaLoRA has no other initialisation)",
        ),
        (
            not (lora.use_dora and is_mutating_init(lora)),
            f"lora.use_dora=true with lora.init_lora_weights={lora.init_lora_weights}: a saved DoRA adapter cannot be "
            "converted back onto the unchanged base; use init_lora_weights=true (or gaussian) with DoRA",
        ),
        (
            quantization == "none" or lora.method in ("lora", "adalora", "ia3"),
            f"lora.method={lora.method} with model.quantization={quantization}: PEFT has no {lora.method} layers "
            "for bitsandbytes' quantised linear layers; use lora.method=lora, adalora or ia3, or "
            "model.quantization=none",
        ),
        (
            quantization == "none" or not is_mutating_init(lora),
            f"lora.init_lora_weights={lora.init_lora_weights} with model.quantization={quantization}: it changes the "
            "base weights, which are quantised; use init_lora_weights=true or model.quantization=none",
        ),
        *_check_options(lora),
    ]


def _what_instead(method: str, key: str) -> str:
    if method == "ia3":
        return "IA³ learns a scaling vector per layer: no rank, scale, dropout or initialisation to choose"
    if key == "dropout":
        return f"{method} has no input dropout; set rank_dropout or module_dropout in lora.options"
    return f"it is a LoRA option; {method} does not have it"


def _check_options(lora: LoraConfig) -> list[tuple[bool, str]]:
    """`lora.options` names fields of the method's PEFT config class that captune does not set itself."""
    import peft

    cls = getattr(peft, METHODS[lora.method].config_class)
    fields = {f.name for f in dataclasses.fields(cls)}
    checks = []
    for key, value in lora.options.items():
        where = f"lora.options.{key}={value!r}"
        if key in SET_BY_CAPTUNE:
            checks.append((False, f"{where}: set by {SET_BY_CAPTUNE[key]}, not lora.options; remove it"))
        elif key in UNSUPPORTED:
            checks.append((False, f"{where}: not supported ({UNSUPPORTED[key]}); remove it"))
        elif key not in fields:
            known = sorted(fields - set(SET_BY_CAPTUNE) - set(UNSUPPORTED))
            checks.append((False, f"{where}: {cls.__name__} (lora.method={lora.method}) has no such field; it has "
                                  f"{', '.join(known)}"))  # fmt: skip
    if not checks:  # the values, as PEFT's own checks see them (the targets do not matter to those)
        try:
            peft_config(lora, "^$", "^$")
        except CaptuneError as err:
            checks.append((False, str(err)))
    return checks


def is_mutating_init(lora: LoraConfig) -> bool:
    """Whether the initialisation changes the base weights (PiSSA, OLoRA): see `MUTATING_INITS`."""
    return lora.method == "lora" and lora.init_lora_weights.lower().startswith(MUTATING_INITS)


def _init_value(value: str) -> bool | str:
    lowered = value.lower()
    return {"true": True, "false": False}.get(lowered, lowered)


def peft_config(lora: LoraConfig, targets: str, feedforward: str, total_step: int | None = None) -> PeftConfig:
    """The PEFT config of `lora.method` for target modules (a regex over module names; `feedforward` the regex of
    those among them that are feed-forward layers, for IA³).

    Args:
        total_step: AdaLoRA's optimizer steps (its rank budget schedule); None: a placeholder that `set_total_step`
            replaces once the run knows its steps.

    Raises:
        CaptuneError: PEFT refuses the values, naming them.
    """
    import peft

    common: dict[str, Any] = {"target_modules": targets, "modules_to_save": lora.modules_to_save or None}
    init = _init_value(lora.init_lora_weights)
    if lora.method == "lora":
        values = {"r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "bias": "none",
                  "use_dora": lora.use_dora, "use_rslora": lora.use_rslora, "init_lora_weights": init}  # fmt: skip
    elif lora.method == "adalora":
        # PEFT's default budget starts at 1.5 x the target rank (init_r 12, target_r 8).
        values = {"target_r": lora.r, "init_r": math.ceil(1.5 * lora.r), "lora_alpha": lora.alpha,
                  "lora_dropout": lora.dropout, "init_lora_weights": init,
                  "total_step": total_step or 10**9}  # fmt: skip
    elif lora.method == "ia3":
        values = {"feedforward_modules": feedforward}
    else:  # loha, lokr
        values = {"r": lora.r, "alpha": lora.alpha}
    cls = getattr(peft, METHODS[lora.method].config_class)
    try:
        return cls(**common, **values, **lora.options)  # type: ignore[no-any-return]
    except (ValueError, TypeError) as err:
        options = f" and lora.options {lora.options}" if lora.options else ""
        raise CaptuneError(f"lora.method={lora.method}{options}: PEFT refuses them ({err}); change the option it "
                           "names") from None  # fmt: skip


def set_total_step(model: Any, total_step: int) -> None:
    """Gives an AdaLoRA model its run's optimizer steps, which its rank budget schedule counts down (checked as PEFT
    checks them: a budgeting phase must remain between `tinit` and `total_step - tfinal`)."""
    config = model.peft_config["default"]
    try:
        dataclasses.replace(config, total_step=total_step)
    except ValueError as err:
        raise CaptuneError(
            f"lora.method=adalora over {total_step} optimizer steps: {err} (tinit {config.tinit}, "
            f"tfinal {config.tfinal}); lower tinit/tfinal in lora.options or train longer"
        ) from None
    config.total_step = total_step  # the rank allocator holds this config object


def is_adalora(model: Any) -> bool:
    """Whether the model is a PeftModel trained with AdaLoRA (its training step must call `update_and_allocate`)."""
    config = getattr(model, "peft_config", {}).get("default")
    return config is not None and str(getattr(config.peft_type, "value", "")) == "ADALORA"


def adalora_state(model: Any) -> dict[str, Any]:
    """What AdaLoRA's rank allocator has learned so far (its importance scores' averages) and the ranks it fixed:
    a checkpoint keeps it so a resumed run allocates as the uninterrupted one."""
    allocator = model.base_model.rankallocator
    return {"ipt": allocator.ipt, "exp_avg_ipt": allocator.exp_avg_ipt, "exp_avg_unc": allocator.exp_avg_unc,
            "rank_pattern": model.peft_config["default"].rank_pattern}  # fmt: skip


def load_adalora_state(model: Any, state: dict[str, Any]) -> None:
    """Puts `adalora_state`'s values back."""
    allocator = model.base_model.rankallocator
    allocator.ipt, allocator.exp_avg_ipt = state["ipt"], state["exp_avg_ipt"]
    allocator.exp_avg_unc = state["exp_avg_unc"]
    model.peft_config["default"].rank_pattern = state["rank_pattern"]


def adalora_orthogonal_penalty(model: Any) -> Any:
    """AdaLoRA's orthogonality regulariser, `orth_reg_weight` x the mean of ||P P^T - I||_F and ||Q^T Q - I||_F over
    its layers: PEFT adds it to the loss in `AdaLoraModel.forward` of a model that computes its own loss; captune's
    `CaptionLoss` calls the language model's parts directly, so the recipe adds it (the same terms as PEFT's)."""
    import torch

    weight = model.peft_config["default"].orth_reg_weight
    terms = []
    for name, p in model.base_model.model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and "default" in name:
            cov = p @ p.T if "lora_A" in name else p.T @ p
            terms.append(torch.norm(cov - torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device), p="fro"))
    return weight * torch.stack(terms).mean() if terms else 0.0
