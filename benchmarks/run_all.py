"""Every benchmark in one run: training steps/s and peak memory (train_speed.py; on a GPU also full-size SD 1.5 and
SDXL) and class-image generation images/s (class_images_speed.py); both tables printed, one merged JSON.

    python benchmarks/run_all.py [--threads 2] [--repeats 2] [--quick] [--json results.json] [--output out/benchmarks]

Each benchmark runs as its own process with the same --threads, --repeats and --quick; the class images and their
grid go to OUTPUT/class-images (which must not hold a previous run's images). The JSON holds each benchmark's own
JSON under its name ("train_speed", "class_images_speed").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each configuration, alternating")
    parser.add_argument("--quick", action="store_true", help="each benchmark's quick mode (CI)")
    parser.add_argument("--json", help="also write the merged results here")
    parser.add_argument("--output", type=Path, default=Path("out/benchmarks"), help="folder for the class images")
    args = parser.parse_args()

    shared = ["--threads", str(args.threads), "--repeats", str(args.repeats)] + (["--quick"] if args.quick else [])
    benchmarks = {"train_speed": [], "class_images_speed": ["--output", str(args.output / "class-images")]}
    merged: dict = {"threads": args.threads, "repeats": args.repeats, "quick": args.quick}
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in benchmarks.items():
            print(f"== {name}.py ==", flush=True)
            written = Path(tmp) / f"{name}.json"
            command = [sys.executable, str(HERE / f"{name}.py"), *shared, *extra, "--json", str(written)]
            if subprocess.run(command).returncode:
                failed.append(name)
            if written.exists():  # what a failed benchmark measured before it failed is kept too
                merged[name] = json.loads(written.read_text())
            print(flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(merged, indent=2))
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
