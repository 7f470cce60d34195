"""How fast the miniature world renders, and what one pretraining step of each model costs on this CPU.

    python benchmarks/miniworld_speed.py [--threads 2]

Pretraining renders every image on the fly, so rendering must stay far cheaper than a training step;
this prints the ratio. Step times are what `pretrain.py`'s step counts were chosen from.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch

from dreambooth.miniworld import components, world
from dreambooth.miniworld.pretrain import PretrainConfig, images_tensor


def seconds(fn, repeat: int = 3) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg, rng = PretrainConfig(), random.Random(0)

    render = seconds(lambda: world.sample_batch(rng, 1000), repeat=2) / 1000
    print(f"render: {render * 1e3:.3f} ms/image ({1 / render:,.0f} images/s)")

    with TemporaryDirectory() as tmp:
        tok = components.build_tokenizer(Path(tmp))
    m = components.build_models(tok)
    for name, model in m.items():
        print(f"{name}: {components.n_params(model) / 1e6:.2f}M parameters")

    def unet_step() -> None:
        images, specs = world.sample_batch(rng, cfg.unet_batch)
        with torch.no_grad():
            z = m["vae"].encode(images_tensor(images)).latent_dist.sample()
        ids = tok([world.random_caption(s, rng) for s in specs], padding="max_length",
                  max_length=tok.model_max_length, return_tensors="pt").input_ids
        t = torch.randint(0, 1000, (len(z),))
        loss = m["unet"](z, t, m["text_encoder"](ids)[0]).sample.square().mean()
        loss.backward()

    def vae_step() -> None:
        x = images_tensor(world.sample_batch(rng, cfg.vae_batch)[0][:, :cfg.vae_crop, :cfg.vae_crop])
        m["vae"](x).sample.square().mean().backward()

    def clip_step() -> None:
        images, specs = world.sample_batch(rng, cfg.clip_batch, marking_rate=0.5)
        ids = tok([world.full_caption(s) for s in specs], padding="max_length",
                  max_length=components.CLIP_MAX_LENGTH, return_tensors="pt").input_ids
        m["world_clip"](input_ids=ids, pixel_values=images_tensor(images), return_loss=True).loss.backward()

    for name, fn, batch in (("vae", vae_step, cfg.vae_batch), ("world_clip", clip_step, cfg.clip_batch),
                            ("unet+text_encoder", unet_step, cfg.unet_batch)):
        s = seconds(fn)
        print(f"{name} step (batch {batch}, forward+backward): {s:.3f}s; rendering is "
              f"{render * batch / s:.1%} of it")


if __name__ == "__main__":
    main()
