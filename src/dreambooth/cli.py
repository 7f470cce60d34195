"""The `dreambooth` command: parse flags, build a config, call one function. No logic of its own.

Flags are generated from the config dataclasses, so a setting, its flag, its config-file key and its
help text cannot drift apart. A user mistake prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import sys
import traceback
import types
import typing
from collections.abc import Callable
from typing import Any

from dreambooth import __version__
from dreambooth.config import (ClassImagesConfig, EvaluateConfig, ExportConfig, GenerateConfig, InspectDataConfig,
                               PushConfig, ReportConfig, SweepConfig, TrainConfig)
from dreambooth.errors import UserError
from dreambooth.interrupts import Stopped
from dreambooth.miniworld.demo import DemoConfig  # the application shell may import the demo; the core never does
from dreambooth.options import RENAMED, build_config, cli_fields, flag_name, load_config_file

USER_MISTAKE = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line and exit status 2 like every other user mistake."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(USER_MISTAKE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def run_class_images(config: ClassImagesConfig) -> None:
    from dreambooth.class_images import top_up_class_images

    images = top_up_class_images(config)
    print(f"{config.output}: {len(images)} class images")


def run_train(config: TrainConfig) -> None:
    if config.estimate_memory:
        from dreambooth.memory import estimate_run

        print(estimate_run(config).format())
        return
    from dreambooth.train import train

    paths = train(config)
    print(f"done: {paths.final_model} (model card: {paths.model_card})")


def run_generate(config: GenerateConfig) -> None:
    from dreambooth.sampling import generate

    output = generate(config)
    print(f"done: {output / 'grid.png'}")


def run_evaluate(config: EvaluateConfig) -> None:
    from dreambooth.metrics import evaluate

    print(f"done: {evaluate(config)}")


def run_sweep(config: SweepConfig) -> None:
    from dreambooth.sweep import run_sweep as sweep

    print(f"done: {sweep(config)}")


def run_report(config: ReportConfig) -> None:
    from dreambooth.report import report

    report(config)


def run_export(config: ExportConfig) -> None:
    from dreambooth.export import export

    print(f"done: {export(config)}")


def run_push(config: PushConfig) -> None:
    from dreambooth.hub import push

    print(f"done: {push(config)}")


def run_inspect_data(config: InspectDataConfig) -> None:
    from dreambooth.preview import inspect_data

    print(f"done: {inspect_data(config)}")


def run_demo(config: DemoConfig) -> None:
    from dreambooth.miniworld.demo import run_demo as demo

    print(f"done: {demo(config)}")


COMMANDS: dict[str, tuple[type, Callable[[Any], None], str]] = {
    "class-images": (ClassImagesConfig, run_class_images, "Top up a folder of class images with the base model."),
    "train": (TrainConfig, run_train, "DreamBooth-train a model on a few instance images."),
    "generate": (GenerateConfig, run_generate, "Render prompts over a grid of sampling settings and seeds."),
    "sweep": (SweepConfig, run_sweep, "Train, sample, measure and report a grid of settings."),
    "evaluate": (EvaluateConfig, run_evaluate, "Measure a generation: DINO, CLIP-I, CLIP-T, PRES, DIV."),
    "report": (ReportConfig, run_report, "Write report.html and report.md for a sweep folder."),
    "export": (ExportConfig, run_export, "Write a run as a single file (A1111, ComfyUI), a kohya LoRA or a diffusers "
                                         "folder."),
    "push": (PushConfig, run_push, "Upload a finished run to the Hugging Face Hub (pipeline or LoRA, card, samples)."),
    "inspect-data": (InspectDataConfig, run_inspect_data, "Show the crops and masks the trainer will see, and "
                                                          "warnings about the images."),
    "demo": (DemoConfig, run_demo, "Run the whole story in the miniature world (CPU, minutes, no download)."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="dreambooth", description="Teach a diffusion model a subject from a few photos.")
    parser.add_argument("--version", action="version", version=f"dreambooth {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name, (config_class, _, summary) in COMMANDS.items():
        sub = commands.add_parser(name, help=summary, description=config_class.__doc__)
        sub.add_argument("--config", metavar="FILE",
                         help="YAML or TOML file with the same keys as the flags (snake_case); flags win.")
        sub.add_argument("--debug", action="store_true", help="Show the full traceback of an error.")
        for spec, hint in cli_fields(config_class):
            add_flag(sub, spec, hint)
        for old_name, (new_name, message) in RENAMED.items():
            if new_name in {spec.name for spec, _ in cli_fields(config_class)}:
                sub.add_argument(flag_name(old_name), nargs="?", action=RenamedFlag, message=message,
                                 help=argparse.SUPPRESS)
    return parser


class RenamedFlag(argparse.Action):
    """A flag that was renamed: giving it fails with one line that names the new flag."""

    def __init__(self, *args: Any, message: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.message = message

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option_string: Any = None) -> None:
        parser.error(self.message)


def add_flag(parser: argparse.ArgumentParser, spec: dataclasses.Field, hint: Any) -> None:
    """One flag for one config field; default None so that main() can tell which flags were given."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # `X | None`
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    help_text = spec.metadata.get("help", "") + default_note(spec)
    kwargs: dict[str, Any] = {"default": None, "dest": spec.name, "help": help_text}
    if spec.metadata.get("positional"):
        # Optional on the command line so that a --config file may give it instead.
        parser.add_argument(spec.name, nargs="?", type=hint, default=None, metavar=spec.name.upper(), help=help_text)
        return
    if hint is bool:
        parser.add_argument(flag_name(spec.name), action=argparse.BooleanOptionalAction, **kwargs)
        return
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        kwargs.update(nargs="+", action="extend", type=item)
    else:
        kwargs["type"] = hint
    if spec.metadata.get("choices"):
        kwargs["choices"] = spec.metadata["choices"]
    else:
        kwargs["metavar"] = spec.name.upper()
    parser.add_argument(flag_name(spec.name), **kwargs)


def default_note(spec: dataclasses.Field) -> str:
    if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
        return " (required)"
    default = spec.default_factory() if spec.default is dataclasses.MISSING else spec.default
    return "" if default in (None, "", [], False) else f" (default: {default})"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config_class, command, _ = COMMANDS[args.command]
    try:
        file_values = load_config_file(args.config) if args.config else {}
        overrides = {spec.name: getattr(args, spec.name) for spec, _ in cli_fields(config_class)}
        config = build_config(config_class, file_values, overrides, source=f"--config {args.config}")
        command(config)
    except UserError as error:
        if args.debug:
            traceback.print_exc()
        print(f"dreambooth {args.command}: error: {error}", file=sys.stderr)
        return USER_MISTAKE
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        if args.debug:
            traceback.print_exc()
        # Every writer writes a temporary name and removes it on failure: what was complete is still there.
        where = f" writing {error.filename}" if error.filename else ""
        print(f"dreambooth {args.command}: error: the disk is full{where}; nothing complete was replaced: free some "
              "space, then run the same command again", file=sys.stderr)
        return USER_MISTAKE
    except Stopped as stop:
        print(f"dreambooth {args.command}: {stop}", file=sys.stderr)
        return stop.exit_status
    except KeyboardInterrupt:
        print(f"dreambooth {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
