"""The optimizers a run can train with (--optimizer): each name made into a torch optimizer over the trainer's
parameter groups, a help line for each, and the bytes of state each keeps (for the memory estimate).

Every optimizer here keeps its whole state in `state_dict()` as tensors and plain numbers, so accelerate's
`save_state` / `load_state` (torch.load with weights_only=True) resume a run bit for bit; tests prove it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from dreambooth.config import OPTIMIZER_NAMES, TrainConfig
from dreambooth.errors import UserError

HELP = {
    "adamw": "torch AdamW, fused on CUDA and CPU: 8 bytes of state per trained weight.",
    "adamw8bit": "bitsandbytes' 8-bit AdamW: about 2 bytes of state per weight instead of 8 (tensors under 4096 "
                 "weights keep 8); CUDA or CPU (the CPU step is slower); pip install \"dreambooth[gpu]\".",
    "adafactor": "transformers' Adafactor at the given learning rate: a factored second moment (one value per row "
                 "and per column of each matrix's last two dimensions; 3x3 convolutions save less) and no first "
                 "moment unless beta1 is given; its second moment decays as 1 - step^-0.8, so it takes no beta2 "
                 "or epsilon.",
    "prodigy": "Prodigy (prodigyopt) finds its own step size: the learning rate is a multiplier on it, usually 1.0, "
               "and must be the same for every trained part; 16 bytes of state per weight; "
               "pip install \"dreambooth[optimizers]\".",
    "lion": "Lion (lion-pytorch) steps by the sign of its momentum: 4 bytes of state per weight; use a learning "
            "rate 3-10x smaller and a weight decay 3-10x larger than AdamW's; no epsilon; "
            "pip install \"dreambooth[optimizers]\".",
}

# (beta1, beta2, epsilon) each optimizer uses when the user gives none; None: it has no such setting.
# Adam's defaults would be wrong for two of them: Lion's paper uses beta2 0.99, and Adafactor's point is to
# keep no first moment (beta1) at all.
DEFAULTS: dict[str, tuple[float | None, float | None, float | None]] = {
    "adamw": (0.9, 0.999, 1e-8),
    "adamw8bit": (0.9, 0.999, 1e-8),
    "adafactor": (None, None, None),
    "prodigy": (0.9, 0.999, 1e-8),
    "lion": (0.9, 0.99, None),
}

FUSED_ADAMW_DEVICES = ("cuda", "cpu")  # torch's fused AdamW kernels (mps has one too, not verified here)
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps fp32 state for smaller tensors (its min_8bit_size default)
BNB_BLOCK = 256  # bitsandbytes quantizes the state in blocks of 256 with one fp32 absmax each


@dataclass(frozen=True)
class OptimizerSettings:
    """--optimizer and its hyperparameters. A beta or epsilon left at None means the optimizer's own default
    (DEFAULTS), so `OptimizerSettings("adamw")` is AdamW(0.9, 0.999, 1e-8) and Lion still gets its 0.99."""

    name: str
    beta1: float | None = None
    beta2: float | None = None
    epsilon: float | None = None
    weight_decay: float = 1e-2


def optimizer_settings(config: TrainConfig) -> OptimizerSettings:
    """The optimizer a training run asked for."""
    return OptimizerSettings(config.optimizer, config.adam_beta1, config.adam_beta2, config.adam_epsilon,
                             config.adam_weight_decay)


def resolved(settings: OptimizerSettings) -> tuple[Any, Any, Any]:
    """(beta1, beta2, epsilon) the optimizer will use: the given values, else its defaults. A value given to an
    optimizer without that setting is refused rather than dropped silently (Adafactor's beta1 switches on its
    first moment, so it is accepted though its default is None)."""
    if settings.name not in OPTIMIZER_NAMES:
        raise UserError(f"--optimizer {settings.name}: choose one of {', '.join(OPTIMIZER_NAMES)}")
    given = (settings.beta1, settings.beta2, settings.epsilon)
    values = []
    for index, (label, value, default) in enumerate(zip(("beta1", "beta2", "epsilon"), given,
                                                        DEFAULTS[settings.name])):
        takes_it = default is not None or (settings.name, index) == ("adafactor", 0)
        if value is not None and not takes_it:
            raise UserError(f"--optimizer {settings.name} has no {label} (see its help); leave it unset")
        values.append(default if value is None else value)
    return values[0], values[1], values[2]


def make_optimizer(groups: list[dict[str, Any]], settings: OptimizerSettings,
                   device: torch.device) -> torch.optim.Optimizer:
    """The optimizer `settings` names over `groups` (dicts with "params", "lr" and maybe "weight_decay"),
    for a run on `device`. A group's own "weight_decay" wins over settings.weight_decay: torch's optimizers
    fill in a default only where a group has no value of its own."""
    beta1, beta2, epsilon = resolved(settings)
    optimizer_class = optimizer_class_for(settings.name, device)
    name, decay = settings.name, settings.weight_decay
    # Copies: torch writes every default into the group dicts it is handed; the caller's stay as they were.
    groups = [dict(group, params=_tensors(group["params"])) for group in groups]
    if not groups or any("lr" not in group for group in groups):
        raise ValueError("make_optimizer: every parameter group needs its own 'lr'")
    lr = groups[0]["lr"]  # each group carries its own rate; the constructors still want a default
    if name == "adamw":
        # Fused: one kernel for every tensor instead of several per tensor. Measured on 2 CPU cores over 5.7 M
        # weights: 3.8 ms a step against 13.2 (single-tensor, torch's CPU default) and 14.0 (foreach); on CUDA it
        # is the fastest AdamW too. Its rounding differs from the other paths in the last bits, which is fine:
        # every run (and every resume) takes the same path.
        fused = device.type in FUSED_ADAMW_DEVICES and all(p.is_floating_point() for g in groups for p in g["params"])
        return optimizer_class(groups, lr=lr, betas=(beta1, beta2), eps=epsilon, weight_decay=decay,
                               fused=True if fused else None)
    if name == "adamw8bit":
        return optimizer_class(groups, lr=lr, betas=(beta1, beta2), eps=epsilon, weight_decay=decay)
    if name == "adafactor":
        # The trainer's learning rate and schedule, not Adafactor's own relative step and parameter scaling.
        return optimizer_class(groups, lr=lr, beta1=beta1, weight_decay=decay, scale_parameter=False,
                               relative_step=False, warmup_init=False)
    if name == "prodigy":
        rates = sorted({group["lr"] for group in groups} - {0.0})
        if len(rates) > 1:  # Prodigy itself raises on the first step otherwise, after the models have loaded
            raise UserError(f"--optimizer prodigy: the trained parts have different learning rates {rates}; "
                            "Prodigy takes one multiplier (usually 1.0): drop --text-encoder-learning-rate and "
                            "--token-embedding-learning-rate or set them equal to --learning-rate")
        if rates and rates[-1] < 0.1:  # most likely AdamW's rate carried over: Prodigy would barely move
            warnings.warn(f"--optimizer prodigy with --learning-rate {rates[-1]:g}: Prodigy's rate multiplies the "
                          "step size it finds itself; 1.0 is usual", stacklevel=2)
        # The authors' advice for diffusion models: bias correction on, and the warm-up safeguard, so a schedule
        # that warms up does not make it overestimate its step size.
        return optimizer_class(groups, lr=lr, betas=(beta1, beta2), eps=epsilon, weight_decay=decay, decouple=True,
                               use_bias_correction=True, safeguard_warmup=True)
    return optimizer_class(groups, lr=lr, betas=(beta1, beta2), weight_decay=decay)


def check_optimizer(settings: OptimizerSettings, device: torch.device) -> None:
    """Fail now, with one line, if the optimizer cannot run here (a setting it lacks, a missing package, a
    device it does not support): before a run spends minutes loading models."""
    resolved(settings)
    optimizer_class_for(settings.name, device)


def optimizer_class_for(name: str, device: torch.device) -> type:
    """The class behind an optimizer name, imported (the optional ones come from extras)."""
    if name == "adamw":
        return torch.optim.AdamW
    if name == "adamw8bit":
        # bitsandbytes 0.50 runs its blockwise 8-bit update on CPU too (dequantize, fp32 Adam, requantize):
        # measured to train, resume bit for bit and keep 2 bytes per weight here, at about 6x AdamW's step time.
        # Its quantizer is approximate there (a zero state is stored as 2e-5 of its block's largest value), so an
        # entry without gradient drifts when its block of 256 holds one with: rows 768, 1024 or 1280 wide (the
        # CLIP embeddings) are whole blocks, so the identifier-only embedding training still moves only its rows.
        # Other devices (mps, xpu) are not verified, so they are refused rather than failing mid-run.
        if device.type not in ("cuda", "cpu"):
            raise UserError(f"--optimizer adamw8bit runs on a CUDA GPU or the CPU, not {device.type}; "
                            "use --optimizer adamw or adafactor")
        try:
            import bitsandbytes
        except ImportError:
            raise UserError("--optimizer adamw8bit needs bitsandbytes (pip install \"dreambooth[gpu]\"); "
                            "or use --optimizer adamw or adafactor") from None
        return bitsandbytes.optim.AdamW8bit
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise UserError("--optimizer prodigy needs prodigyopt (pip install \"dreambooth[optimizers]\")") from None
        return Prodigy
    try:
        # The foreach variant: a handful of kernels per group, not per tensor (faster on CUDA); measured to give
        # the same weights bit for bit as lion_pytorch.Lion on CPU.
        from lion_pytorch.foreach import Lion
    except ImportError:
        raise UserError("--optimizer lion needs lion-pytorch (pip install \"dreambooth[optimizers]\")") from None
    return Lion


def _tensors(params: torch.Tensor | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """A group's parameters as a list (torch also takes one tensor or a generator, which a look would use up)."""
    return [params] if isinstance(params, torch.Tensor) else list(params)


# Bytes of state per fp32 weight of a large tensor. Exact for the element-wise optimizers (adamw: exp_avg and
# exp_avg_sq; lion: exp_avg; prodigy: those two plus s and p0; adamw8bit: two uint8 states plus one fp32 absmax
# per block of 256 each). Adafactor's depends on shapes: the figure is an ESTIMATE, the SD 1.x UNet's (2.13 from
# its shapes: its 3x3 and 1x1 convolutions factor poorly), the highest of the models trained here (SD 2.x UNet
# 1.89, SDXL UNet 0.38, CLIP text encoders 0.02). optimizer_state_bytes gives every optimizer's exact count.
ADAFACTOR_ESTIMATE = 2.13


def state_bytes_per_parameter(settings: OptimizerSettings | str) -> float:
    """Optimizer state bytes per fp32 trained weight (see the table above; adafactor's is an estimate)."""
    settings = OptimizerSettings(settings) if isinstance(settings, str) else settings
    beta1, _, _ = resolved(settings)
    # A first moment (exp_avg) costs 4 more: Prodigy drops it at beta1 0, Adafactor keeps one only if given beta1.
    if settings.name == "prodigy":
        return 16.0 if beta1 > 0 else 12.0
    if settings.name == "adafactor":
        return ADAFACTOR_ESTIMATE + (4.0 if beta1 is not None else 0.0)
    return {"adamw": 8.0, "adamw8bit": 2.0 + 2 * 4 / BNB_BLOCK, "lion": 4.0}[settings.name]


def optimizer_state_bytes(settings: OptimizerSettings | str, parameters: Iterable[torch.Tensor]) -> int:
    """Exact bytes of optimizer state once every tensor in `parameters` has taken a step (shared tensors counted
    once), from shapes and dtypes; works on meta tensors. Per-tensor step counters that are Python ints cost
    nothing here; AdamW's are float32 tensors, counted."""
    settings = OptimizerSettings(settings) if isinstance(settings, str) else settings
    beta1, _, _ = resolved(settings)
    name, total, quantized = settings.name, 0, False
    for p in parameters:
        n, size = p.numel(), p.element_size()
        if name == "adamw":
            total += 2 * n * size + 4
        elif name == "lion":
            total += n * size
        elif name == "prodigy":
            # p0 is one element for a weight that is all zeros at the first step (LoRA's B matrices).
            p0 = n if p.is_meta or bool(p.any()) else 1
            total += (n + p0 + n * (2 if beta1 > 0 else 1)) * size  # s, p0, exp_avg (beta1 > 0), exp_avg_sq
        elif name == "adamw8bit":
            if n < BNB_MIN_8BIT_SIZE:
                total += 2 * n * 4  # fp32 state1 and state2, whatever the weight's dtype
            else:
                total += 2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK)
                quantized = True
        else:  # adafactor: state in the gradient's dtype, half gradients promoted to fp32
            size = 4 if p.dtype in (torch.float16, torch.bfloat16) else size
            shape = tuple(p.shape)
            second = math.prod(shape[:-1]) + math.prod(shape[:-2] + shape[-1:]) if len(shape) >= 2 else n
            total += (second + (n if beta1 is not None else 0) + 1) * size  # + 1: the RMS scalar
    if quantized:
        total += 2 * 256 * 4  # the two 256-entry fp32 quantization maps, shared by every tensor
    return total
