"""The README's GPU recipes: `--estimate-memory`'s peak for SD 1.5 and SDXL under each memory switch, in one table.

    python benchmarks/memory_recipes.py [--markdown]

Nothing is trained and no weights are read: the UNet, VAE and text encoders are built from SD 1.5's and SDXL's
published configs on the meta device (`meta_models.write_reference_configs`), exactly as `dreambooth train ...
--estimate-memory` builds them, with 5 instance photos and prior preservation (200 class images, so 2 images per
step). The peak leaves out the CUDA context and allocator slack (see the printout's notes): keep 1-2 GB of margin.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from PIL import Image

GIB = 2**30
GPU_SIZES = (8, 12, 16, 24)
MARGIN_GIB = 1.5  # CUDA context, cuBLAS/cuDNN workspaces and the allocator's slack, which the peak leaves out

RECIPES = [  # (name, model, settings)
    ("SD 1.5 full, AdamW, fp32", "sd15", {}),
    ("SD 1.5 full, AdamW, fp16, checkpointing", "sd15", {"mixed_precision": "fp16", "gradient_checkpointing": True}),
    ("SD 1.5 full, 8-bit AdamW, fp16, checkpointing", "sd15",
     {"optimizer": "adamw8bit", "mixed_precision": "fp16", "gradient_checkpointing": True}),
    ("SD 1.5 full + text encoder, 8-bit AdamW, fp16, checkpointing", "sd15",
     {"optimizer": "adamw8bit", "mixed_precision": "fp16", "gradient_checkpointing": True,
      "train_text_encoder": True}),
    ("SD 1.5 LoRA r16, fp16", "sd15", {"lora_rank": 16, "mixed_precision": "fp16"}),
    ("SD 1.5 LoRA r16, fp16, checkpointing", "sd15",
     {"lora_rank": 16, "mixed_precision": "fp16", "gradient_checkpointing": True}),
    ("SDXL LoRA r16, fp16, checkpointing", "sdxl",
     {"lora_rank": 16, "mixed_precision": "fp16", "gradient_checkpointing": True}),
    ("SDXL LoRA r16 + text encoders, fp16, checkpointing", "sdxl",
     {"lora_rank": 16, "mixed_precision": "fp16", "gradient_checkpointing": True, "train_text_encoder": True}),
    ("SDXL LoRA r16, fp16", "sdxl", {"lora_rank": 16, "mixed_precision": "fp16"}),
    ("SDXL full, 8-bit AdamW, fp16, checkpointing", "sdxl",
     {"optimizer": "adamw8bit", "mixed_precision": "fp16", "gradient_checkpointing": True}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()

    from dreambooth.config import TrainConfig
    from dreambooth.memory import estimate_run
    from dreambooth.meta_models import write_reference_configs

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "photos").mkdir()
        for index in range(5):
            Image.new("RGB", (64, 64)).save(root / "photos" / f"{index}.png")
        models = {name: write_reference_configs(root / name, name) for name in ("sd15", "sdxl")}
        for name, model, settings in RECIPES:
            config = TrainConfig(model=str(models[model]), instance_dir=str(root / "photos"),
                                 instance_prompt="a photo of miru cat", class_dir=str(root / "classes"),
                                 class_prompt="a photo of a cat", output=str(root / "run"), **settings)
            estimate = estimate_run(config)
            fits = [size for size in GPU_SIZES if estimate.peak / GIB + MARGIN_GIB <= size]
            rows.append((name, estimate.resolution, estimate.total / GIB, estimate.peak / GIB,
                         f"{fits[0]} GB" if fits else f"> {GPU_SIZES[-1]} GB"))
    if args.markdown:
        print("| recipe | px | weights+grads+optimizer GiB | peak GiB | smallest GPU |")
        print("| --- | --- | --- | --- | --- |")
        for name, resolution, total, peak, fits in rows:
            print(f"| {name} | {resolution} | {total:.2f} | {peak:.2f} | {fits} |")
        return
    print(f"{'recipe':<62} {'px':>5} {'w+g+opt GiB':>12} {'peak GiB':>9} {'smallest GPU':>13}")
    for name, resolution, total, peak, fits in rows:
        print(f"{name:<62} {resolution:>5} {total:>12.2f} {peak:>9.2f} {fits:>13}")


if __name__ == "__main__":
    main()
