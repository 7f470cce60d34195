"""Pretrain the miniature Stable Diffusion and the world-CLIP on the rendered world, on a CPU.

    python -m dreambooth.miniworld.pretrain --output /work/miniworld-pretrain [--resume]

Stages, each resumable from OUTPUT/checkpoints/<stage>.pt: (1) the VAE, (1b) its decoder alone,
(2) the world-CLIP, (3) the UNet jointly with the generator's own text encoder, then (4) export of
fp16 diffusers / transformers folders to OUTPUT/pipeline and OUTPUT/world-clip. On 2 cores, run
`--stages vae` first, then `--stages decoder`, `--stages clip` and `--stages unet` as one-thread
processes side by side (`--threads 1`; two-thread processes stall each other), then `--stages export`.
Images are rendered on the fly; the data of step k comes from a RNG seeded by (seed, stage, k), so a
resumed run sees the same data.
The generator's data never contains markings; the world-CLIP's does.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from transformers import CLIPTokenizer

from dreambooth.files import atomic_file
from dreambooth.seeds import mix
from dreambooth.step import StepSettings, micro_batch_loss

from . import components, world


@dataclass
class PretrainConfig:
    seed: int = 0
    threads: int = 2
    vae_steps: int = 2000
    vae_batch: int = 32
    vae_crop: int = 32  # the VAE is fully convolutional: 32x32 crops cost a quarter of full images
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    # The VAE is a general image codec (SD's reconstructs any photo), so it also sees marked animals:
    # without them it cannot reconstruct orange ears at all. The UNet and text encoder never see markings.
    vae_marking_rate: float = 0.25
    decoder_steps: int = 1500
    decoder_batch: int = 16
    decoder_lr: float = 5e-4
    decoder_marking_rate: float = 0.6  # markings are small and rare: weight them up so they stay sharp
    clip_steps: int = 1200
    clip_batch: int = 128
    clip_lr: float = 1e-3
    clip_marking_rate: float = 0.5
    clip_hard_negatives: bool = True  # batches of look-alikes that differ only in kind or markings
    clip_vae_roundtrip: float = 0.5  # share of world-CLIP images passed through the VAE, so it can judge generations
    unet_steps: int = 2800
    unet_batch: int = 64
    unet_lr: float = 5e-4
    caption_dropout: float = 0.1  # empty captions, for classifier-free guidance
    snr_gamma: float = 5.0  # min-SNR loss weighting (Hang et al. 2023) converges faster
    unet_lowfreq_noise: float = 0.3  # offset noise over 3 levels: see losses.training_noise
    ema_decay: float = 0.999
    checkpoint_every: int = 200


def log(out: Path, msg: str) -> None:
    line = f"{time.strftime('%H:%M:%S')} {msg}"
    print(line, flush=True)
    with open(out / "pretrain.log", "a") as f:
        f.write(line + "\n")


# Each stage's own stream of random draws; fixed numbers, so renaming a stage does not change its data.
STAGE_STREAMS = {"vae": 1, "decoder": 2, "clip": 3, "unet": 4, "scale": 5}


def step_rng(cfg: PretrainConfig, stage: str, step: int) -> tuple[random.Random, torch.Generator]:
    """The data and noise RNGs of one step, independent of whether the run was resumed."""
    seed = mix(cfg.seed, STAGE_STREAMS[stage], step)
    return random.Random(seed), torch.Generator().manual_seed(seed)


def images_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(world.to_tensor_range(images))


def save_checkpoint(path: Path, step: int, **state) -> None:
    """Every object's state_dict in one file; a run killed mid-save keeps the previous checkpoint."""
    with atomic_file(path) as tmp:
        torch.save({"step": step, **{k: v.state_dict() for k, v in state.items()}}, tmp)


def load_checkpoint(path: Path, **state) -> int:
    """Restore `state` from `path` and return its step (0 without a checkpoint). Only tensors and plain
    values are read (weights_only): models, AdamW, LambdaLR schedules and EMAModel keep nothing else."""
    if not path.exists():
        return 0
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    for k, v in state.items():
        v.load_state_dict(ckpt[k])
    return ckpt["step"]


def run_stage(out: Path, name: str, steps: int, step_fn, every: int, state: dict) -> None:
    """Resume `state` from its checkpoint, call step_fn(step) up to `steps`, checkpoint as we go."""
    path = out / "checkpoints" / f"{name}.pt"
    start = load_checkpoint(path, **state)
    if start >= steps:
        log(out, f"[{name}] done at step {start}")
        return
    log(out, f"[{name}] steps {start} -> {steps}")
    t0, losses = time.time(), []
    for step in range(start, steps):
        losses.append(step_fn(step))
        if (step + 1) % 50 == 0 or step + 1 == steps:
            rate = (time.time() - t0) / (step + 1 - start)
            log(out, f"[{name}] step {step + 1}/{steps} loss {np.mean(losses):.4f} "
                     f"{rate:.2f}s/step eta {rate * (steps - step - 1) / 60:.1f}min")
            losses = []
        if (step + 1) % every == 0 or step + 1 == steps:
            save_checkpoint(path, step + 1, **state)


def optimizer_step(loss: torch.Tensor, params, opt, sched) -> None:
    """Backpropagate `loss`, clip the gradient norm to 1, step the optimizer and its schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


# ----------------------------------------------------------------------------------------------
# Stages


def train_vae(out: Path, cfg: PretrainConfig, vae) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, 100, cfg.vae_steps)

    def step(k: int) -> float:
        rng, _ = step_rng(cfg, "vae", k)
        images, _ = world.sample_batch(rng, cfg.vae_batch, marking_rate=cfg.vae_marking_rate)
        y, x = rng.randrange(0, 64 - cfg.vae_crop + 1, 4), rng.randrange(0, 64 - cfg.vae_crop + 1, 4)
        x0 = images_tensor(images[:, y:y + cfg.vae_crop, x:x + cfg.vae_crop])
        posterior = vae.encode(x0).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(recon, x0) + F.mse_loss(recon, x0) + cfg.vae_kl_weight * posterior.kl().mean()
        optimizer_step(loss, vae.parameters(), opt, sched)
        return loss.item()

    vae.train()
    run_stage(out, "vae", cfg.vae_steps, step, cfg.checkpoint_every, {"vae": vae, "opt": opt, "sched": sched})
    vae.eval().requires_grad_(False)


def train_decoder(out: Path, cfg: PretrainConfig, vae) -> None:
    """Fine-tune only the decoder on whole images, encoder frozen: the latent space (and so the UNet)
    is unchanged, while small details such as miru's markings come back sharper."""
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.decoder_lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, 50, cfg.decoder_steps)

    def step(k: int) -> float:
        rng, gen = step_rng(cfg, "decoder", k)
        x0 = images_tensor(world.sample_batch(rng, cfg.decoder_batch, marking_rate=cfg.decoder_marking_rate)[0])
        with torch.no_grad():
            latents = vae.encode(x0).latent_dist.sample(generator=gen)
        recon = vae.decode(latents).sample
        loss = F.l1_loss(recon, x0) + F.mse_loss(recon, x0)
        optimizer_step(loss, params, opt, sched)
        return loss.item()

    vae.decoder.train()
    state = {"decoder": vae.decoder, "post_quant_conv": vae.post_quant_conv, "opt": opt, "sched": sched}
    with torch.enable_grad():
        for p in params:
            p.requires_grad_(True)
        run_stage(out, "decoder", cfg.decoder_steps, step, cfg.checkpoint_every, state)
    vae.eval().requires_grad_(False)


@torch.no_grad()
def set_scaling_factor(out: Path, cfg: PretrainConfig, vae) -> float:
    """scaling_factor = 1 / std of the latents, measured, so scaled latents have unit variance like SD's."""
    rng, gen = step_rng(cfg, "scale", 0)
    images, _ = world.sample_batch(rng, 512)
    latents = vae.encode(images_tensor(images)).latent_dist.sample(generator=gen)
    factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=factor)
    log(out, f"[vae] latent mean {latents.mean():.3f} std {latents.std():.3f} -> scaling_factor {factor:.4f}")
    return factor


def clip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, scale: torch.Tensor,
              captions: list[str]) -> torch.Tensor:
    """Contrastive loss where every pair with the same caption is a positive (batches repeat captions)."""
    logits = scale * F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).T
    same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
    targets = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def train_world_clip(out: Path, cfg: PretrainConfig, clip, tokenizer, vae) -> None:
    opt = torch.optim.AdamW(clip.parameters(), lr=cfg.clip_lr, weight_decay=0.05)
    sched = get_cosine_schedule_with_warmup(opt, 100, cfg.clip_steps)

    def step(k: int) -> float:
        rng, gen = step_rng(cfg, "clip", k)
        if cfg.clip_hard_negatives:
            specs = world.look_alike_specs(rng, cfg.clip_batch, marking_rate=cfg.clip_marking_rate)
            images = world.render_batch(specs)
        else:
            images, specs = world.sample_batch(rng, cfg.clip_batch, marking_rate=cfg.clip_marking_rate)
        pixels = images_tensor(images)
        n = int(cfg.clip_batch * cfg.clip_vae_roundtrip)
        if n:
            with torch.no_grad():
                latents = vae.encode(pixels[:n]).latent_dist.sample(generator=gen)
                pixels[:n] = vae.decode(latents).sample.clamp(-1, 1)
        captions = [world.full_caption(s) for s in specs]
        ids = tokenizer(captions, padding="max_length", max_length=components.CLIP_MAX_LENGTH,
                        truncation=True, return_tensors="pt").input_ids
        img = clip.get_image_features(pixel_values=pixels)
        txt = clip.get_text_features(input_ids=ids)
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        loss = clip_loss(img, txt, clip.logit_scale.exp().clamp(max=100), captions)
        optimizer_step(loss, clip.parameters(), opt, sched)
        return loss.item()

    clip.train()
    run_stage(out, "world_clip", cfg.clip_steps, step, cfg.checkpoint_every, {"clip": clip, "opt": opt, "sched": sched})
    clip.eval()


def train_unet(out: Path, cfg: PretrainConfig, unet, text_encoder, tokenizer, vae, noise_scheduler) -> None:
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01)
    sched = get_cosine_schedule_with_warmup(opt, 200, cfg.unet_steps)
    ema_unet = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=0.75)
    ema_text = EMAModel(text_encoder.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=0.75)
    # The DreamBooth trainer's own loss: the same encoding, noise, Min-SNR weights and target.
    models = SimpleNamespace(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet,
                             noise_scheduler=noise_scheduler)
    settings = StepSettings(prior_loss_weight=0.0, offset_noise=cfg.unet_lowfreq_noise, offset_noise_levels=3,
                            snr_gamma=cfg.snr_gamma, mask_background_weight=1.0)

    def step(k: int) -> float:
        rng, gen = step_rng(cfg, "unet", k)
        images, specs = world.sample_batch(rng, cfg.unet_batch)  # marking_rate 0: no markings, ever
        captions = ["" if rng.random() < cfg.caption_dropout else world.random_caption(s, rng) for s in specs]
        batch = {"pixel_values": images_tensor(images), "prompts": captions, "num_instance": len(captions)}
        loss = micro_batch_loss(batch, gen, models, settings).loss
        optimizer_step(loss, params, opt, sched)
        ema_unet.step(unet.parameters())
        ema_text.step(text_encoder.parameters())
        return loss.item()

    unet.train()
    text_encoder.train()
    state = {"unet": unet, "text_encoder": text_encoder, "opt": opt, "sched": sched,
             "ema_unet": ema_unet, "ema_text": ema_text}
    run_stage(out, "unet", cfg.unet_steps, step, cfg.checkpoint_every, state)
    # Ship the EMA weights: for short runs they sample much better than the last iterate.
    ema_unet.copy_to(unet.parameters())
    ema_text.copy_to(text_encoder.parameters())
    unet.eval()
    text_encoder.eval()


# ----------------------------------------------------------------------------------------------
# Export


def export(out: Path, cfg: PretrainConfig, models: dict, tokenizer, noise_scheduler) -> None:
    """fp16 folders; configs keep float32 as the dtype to compute in (fp16 matmuls are slow on CPU)."""
    for m in models.values():
        m.to(torch.float16)
    inference_scheduler = DDIMScheduler.from_config(noise_scheduler.config)
    pipe = StableDiffusionPipeline(vae=models["vae"], text_encoder=models["text_encoder"], tokenizer=tokenizer,
                                   unet=models["unet"], scheduler=inference_scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out / "pipeline", safe_serialization=True)
    clip_folder = out / "world-clip"
    models["world_clip"].save_pretrained(clip_folder, safe_serialization=True)
    for config in (out / "pipeline" / "text_encoder" / "config.json", clip_folder / "config.json"):
        compute_in_float32(config)
    clip_tok = components.build_tokenizer(clip_folder, model_max_length=components.CLIP_MAX_LENGTH)
    assert clip_tok.get_vocab() == tokenizer.get_vocab()
    (out / "pretrain_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    for m in models.values():
        m.to(torch.float32)
    log(out, f"exported {out / 'pipeline'} and {clip_folder}")


def compute_in_float32(config_file: Path) -> None:
    """Record float32 as the dtype: transformers' default dtype="auto" would otherwise load the fp16
    weights as fp16, which mismatches the float32 UNet in the pipeline and is slow on CPUs."""

    def fix(node):
        if isinstance(node, dict):
            return {k: ("float32" if k in ("dtype", "torch_dtype") and v else fix(v)) for k, v in node.items()}
        return node

    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(fix(config), indent=2, sort_keys=True) + "\n")


STAGES = ("vae", "decoder", "clip", "unet", "export")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True, help="folder for checkpoints, log and exported models")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUTPUT/checkpoints (else it must be empty)")
    for field, value in asdict(PretrainConfig()).items():
        kind = (lambda v: v.lower() in ("1", "true", "yes")) if isinstance(value, bool) else type(value)
        parser.add_argument(f"--{field.replace('_', '-')}", type=kind, default=value)
    parser.add_argument("--stages", default="all",
                        help="comma-separated subset of vae,decoder,clip,unet,export: decoder, clip and unet can run "
                             "as one-thread processes side by side once the VAE is done; export loads them all")
    args = parser.parse_args(argv)
    cfg = PretrainConfig(**{k: getattr(args, k) for k in asdict(PretrainConfig())})
    out: Path = args.output
    if (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()) and not args.resume \
            and args.stages == "all":
        parser.error(f"{out}/checkpoints is not empty; pass --resume to continue")
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)

    # Setup: threads, seed, tokenizer and freshly initialised models (overwritten by checkpoints).
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    log(out, f"config {asdict(cfg)}")
    # Side-by-side stage processes must not rewrite the tokenizer under each other's feet.
    tok_dir = out / "tokenizer"
    tokenizer = (CLIPTokenizer.from_pretrained(tok_dir) if (tok_dir / "tokenizer_config.json").exists()
                 else components.build_tokenizer(tok_dir))
    models = components.build_models(tokenizer)
    for name, m in models.items():
        log(out, f"{name}: {components.n_params(m) / 1e6:.2f}M parameters")
    noise_scheduler = components.scheduler()

    stages = STAGES if args.stages == "all" else args.stages.split(",")
    wanted = set(STAGES) if "export" in stages else set(stages) | {"vae"}  # later stages need the VAE

    # 1. VAE, then its measured scaling factor.
    train_vae(out, cfg, models["vae"])
    set_scaling_factor(out, cfg, models["vae"])
    # 1b. The decoder alone, sharper (the latent space stays as the encoder made it).
    if "decoder" in wanted:
        train_decoder(out, cfg, models["vae"])
    # 2. World-CLIP (it sees markings; nothing it learns flows into the generator).
    if "clip" in wanted:
        train_world_clip(out, cfg, models["world_clip"], tokenizer, models["vae"])
    # 3. UNet and the generator's own text encoder, trained jointly on marking-free captions.
    if "unet" in wanted:
        train_unet(out, cfg, models["unet"], models["text_encoder"], tokenizer, models["vae"], noise_scheduler)
    # 4. Export.
    if "export" in stages:
        export(out, cfg, models, tokenizer, noise_scheduler)
    log(out, f"pretraining finished in {(time.time() - t0) / 60:.1f} min (this invocation)")


if __name__ == "__main__":
    main()
