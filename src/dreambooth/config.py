"""Settings as dataclasses: one field per flag, with the help text the CLI shows (how a field becomes a flag
and a config-file key lives in options.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from dreambooth.errors import UserError
from dreambooth.options import flag_name, option, validate_fields

SCHEDULER_NAMES = ("ddim", "ddpm", "pndm", "euler", "euler-a", "dpm++", "unipc")
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
MIXED_PRECISION = ("no", "fp16", "bf16")
LORA_TARGETS = ("attention", "attention+ff", "all-linear")
DEFAULT_LEARNING_RATE = 5e-6  # full fine-tune (the DreamBooth paper's rate for SD)
DEFAULT_LORA_LEARNING_RATE = 1e-4  # LoRA adapters learn from zero and need a far larger step
PRODIGY_LEARNING_RATE = 1.0  # Prodigy finds its own step size; the rate multiplies it
EXPORT_FORMATS = ("single-file", "kohya", "diffusers")
EXPORT_DTYPES = ("fp16", "bf16", "fp32")
ON_NAN_CHOICES = ("stop", "skip")  # --on-nan
REPORT_TO = ("none", "tensorboard", "wandb", "all")  # --report-to: accelerate's trackers
SAVE_DTYPES = ("fp32", "fp16", "bf16")
OPTIMIZER_NAMES = ("adamw", "adamw8bit", "adafactor", "prodigy", "lion")  # optimizers.py makes each


MODEL_CONFIG_HELP = ("For a single-file --model: the diffusers folder or hub id whose configs describe it (needed "
                     "offline; online diffusers finds one itself).")
VAE_HELP = "Use this VAE instead of the model's own (a diffusers folder or hub id), e.g. an fp16-safe SDXL VAE."
REVISION_HELP = "For a hub --model: the branch, tag or commit to load (default: main)."
VARIANT_HELP = "Load the model's weight variant, e.g. fp16 (files named *.fp16.safetensors), where it has one."


@dataclass
class ClassImagesConfig:
    """Generate class images with the base model, topping a folder up to N images."""

    model: str = option(help="Base model: hub id, diffusers folder, .safetensors file or a finished RUN folder.")
    prompt: str = option(help='The class prompt, e.g. "a photo of a cat".')
    output: str = option(help="Folder of class images; existing images are kept and count toward --num-images.")
    num_images: int = option(200, "How many images the folder should hold.", positive=True)
    steps: int = option(25, "Sampling steps per image.", positive=True)
    guidance: float = option(7.5, "Classifier-free guidance scale.", non_negative=True)
    batch_size: int = option(4, "Images generated at once.", positive=True)
    seed: int = option(0, "Image i uses seed + i, so a top-up never repeats an existing image.")
    negative_prompt: str = option("", "What the class images should not show.")
    scheduler: str = option("dpm++", "Sampler for the class images.", choices=SCHEDULER_NAMES)
    model_config: str | None = option(None, MODEL_CONFIG_HELP)
    vae: str | None = option(None, VAE_HELP)
    revision: str | None = option(None, REVISION_HELP, non_empty=True)
    variant: str | None = option(None, VARIANT_HELP, non_empty=True)
    allow_pickle: bool = option(False, "Allow loading a pickled .ckpt model (runs code from the file).")

    def __post_init__(self) -> None:
        validate_fields(self)


@dataclass
class TrainConfig:
    """DreamBooth fine-tuning of a Stable Diffusion model on a few instance images."""

    model: str = option(help="Base model: hub id, diffusers folder, .safetensors file or a finished RUN folder.")
    instance_dir: str = option(help="Folder of photos of the subject (jpg, png, webp); "
                                    "a .txt beside an image is its caption.")
    instance_prompt: str = option(help='Prompt naming the subject, e.g. "a photo of miru cat".')
    output: str = option(help="The RUN folder to write.")
    instance_mask_dir: str | None = option(
        None, "Folder of masks named like the photos (white where the subject is): the loss then weighs the "
              "background by --mask-background-weight, so the subject's surroundings are not learned with it.")
    mask_background_weight: float = option(0.1, "Loss weight of the background when masks are given (0 to 1).",
                                           non_negative=True)
    class_dir: str | None = option(
        None, "Folder of class images for prior preservation (topped up with the base model).")
    class_prompt: str | None = option(None, 'Class prompt, e.g. "a photo of a cat"; turns on prior preservation.',
                                      non_empty=True)
    num_class_images: int = option(200, "Class images to train with (the first N by name; missing ones are "
                                        "generated first).", positive=True)
    prior_loss_weight: float = option(1.0, "Weight of the class (prior-preservation) loss.", non_negative=True)
    class_image_steps: int = option(25, "Sampling steps when generating class images.", positive=True)
    class_image_guidance: float = option(7.5, "Guidance scale when generating class images.", non_negative=True)
    class_image_batch_size: int = option(4, "Class images generated at once.", positive=True)
    class_image_scheduler: str = option("dpm++", "Sampler for generating class images.", choices=SCHEDULER_NAMES)
    model_config: str | None = option(None, MODEL_CONFIG_HELP)
    vae: str | None = option(None, VAE_HELP)
    revision: str | None = option(None, REVISION_HELP, non_empty=True)
    variant: str | None = option(None, VARIANT_HELP, non_empty=True)
    resolution: int | None = option(
        None, "Training resolution in pixels, a multiple of 8 (default: the model's native size, e.g. 512 for "
              "SD 1.5, 1024 for SDXL).", positive=True)
    learning_rate: float | None = option(
        None, f"UNet learning rate (default: {DEFAULT_LEARNING_RATE:g}; {DEFAULT_LORA_LEARNING_RATE:g} "
              f"with --lora-rank; {PRODIGY_LEARNING_RATE:g} with --optimizer prodigy).", positive=True)
    lora_rank: int | None = option(
        None, "Train LoRA adapters of this rank instead of the whole model (a few MB; RUN/lora/).", positive=True)
    lora_alpha: float | None = option(None, "LoRA alpha: the adapters act at alpha / rank (default: the rank).",
                                      positive=True)
    lora_dropout: float | None = option(None, "Dropout inside the LoRA adapters (default: 0).", non_negative=True)
    lora_targets: str | None = option(
        None, "Layers that get adapters: attention (default), attention+ff (also the feed-forward layers), or "
              "all-linear.", choices=LORA_TARGETS)
    max_train_steps: int = option(400, "Optimizer steps to train.", positive=True)
    train_batch_size: int = option(1, "Instance images per step (as many class images are added).", positive=True)
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimizer step.", positive=True)
    lr_scheduler: str = option("constant", "Learning-rate schedule.", choices=LR_SCHEDULES)
    lr_warmup_steps: int = option(0, "Warm-up steps of the schedule.", non_negative=True)
    train_text_encoder: bool = option(False, "Fine-tune the text encoder too.")
    text_encoder_learning_rate: float | None = option(None, "Text-encoder learning rate (default: --learning-rate).",
                                                      positive=True)
    token_embedding_learning_rate: float | None = option(
        None, "Learning rate of the identifier's token embeddings, the only rows of the embedding table that then "
              "learn: about 100x the text encoder's rate binds the subject's word fast while every other word stays.",
        positive=True)
    identifier: str | None = option(
        None, "The word that names the subject, e.g. miru (default: the words of --instance-prompt that "
              "--class-prompt lacks).", non_empty=True)
    optimizer: str = option(
        "adamw", "adamw (torch's, fused), adamw8bit (bitsandbytes: a quarter of the state), adafactor, prodigy "
                 "(finds its own step size: use --learning-rate 1.0) or lion.", choices=OPTIMIZER_NAMES)
    adam_beta1: float | None = option(None, "The optimizer's beta1 (default: its own, 0.9 for AdamW).",
                                      non_negative=True)
    adam_beta2: float | None = option(None, "The optimizer's beta2 (default: its own, 0.999 for AdamW, 0.99 for Lion).",
                                      non_negative=True)
    adam_epsilon: float | None = option(None, "The optimizer's epsilon (default: its own, 1e-8 for AdamW).",
                                        positive=True)
    adam_weight_decay: float = option(1e-2, "The optimizer's (decoupled) weight decay.", non_negative=True)
    mixed_precision: str = option("no", "Mixed precision for the forward pass.", choices=MIXED_PRECISION)
    gradient_checkpointing: bool = option(False, "Trade compute for memory in the UNet (and text encoder).")
    cache: bool = option(
        True, "Encode each distinct image crop and prompt once and reuse it (the VAE and a frozen text encoder "
              "give the same answer every time); --no-cache encodes every step, as common trainers do.")
    latent_cache_dir: str | None = option(
        None, "Also keep the cached latents in this folder (one small file per image crop, under a subfolder per "
              "VAE), e.g. one shared by runs over the same class images; default: in memory only.")
    compile: bool = option(False, "Compile the UNet with torch.compile (a slow first step, then faster ones; GPU).")
    log_every: int = option(
        10, "Read the loss from the device every N steps (every step is still recorded; fewer reads mean fewer "
            "waits for the GPU).", positive=True)
    save_dtype: str = option("fp32", "Precision of the saved pipeline or LoRA weights.", choices=SAVE_DTYPES)
    center_crop: bool = option(False, "Crop the centre after resizing (default: a random crop).")
    random_flip: bool = option(False, "Flip images horizontally at random.")
    max_grad_norm: float = option(1.0, "Clip the gradient norm to this (0 turns clipping off).", non_negative=True)
    offset_noise: float = option(0.0, "Offset-noise strength (helps very dark or bright images).", non_negative=True)
    offset_noise_levels: int = option(
        1, "Offset noise also over halves, quarters, ... of the latent (match a base model pretrained that way).",
        positive=True)
    snr_gamma: float | None = option(None, "Min-SNR loss weighting gamma (5.0 is the paper's value).", positive=True)
    save_pipeline_at: list[int] = option(
        [], "Also save the trained weights (a pipeline, or a LoRA run's LoRA folder) at these steps, in "
            "RUN/pipelines/step-NNNNNN/ (sweeps use this).")
    checkpoint_every: int = option(0, "Save a resumable checkpoint every N steps (0: never).", non_negative=True)
    checkpoint_minutes: float = option(
        10.0, "Also save a resumable checkpoint after every M minutes of training (0: never). A checkpoint is "
              "always saved at the last step, and when SIGTERM or Ctrl-C stops the run.", non_negative=True)
    keep_checkpoints: int = option(2, "Keep only the newest K checkpoints.", positive=True)
    resume: bool = option(False, "Continue the run in --output from its newest checkpoint.")
    overwrite: bool = option(
        False, "Start afresh in an --output that holds a run (the old files are moved aside, not deleted).")
    validation_prompt: list[str] = option([], "Prompts to render during training (repeat or list several).",
                                          non_empty=True)
    validation_every: int = option(0, "Render validation images every N steps (0: only at the end).", non_negative=True)
    validation_seeds: list[int] = option([0, 1], "Seeds of the validation images.")
    validation_sampling_steps: int = option(25, "Sampling steps of validation images.", positive=True)
    seed: int = option(0, "Seed for data order, noise and timesteps: the same seed gives the same run.")
    report_to: str = option("tensorboard", "Where to log the run as it trains, besides RUN/metrics.jsonl: TensorBoard "
                                           "(under --logging-dir), wandb (pip install \"dreambooth[wandb]\"), all, "
                                           "or none.", choices=REPORT_TO)
    logging_dir: str | None = option(None, "Folder of the trackers' logs (default: RUN/logs).", non_empty=True)
    tracker_project: str = option("dreambooth", "The trackers' project name (a wandb project).", non_empty=True)
    license: str | None = option(None, "The model card's license (default: the base model's, where its card is "
                                       "known).", non_empty=True)
    on_nan: str = option(
        "stop", "A step whose loss or gradient is NaN or infinite: stop the run there (its last checkpoint intact), "
                "or skip that update and go on (skips are counted in metrics.jsonl).", choices=ON_NAN_CHOICES)
    allow_pickle: bool = option(False, "Allow loading a pickled .ckpt model (runs code from the file).")
    estimate_memory: bool = option(
        False, "Print the GPU memory the run needs (weights, gradients, optimizer state, cached latents, and the "
               "activations of one step traced from the model's configs, no weights loaded) and stop without training.")

    def __post_init__(self) -> None:
        validate_fields(self)
        self._resolve_lora()
        if self.learning_rate is None:
            self.learning_rate = (PRODIGY_LEARNING_RATE if self.optimizer == "prodigy" else
                                  DEFAULT_LORA_LEARNING_RATE if self.uses_lora else DEFAULT_LEARNING_RATE)
        for name in ("adam_beta1", "adam_beta2"):
            if (value := getattr(self, name)) is not None and value >= 1:
                raise UserError(f"{flag_name(name)} {value}: must be below 1")
        if self.resolution is not None and self.resolution % 8:
            raise UserError(f"--resolution {self.resolution}: must be a multiple of 8 "
                            f"(e.g. {self.resolution // 8 * 8 or 8})")
        if self.token_embedding_learning_rate and not self.train_text_encoder:
            raise UserError("--token-embedding-learning-rate needs --train-text-encoder "
                            "(the embeddings are part of it)")
        if self.token_embedding_learning_rate and not (self.identifier or self.class_prompt):
            raise UserError("--token-embedding-learning-rate needs --identifier WORD (the word that names the subject) "
                            "or a --class-prompt to find it by")
        if self.mask_background_weight > 1:
            raise UserError(f"--mask-background-weight {self.mask_background_weight}: must be between 0 and 1")
        if self.class_dir and not self.class_prompt:
            raise UserError("--class-dir needs --class-prompt (the prompt its images show, e.g. \"a photo of a cat\")")
        if self.class_prompt and not self.class_dir:
            raise UserError("--class-prompt needs --class-dir (where the class images are kept)")
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite contradict each other; pick one")
        for flag, folder in (("--instance-dir", self.instance_dir), ("--class-dir", self.class_dir)):
            # The run folder is locked and, with --overwrite, moved aside: it cannot hold the run's own images.
            if folder and os.path.realpath(folder) == os.path.realpath(self.output):
                raise UserError(f"{flag} {folder}: is the --output run folder; keep the images in a folder of their "
                                "own")

    def _resolve_lora(self) -> None:
        """Fill in the defaults that depend on --lora-rank, and refuse LoRA options without it."""
        if self.lora_rank is None:
            given = [name for name in ("lora_alpha", "lora_dropout", "lora_targets") if getattr(self, name) is not None]
            if given:
                raise UserError(f"{flag_name(given[0])} needs --lora-rank R (LoRA options apply to LoRA runs only)")
            return
        if self.lora_dropout is not None and self.lora_dropout >= 1:
            raise UserError(f"--lora-dropout {self.lora_dropout}: must be below 1")
        if self.lora_alpha is None:
            self.lora_alpha = float(self.lora_rank)
        if self.lora_dropout is None:
            self.lora_dropout = 0.0
        if self.lora_targets is None:
            self.lora_targets = "attention"

    @property
    def with_prior_preservation(self) -> bool:
        return bool(self.class_prompt)

    @property
    def uses_lora(self) -> bool:
        return self.lora_rank is not None


def class_images_config(config: TrainConfig) -> ClassImagesConfig:
    """The class-image settings a training run implies (the same as `dreambooth class-images` with them)."""
    return ClassImagesConfig(
        model=config.model, prompt=config.class_prompt, output=config.class_dir,
        num_images=config.num_class_images, steps=config.class_image_steps, guidance=config.class_image_guidance,
        batch_size=config.class_image_batch_size, seed=config.seed, scheduler=config.class_image_scheduler,
        model_config=config.model_config, vae=config.vae, revision=config.revision, variant=config.variant,
        allow_pickle=config.allow_pickle,
    )


@dataclass
class GenerateConfig:
    """Render prompts with a model over a grid of sampling settings and seeds."""

    model: str = option(help="Model: hub id, diffusers folder, .safetensors file or a finished RUN folder.")
    prompt: list[str] = option(help="Prompts to render (repeat or list several).", non_empty=True)
    output: str = option(help="Folder for images/, manifest.jsonl and grid.png.")
    negative_prompt: str = option("", "What the images should not show.")
    steps: list[int] = option([30], "Sampling steps; several values make grid rows.")
    guidance: list[float] = option([7.5], "Guidance scales; several values make grid rows.")
    seeds: list[int] = option([0], "Seeds; each makes one image per prompt and setting.")
    scheduler: list[str] = option(["ddim"], "Sampler; several values make grid rows.", choices=SCHEDULER_NAMES)
    height: int | None = option(None, "Image height (default: the model's native size).", positive=True)
    width: int | None = option(None, "Image width (default: the model's native size).", positive=True)
    batch_size: int = option(1, "Images rendered at once.", positive=True)
    lora_scale: float = option(1.0, "Strength of a LoRA run's adapters (0 renders the base model).", non_negative=True)
    model_config: str | None = option(None, MODEL_CONFIG_HELP)
    vae: str | None = option(None, VAE_HELP)
    revision: str | None = option(None, REVISION_HELP, non_empty=True)
    variant: str | None = option(None, VARIANT_HELP, non_empty=True)
    overwrite: bool = option(
        False, "Write into an --output that already holds a generation (old files are moved aside).")
    allow_pickle: bool = option(False, "Allow loading a pickled .ckpt model (runs code from the file).")

    def __post_init__(self) -> None:
        validate_fields(self)
        for name in ("prompt", "steps", "seeds"):
            if not getattr(self, name):
                raise UserError(f"{flag_name(name)}: give at least one value")
        if any(value <= 0 for value in self.steps):
            raise UserError(f"--steps {self.steps}: sampling steps must be positive")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and value % 8:
                raise UserError(f"{flag_name(name)} {value}: must be a multiple of 8")


@dataclass
class EvaluateConfig:
    """Measure a generation with the DreamBooth paper's metrics (DINO, CLIP-I, CLIP-T, PRES, DIV)."""

    samples: str = option(help="A `generate` output folder (with manifest.jsonl).", positional=True)
    reference_dir: str = option(help="Folder of real photos of the subject (the instance images).")
    class_prompt: str | None = option(None, 'Images made with this prompt (e.g. "a photo of a cat") measure PRES.',
                                      non_empty=True)
    clip_model: str = option("openai/clip-vit-base-patch32", "CLIP model for CLIP-I and CLIP-T: hub id or folder.")
    dino_model: str = option(
        "facebook/dino-vits16", "DINO ViT for DINO, PRES and DIV: hub id or folder (a CLIP folder works too).")
    output: str | None = option(None, "Where to write the metrics (default: SAMPLES/metrics.jsonl).")
    batch_size: int = option(16, "Images embedded at once.", positive=True)

    def __post_init__(self) -> None:
        validate_fields(self)


@dataclass
class SweepConfig:
    """Train, sample, evaluate and report a grid of DreamBooth settings, sharing work between trials."""

    sweep: str = option(help="The sweep file (YAML or TOML): base settings, grid, sampling, prompts, seeds.",
                        positional=True)
    output: str = option(help="The sweep folder; running the same command again continues where it stopped.")
    devices: list[str] = option([], "GPUs to run training runs on side by side, one per GPU (e.g. --devices 0 1); "
                                    "default: one after another on the default device.")
    only_run: str | None = option(
        None, "Work on this one training run of the sweep only (what --devices starts per GPU).")

    def __post_init__(self) -> None:
        validate_fields(self)


@dataclass
class ReportConfig:
    """Write report.html and report.md for a sweep folder."""

    directory: str = option(help="A sweep output folder.", positional=True)
    prompt: str | None = option(None, "Prompt shown in the trials x settings table (default: the first).",
                                non_empty=True)

    def __post_init__(self) -> None:
        validate_fields(self)


@dataclass
class ExportConfig:
    """Write a run's model as the file another tool loads: one .safetensors for AUTOMATIC1111 / ComfyUI
    (single-file), a kohya-layout LoRA, or a diffusers folder."""

    run: str = option(help="A finished RUN folder (full fine-tune or LoRA).", positional=True)
    format: str = option(help="single-file: original Stable Diffusion layout (A1111, ComfyUI); kohya: a LoRA in "
                              "the kohya / A1111 layout; diffusers: a pipeline folder.", choices=EXPORT_FORMATS)
    output: str = option(help="The .safetensors file (single-file, kohya) or the folder (diffusers) to write.")
    dtype: str = option("fp16", "Precision of the written weights.", choices=EXPORT_DTYPES)
    merge_lora: bool = option(False, "Merge a LoRA run into its base model (for single-file or diffusers).")
    lora_scale: float = option(1.0, "Strength of the LoRA when merging it.", non_negative=True)
    overwrite: bool = option(False, "Replace an existing --output (the old one is moved aside, not deleted).")
    allow_pickle: bool = option(False, "Allow loading a pickled .ckpt base model (runs code from the file).")

    def __post_init__(self) -> None:
        validate_fields(self)


@dataclass
class PushConfig:
    """Upload a finished run to the Hugging Face Hub: the pipeline (or the LoRA), the model card and its samples."""

    run: str = option(help="A finished RUN folder.", positional=True)
    repo_id: str = option(help="The hub repository to create or update, USER/NAME.", non_empty=True)
    private: bool = option(False, "Create the repository private.")
    include_checkpoints: bool = option(False, "Also upload RUN/checkpoints/ (resumable state; large).")
    dry_run: bool = option(False, "List what would be uploaded, and upload nothing.")

    def __post_init__(self) -> None:
        validate_fields(self)


@dataclass
class InspectDataConfig:
    """Show what the trainer will see: a contact sheet of the exact crops (and masks), and warnings."""

    instance_dir: str = option(help="Folder of instance images (a .txt beside an image is its caption).")
    output: str = option(help="Folder for contact-sheet.png and the table.")
    class_dir: str | None = option(None, "Folder of class images.", non_empty=True)
    instance_mask_dir: str | None = option(None, "Folder of masks named as the instance images.", non_empty=True)
    resolution: int = option(512, "Training resolution in pixels.", positive=True)
    center_crop: bool = option(False, "Centre crops, as train --center-crop (default: the random crops of step 1).")
    overwrite: bool = option(False, "Write into an --output that holds an earlier sheet (it is moved aside).")

    def __post_init__(self) -> None:
        validate_fields(self)
