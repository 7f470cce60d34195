"""One-line mutation testing: change one token of the code at a time and check that a test fails.

    python tools/mutate.py [--files src/dreambooth/losses.py ...] [--list] [--only N ...] [--report FILE]
    python tools/mutate.py --named     # the breakages issue 9 listed, and which test catches each

Run it in a copy of the tree (`git worktree add /tmp/mutants HEAD`, then `python /tmp/mutants/tools/mutate.py`)
to keep working here meanwhile: it imports the package from its own tree.

Each mutant flips one operator, comparison, boolean or number on one line of the core training modules
(the settings and arithmetic a regression would silently change), runs the tests that cover that module
(`pytest -x`, cheapest files first) and counts it killed if any test fails, survived if all pass. The
file is restored after every mutant, also on Ctrl-C. Survivors judged harmless are explained in
tests/MUTATION.md; any other survivor is a missing test.

Why not mutmut: it mutates every line, including messages and logging, and on two cores its run over
these files takes many hours; this keeps to the tokens whose change alters what training computes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
import tokenize
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Module -> the test files that exercise it, cheapest first (pytest -x stops at the first failure).
TARGETS = {
    "src/dreambooth/seeds.py": ["tests/test_seeds.py", "tests/test_data.py", "tests/test_train_settings.py"],
    "src/dreambooth/losses.py": ["tests/test_losses.py", "tests/test_train_settings.py"],
    "src/dreambooth/step.py": ["tests/test_losses.py", "tests/test_train_settings.py"],
    "src/dreambooth/encoding.py": ["tests/test_encoding.py", "tests/test_train_settings.py"],
    "src/dreambooth/data.py": ["tests/test_data.py", "tests/test_train_settings.py"],
    "src/dreambooth/train.py": ["tests/test_train.py", "tests/test_train_settings.py"],
    "src/dreambooth/checkpoints.py": ["tests/test_checkpoints.py", "tests/test_train.py"],
}
OPERATORS = {
    "+": "-", "-": "+", "*": "/", "/": "*", "//": "*", "%": "*", "**": "*",
    "<": "<=", "<=": "<", ">": ">=", ">=": ">", "==": "!=", "!=": "==", "+=": "-=", "-=": "+=",
}
NAMES = {"True": "False", "False": "True", "and": "or", "or": "and"}
SKIPPED_STARTS = ("raise ", "print(", "assert ", "import ", "from ", "def ", "class ", "@", "#", "return f\"")


@dataclass(frozen=True)
class Mutant:
    file: str
    line: int  # 1-based
    column: int
    original: str
    replacement: str

    def describe(self) -> str:
        return f"{self.file}:{self.line}: {self.original!r} -> {self.replacement!r}"


def number_mutation(text: str) -> str | None:
    try:
        value = int(text, 0)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            return None
        return repr(value * 2 if value else 1.0)
    return str(value + 1)


def mutants_of(file: str) -> list[Mutant]:
    source = (ROOT / file).read_text()
    lines = source.splitlines()
    found = []
    docstring_lines = set()
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    for token in tokens:
        if token.type == tokenize.STRING and token.start[0] != token.end[0]:
            docstring_lines.update(range(token.start[0], token.end[0] + 1))
    for token in tokens:
        row, column = token.start
        if row > len(lines) or row in docstring_lines or lines[row - 1].lstrip().startswith(SKIPPED_STARTS):
            continue
        if token.type == tokenize.OP and token.string in OPERATORS:
            replacement = OPERATORS[token.string]
        elif token.type == tokenize.NAME and token.string in NAMES:
            replacement = NAMES[token.string]
        elif token.type == tokenize.NUMBER:
            replacement = number_mutation(token.string)
        else:
            continue
        if replacement is None or (token.string in ("*", "**") and lines[row - 1][column - 1 : column] in "(,"):
            continue  # *args / **kwargs, not arithmetic
        found.append(Mutant(file, row, column, token.string, replacement))
    return found


def apply(mutant: Mutant) -> str:
    """Write the mutant; return the original text to restore."""
    path = ROOT / mutant.file
    original = path.read_text()
    lines = original.splitlines(keepends=True)
    line = lines[mutant.line - 1]
    assert line[mutant.column : mutant.column + len(mutant.original)] == mutant.original
    lines[mutant.line - 1] = line[: mutant.column] + mutant.replacement + line[mutant.column + len(mutant.original):]
    path.write_text("".join(lines))
    return original


# The breakages issue 9 found no test for, as (file, text, replacement): each must make a test fail.
NAMED = {
    "offset noise switched off": ("src/dreambooth/step.py", "settings.offset_noise, settings.offset_noise_levels",
                                  "0.0, settings.offset_noise_levels"),
    "offset noise levels ignored": ("src/dreambooth/step.py", "settings.offset_noise, settings.offset_noise_levels",
                                    "settings.offset_noise, 1"),
    "learning-rate schedule never stepped": ("src/dreambooth/train.py", "            lr_schedule.step()\n", ""),
    "warmup ignored": ("src/dreambooth/train.py", "num_warmup_steps=config.lr_warmup_steps", "num_warmup_steps=0"),
    "gradient clipping removed": ("src/dreambooth/train.py", "config.max_grad_norm or float(\"inf\")",
                                  "float(\"inf\")"),
    "v-prediction target replaced by the noise": ("src/dreambooth/losses.py",
                                                  "return noise_scheduler.get_velocity(latents, noise, timesteps)",
                                                  "return noise"),
    "--snr-gamma ignored": ("src/dreambooth/step.py", "if settings.snr_gamma else None", "if False else None"),
    "--prior-loss-weight forced to 1": ("src/dreambooth/step.py", "settings.prior_loss_weight, example_weights",
                                        "1.0, example_weights"),
    "micro-batches of an accumulated step reuse one sample": ("src/dreambooth/train.py",
                                                              "sample_ids(step, micro_step, config, accelerator)",
                                                              "sample_ids(step, 0, config, accelerator)"),
}


def run_tests(tests: list[str], timeout: float) -> str:
    """'survived', or 'killed by <the first failing test>'."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow", *tests]
    try:
        # This tree's src/ first: the mutants can be run in a copy (a git worktree) while others work here.
        # One thread: the mutants run beside other work on few cores.
        environment = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
        result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "killed (timeout)"
    if result.returncode == 0:
        return "survived"
    failed = [line.split(" ", 1)[1].split(" - ")[0] for line in result.stdout.splitlines()
              if line.startswith(("FAILED ", "ERROR "))]
    return f"killed by {failed[0] if failed else 'an error'}"


def run_named(timeout: float, tests: list[str] | None) -> None:
    """Apply each of NAMED, run the tests of its module (or `tests`), report which test fails."""
    for name, (file, text, replacement) in NAMED.items():
        path = ROOT / file
        original = path.read_text()
        assert original.count(text) == 1, f"{name}: the text to change is not (exactly once) in {file}"
        path.write_text(original.replace(text, replacement))
        try:
            outcome = run_tests(tests or TARGETS[file], timeout)
        finally:
            path.write_text(original)
        print(f"{name}: {outcome}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", nargs="+", default=list(TARGETS), help="modules to mutate")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("--named", action="store_true", help="run only the breakages named in issue 9")
    parser.add_argument("--tests", nargs="+", help="test files to run instead of the module's own")
    parser.add_argument("--only", nargs="+", type=int, help="run only these mutant numbers (from --list)")
    parser.add_argument("--report", type=Path, help="append one JSON line per mutant to this file")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutant")
    args = parser.parse_args()
    if args.named:
        run_named(args.timeout, args.tests)
        return
    mutants = [mutant for file in args.files for mutant in mutants_of(file)]
    if args.list:
        for number, mutant in enumerate(mutants):
            print(f"{number:4d} {mutant.describe()}")
        return
    chosen = [(n, m) for n, m in enumerate(mutants) if args.only is None or n in args.only]
    survivors = []
    for number, mutant in chosen:
        started = time.monotonic()
        original = apply(mutant)
        try:
            outcome = run_tests(args.tests or TARGETS[mutant.file], args.timeout)
        finally:
            (ROOT / mutant.file).write_text(original)
        seconds = time.monotonic() - started
        print(f"{number:4d} {outcome:17s} {seconds:5.0f}s {mutant.describe()}", flush=True)
        if outcome == "survived":
            survivors.append(mutant)
        if args.report:
            with open(args.report, "a") as handle:
                handle.write(json.dumps({"number": number, "outcome": outcome, "seconds": round(seconds),
                                         "mutant": mutant.describe()}) + "\n")
    print(f"{len(chosen) - len(survivors)} of {len(chosen)} mutants killed; survivors:")
    for mutant in survivors:
        print("  " + mutant.describe())


if __name__ == "__main__":
    main()
