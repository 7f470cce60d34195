"""--optimizer: every optimizer trains a tiny real model, resumes bit for bit through torch.save/torch.load
(weights_only, as accelerate loads) and through accelerate's save_state/load_state, gets the settings it is
given (a group's own weight decay winning), refuses what it cannot do in one line, and holds exactly the state
bytes optimizer_state_bytes says."""

from __future__ import annotations

import sys
from collections.abc import Iterable

import pytest
import torch

from dreambooth.errors import UserError
from dreambooth.optimizers import (ADAFACTOR_ESTIMATE, DEFAULTS, OPTIMIZER_NAMES, OptimizerSettings, make_optimizer,
                                   optimizer_state_bytes, state_bytes_per_parameter)

CPU = torch.device("cpu")
# The optional packages behind three optimizers. CI installs the small pure-Python two (the test extra);
# bitsandbytes (the `gpu` extra) costs every process that imports diffusers three seconds once installed, so its
# tests run where it is installed and are skipped, with this reason, where it is not.
PACKAGES = {"adamw8bit": "bitsandbytes", "prodigy": "prodigyopt", "lion": "lion_pytorch"}


def installed(name: str) -> bool:
    import importlib.util

    return name not in PACKAGES or importlib.util.find_spec(PACKAGES[name]) is not None


def runnable(names) -> list:
    """Optimizer names as test parameters, each skipped (with the reason) where its package is missing."""
    return [pytest.param(name, marks=pytest.mark.skipif(not installed(name), reason=f"{PACKAGES.get(name)} is not "
                                                        "installed"))
            for name in names]

# A rate that moves each tiny model visibly in a few steps; Prodigy's is its multiplier, Lion's is ~10x smaller.
RATES = {"adamw": 1e-2, "adamw8bit": 1e-2, "adafactor": 1e-2, "prodigy": 1.0, "lion": 1e-3}


class Tiny(torch.nn.Module):
    """Every kind of tensor the optimizers treat differently: a 3x3 conv kernel (Adafactor factors its last two
    dimensions), a 5184-weight matrix (bitsandbytes quantizes tensors of 4096 or more, in blocks of 256: the last
    one partial) and a small one (fp32 state there), biases, and an all-zero vector (Prodigy keeps a one-element
    p0 for it)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.conv = torch.nn.Conv2d(2, 4, 3, padding=1)
            self.big = torch.nn.Linear(64, 81)
            self.out = torch.nn.Linear(81, 3)
        self.shift = torch.nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.big(torch.relu(self.conv(x)).flatten(1)))) + self.shift


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same inputs and targets for a step in every run: a fixed random target function of the inputs."""
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(8, 2, 4, 4, generator=generator)
    teacher = torch.randn(32, 3, generator=torch.Generator().manual_seed(7))
    return x, torch.sin(x.flatten(1) @ teacher)


def loss_of(model: torch.nn.Module, step: int) -> torch.Tensor:
    x, y = batch(step)
    return torch.nn.functional.mse_loss(model(x), y)


def groups_of(model: Tiny, name: str) -> list[dict]:
    """Like the trainer's: one group with its rate, and one with its own weight decay of 0 (as the identifier's
    embedding rows get)."""
    rest = [p for n, p in model.named_parameters() if n != "shift"]
    return [{"params": rest, "lr": RATES[name]}, {"params": [model.shift], "lr": RATES[name], "weight_decay": 0.0}]


def build(name: str, seed: int = 0, **settings) -> tuple[Tiny, torch.optim.Optimizer]:
    model = Tiny(seed)
    return model, make_optimizer(groups_of(model, name), OptimizerSettings(name, **settings), CPU)


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: Iterable[int]) -> list[float]:
    losses = []
    for step in steps:
        loss = loss_of(model, step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def assert_same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resuming"


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in optimizer.state, a tensor shared by several parameters (bitsandbytes'
    quantization maps) counted once."""
    seen, total = set(), 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                total += value.nbytes
    return total


@pytest.fixture
def fresh_accelerate():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize("name", runnable(OPTIMIZER_NAMES))
def test_every_optimizer_trains_on_cpu(name):
    model, optimizer = build(name)
    # One batch over and over: its loss must fall. 60 steps because Prodigy starts from a step size of 1e-6 and
    # grows it (slowly here, with the warm-up safeguard): its loss only drops clearly after about 50.
    losses = train(model, optimizer, [0] * 60)
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("name", runnable(OPTIMIZER_NAMES))
def test_state_survives_weights_only_load_and_resume_is_bit_exact(name, tmp_path):
    model, optimizer = build(name)
    train(model, optimizer, range(6))
    straight = weights(model)

    model, optimizer = build(name)
    train(model, optimizer, range(3))
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "state.pt")
    # weights_only=True is how accelerate loads: a pickle-only object in the state would fail here.
    saved = torch.load(tmp_path / "state.pt", weights_only=True)
    model, optimizer = build(name, seed=1)  # other starting weights: the load has to bring everything back
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    train(model, optimizer, range(3, 6))
    assert_same_bits(weights(model), straight)


@pytest.mark.parametrize("name", runnable(OPTIMIZER_NAMES))
def test_resume_through_accelerate_save_and_load_state_is_bit_exact(name, tmp_path, fresh_accelerate):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    def run(seed: int, steps: range, load: bool = False, save: bool = False) -> dict[str, torch.Tensor]:
        AcceleratorState._reset_state(True)
        accelerator = Accelerator(cpu=True)
        model = Tiny(seed)
        optimizer = make_optimizer(groups_of(model, name), OptimizerSettings(name), accelerator.device)
        model, optimizer = accelerator.prepare(model, optimizer)
        if load:
            accelerator.load_state(str(tmp_path / "checkpoint"))
        for step in steps:
            accelerator.backward(loss_of(model, step))
            optimizer.step()
            optimizer.zero_grad()
        if save:
            accelerator.save_state(str(tmp_path / "checkpoint"), safe_serialization=True)
        return weights(accelerator.unwrap_model(model))

    straight = run(0, range(6))
    run(0, range(3), save=True)
    assert_same_bits(run(1, range(3, 6), load=True), straight)


@pytest.mark.parametrize("name", runnable(OPTIMIZER_NAMES))
def test_settings_reach_the_optimizer_and_a_groups_own_weight_decay_wins(name):
    given = {"beta1": 0.8, "beta2": 0.95, "epsilon": 1e-6}
    if name == "lion":
        del given["epsilon"]
    if name == "adafactor":
        given = {"beta1": 0.8}
    model = Tiny()
    groups = groups_of(model, name)
    optimizer = make_optimizer(groups, OptimizerSettings(name, weight_decay=0.25, **given), CPU)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.25, 0.0]
    assert [group["lr"] for group in optimizer.param_groups] == [RATES[name]] * 2
    assert "weight_decay" not in groups[0]  # the caller's dicts are not written into
    group = optimizer.param_groups[0]
    if name == "adafactor":  # the trainer's rate, Adafactor's own clipping and second-moment schedule
        assert (group["beta1"], group["relative_step"], group["scale_parameter"]) == (0.8, False, False)
        assert (group["clip_threshold"], group["decay_rate"], group["eps"]) == (1.0, -0.8, (1e-30, 1e-3))
    else:
        assert tuple(group["betas"]) == (0.8, 0.95)
    if name == "prodigy":  # the authors' advice for diffusion models, and their defaults otherwise
        assert (group["use_bias_correction"], group["safeguard_warmup"], group["decouple"]) == (True, True, True)
        assert (group["d0"], group["d_coef"], group["slice_p"], group["beta3"]) == (1e-6, 1.0, 1, None)
    if "epsilon" in given:
        assert group["eps"] == 1e-6


@pytest.mark.parametrize("name", runnable(OPTIMIZER_NAMES))
def test_untouched_settings_are_each_optimizers_own_defaults(name):
    group = build(name)[1].param_groups[0]
    beta1, beta2, epsilon = DEFAULTS[name]
    assert group["weight_decay"] == 1e-2
    if name == "adafactor":
        assert group["beta1"] is None  # no first moment: Adafactor's memory saving
    else:
        assert tuple(group["betas"]) == (beta1, beta2)
    if epsilon is not None:
        assert group["eps"] == epsilon
    if name == "lion":
        assert tuple(group["betas"]) == (0.9, 0.99)  # Lion's own, not Adam's 0.999


@pytest.mark.parametrize("name", runnable(OPTIMIZER_NAMES))
def test_rows_without_gradient_in_a_group_without_decay_do_not_move(name):
    """The trainer's identifier-only embedding training relies on this: other rows' gradients are zeroed and
    their group has weight decay 0, so whatever the optimizer, those rows stay exactly as they were. Rows 768 wide,
    as in SD 1.x's CLIP (SD 2.x: 1024, SDXL: 768 and 1280): whole blocks of bitsandbytes' 256, which matters on
    CPU, whose quantizer stores a zero as 2e-5 of its block's largest value."""
    table = torch.nn.Parameter(torch.randn(12, 768, generator=torch.Generator().manual_seed(3)))  # 8-bit path
    decayed = torch.nn.Parameter(torch.ones(4))
    before = table.detach().clone()
    learns = torch.zeros(12, 1)
    learns[5] = 1.0
    table.register_hook(lambda grad: grad * learns)
    groups = [{"params": [decayed], "lr": RATES[name]}, {"params": [table], "lr": RATES[name], "weight_decay": 0.0}]
    optimizer = make_optimizer(groups, OptimizerSettings(name, weight_decay=0.5), CPU)
    for step in range(4):
        ((table * torch.randn(12, 768, generator=torch.Generator().manual_seed(step))).sum()
         + decayed.sum() * 0).backward()
        optimizer.step()
        optimizer.zero_grad()
    moved = (table.detach() != before).any(dim=1)
    assert moved.tolist() == [row == 5 for row in range(12)]
    assert (decayed.detach() < 1).all()  # the default decay did reach the other group


@pytest.mark.parametrize("settings", [
    pytest.param(s, marks=pytest.mark.skipif(not installed(s.name), reason=f"{PACKAGES.get(s.name)} is not installed"))
    for s in [OptimizerSettings(name) for name in OPTIMIZER_NAMES]
    + [OptimizerSettings("adafactor", beta1=0.9), OptimizerSettings("prodigy", beta1=0.0)]],
    ids=lambda s: f"{s.name}-beta1={s.beta1}")
def test_state_bytes_equal_the_real_state_after_one_step(settings):
    model = Tiny()
    expected = optimizer_state_bytes(settings, list(model.parameters()))  # before: the all-zero vector is zero
    optimizer = make_optimizer(groups_of(model, settings.name), settings, CPU)
    train(model, optimizer, range(1))
    assert state_bytes(optimizer) == expected
    assert len(optimizer.state) == len(list(model.parameters()))


@pytest.mark.parametrize("name", runnable(["adamw", "adamw8bit", "lion", "prodigy"]))
def test_bytes_per_parameter_is_exact_for_a_large_tensor(name):
    big = torch.nn.Parameter(torch.randn(64, 256))
    optimizer = make_optimizer([{"params": [big], "lr": RATES[name]}], OptimizerSettings(name), CPU)
    big.grad = torch.randn(64, 256)
    optimizer.step()
    per_tensor = {"adamw": 4, "adamw8bit": 2 * 256 * 4}.get(name, 0)  # AdamW's step, bitsandbytes' maps
    assert (state_bytes(optimizer) - per_tensor) / big.numel() == state_bytes_per_parameter(name)


def test_bytes_per_parameter_without_a_first_moment():
    big = torch.nn.Parameter(torch.randn(64, 256))
    settings = OptimizerSettings("prodigy", beta1=0.0)
    optimizer = make_optimizer([{"params": [big], "lr": 1.0}], settings, CPU)
    big.grad = torch.randn(64, 256)
    optimizer.step()
    assert "exp_avg" not in optimizer.state[big]
    assert state_bytes(optimizer) / big.numel() == state_bytes_per_parameter(settings) == 12.0


def test_adafactor_bytes_per_parameter_is_an_estimate_between_its_extremes():
    # Exact from shapes: a wide matrix costs almost nothing, a vector 4 per weight, a 1x1 convolution 8.
    for shape, low, high in [((512, 512), 0.0, 0.02), ((512,), 4.0, 4.01), ((64, 64, 1, 1), 8.0, 8.01)]:
        assert low <= optimizer_state_bytes("adafactor", [torch.empty(shape)]) / torch.empty(shape).numel() <= high
    assert state_bytes_per_parameter(OptimizerSettings("adafactor", beta1=0.9)) == ADAFACTOR_ESTIMATE + 4


def test_adafactor_estimate_is_the_sd1_unets_exact_figure_and_above_sdxls():
    """The estimate's provenance: the real UNets' shapes (built on the meta device: no weights, no memory)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        sd1 = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
        sdxl = UNet2DConditionModel(
            cross_attention_dim=2048, transformer_layers_per_block=[1, 2, 10], block_out_channels=[320, 640, 1280],
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=[5, 10, 20],
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
    per_weight = {}
    for name, unet in (("sd1", sd1), ("sdxl", sdxl)):
        parameters = list(unet.parameters())
        per_weight[name] = optimizer_state_bytes("adafactor", parameters) / sum(p.numel() for p in parameters)
    assert sum(p.numel() for p in sd1.parameters()) == 859_520_964  # SD 1.5's UNet
    assert per_weight["sd1"] == pytest.approx(ADAFACTOR_ESTIMATE, abs=0.005)
    assert per_weight["sdxl"] < 0.4 < ADAFACTOR_ESTIMATE


def test_adamw_is_fused_on_cuda_and_cpu_only():
    model = Tiny()
    fused = {device: [group["fused"] for group in make_optimizer(groups_of(model, "adamw"), OptimizerSettings("adamw"),
                                                                 torch.device(device)).param_groups]
             for device in ("cuda", "cpu", "mps")}
    assert fused == {"cuda": [True, True], "cpu": [True, True], "mps": [None, None]}


def one_line_error(*args) -> str:
    with pytest.raises(UserError) as caught:
        make_optimizer(*args)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("--optimizer")
    return message


@pytest.mark.parametrize(("name", "modules", "extra"), [
    ("adamw8bit", ["bitsandbytes"], "gpu"),
    ("prodigy", ["prodigyopt"], "optimizers"),
    ("lion", ["lion_pytorch", "lion_pytorch.foreach"], "optimizers"),
])
def test_a_missing_package_is_one_line_naming_the_extra(name, modules, extra, monkeypatch):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # import of it now fails as if not installed
    message = one_line_error(groups_of(Tiny(), name), OptimizerSettings(name), CPU)
    assert f"--optimizer {name} needs" in message and f'pip install "dreambooth[{extra}]"' in message


def test_adamw8bit_refuses_devices_it_is_not_verified_on():
    message = one_line_error(groups_of(Tiny(), "adamw8bit"), OptimizerSettings("adamw8bit"), torch.device("mps"))
    assert "mps" in message and "--optimizer adamw" in message


def test_prodigy_refuses_different_learning_rates_but_takes_frozen_groups():
    model = Tiny()
    groups = [{"params": [model.big.weight], "lr": 1.0}, {"params": [model.out.weight], "lr": 0.5}]
    assert "--learning-rate" in one_line_error(groups, OptimizerSettings("prodigy"), CPU)
    groups[1]["lr"] = 0.0  # Prodigy's own rule: a group may sit out at 0
    make_optimizer(groups, OptimizerSettings("prodigy"), CPU)


@pytest.mark.parametrize(("name", "given", "label"), [
    ("lion", {"epsilon": 1e-8}, "epsilon"), ("adafactor", {"beta2": 0.99}, "beta2"),
    ("adafactor", {"epsilon": 1e-8}, "epsilon"),
])
def test_a_setting_the_optimizer_lacks_is_refused(name, given, label):
    message = one_line_error(groups_of(Tiny(), name), OptimizerSettings(name, **given), CPU)
    assert f"--optimizer {name} has no {label}" in message


def test_an_unknown_name_lists_the_choices():
    assert "adamw, adamw8bit, adafactor, prodigy, lion" in one_line_error(
        groups_of(Tiny(), "adamw"), OptimizerSettings("sgd"), CPU)


def test_prodigy_warns_about_an_adamw_sized_rate():
    with pytest.warns(UserWarning, match="--optimizer prodigy with --learning-rate 1e-05"):
        make_optimizer([{"params": [torch.nn.Parameter(torch.ones(3))], "lr": 1e-5}], OptimizerSettings("prodigy"), CPU)
