"""The sweep report: metrics + images + loss curves -> DIR/report.html and DIR/report.md. Never imports torch.

Everything comes from the files `sweep` and `evaluate` leave in DIR (trials.jsonl, runs/*/metrics.jsonl,
samples/*/manifest.jsonl, metrics.jsonl, sweep.yaml). A missing piece is shown as missing, never fatal: the
report of a half-finished or partly failed sweep is exactly the one a user needs to read. The two files hold
the same content: the page is built once as a list of blocks, then rendered as HTML and as GitHub Markdown.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dreambooth.artifacts import smooth
from dreambooth.config import ReportConfig
from dreambooth.errors import UserError
from dreambooth.files import MANIFEST, atomic_file, atomic_write_text, read_jsonl
from dreambooth.report_format import Block, Img, Part, render_html, render_md
from dreambooth.sweep_files import (METRIC_ROWS, SWEEP_COPY, TRIALS, fill_prompt, plain_class_prompt,
                                    read_trial_records)

METRICS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "pres": "PRES", "div": "DIV"}
BETTER = {"dino": "↑", "clip_i": "↑", "clip_t": "↑", "pres": "↓", "div": "↑"}  # PRES: lower = class prior kept
RULE = ("Ranking rule: every (trial, sampling setting) pair is ranked by DINO and, separately, by CLIP-T "
        "(rank 1 = highest; equal values share a rank). Pairs are ordered by the mean of the two ranks, lowest "
        "first; ties are broken by lower PRES (the class prior is better preserved), then by higher DINO. "
        "Pairs without DINO or CLIP-T come after every measured pair.")
DIV_NAMES = {"lpips": "LPIPS distance", "1-dino": "1 − DINO cosine similarity"}
LOSS_PLOT = "report_files/loss.png"
WORDS = {"learning_rate": "lr {}", "max_train_steps": "{} steps"}  # grid keys in a column header; others: "key value"
Setting = tuple[int, float, str]  # (sampling steps, guidance, scheduler)


# Numbers ------------------------------------------------------------------------------------------------

def pooled(rows: list[dict], key: str) -> tuple[float, float]:
    """Mean and standard error of all per-image values behind `rows`, rebuilt exactly from each row's n, mean, se.

    A row's se is its sample std / sqrt(n), so its sum of squares about its own mean is (n - 1) * n * se**2;
    adding n * (mean_row - mean)**2 per row gives the sum of squares of all values about the pooled mean.
    """
    # A row without the metric (PRES may be null) is left out; a missing se counts as no spread.
    groups = [(int(r.get("n") or 0), finite(r.get(key)), finite(r.get(f"{key}_se"))) for r in rows]
    groups = [(n, m, se if math.isfinite(se) else 0.0) for n, m, se in groups if n > 0 and math.isfinite(m)]
    total = sum(n for n, _, _ in groups)
    if total == 0:
        return math.nan, math.nan
    mean = sum(n * m for n, m, _ in groups) / total
    if total == 1:
        return mean, math.nan
    squares = sum((n - 1) * n * se**2 + n * (m - mean) ** 2 for n, m, se in groups)
    return mean, math.sqrt(squares / (total - 1) / total)


def finite(value: Any) -> float:
    """The value as a float, or nan when it is missing (null in JSON) or not a finite number."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.nan


def _ranks(values: list[float]) -> list[int]:
    """Rank 1 = highest; equal values share the best rank; missing (nan) values share the last."""
    measured = sorted((v for v in values if math.isfinite(v)), reverse=True)
    return [measured.index(v) + 1 if math.isfinite(v) else len(measured) + 1 for v in values]


def rank_trials(entries: list[dict]) -> list[dict]:
    """Order (trial, setting) entries by RULE; return copies with dino_rank, clip_t_rank, mean_rank and rank."""
    dino, clip_t = _ranks([finite(e.get("dino")) for e in entries]), _ranks([finite(e.get("clip_t")) for e in entries])
    ranked = [dict(e, dino_rank=d, clip_t_rank=c, mean_rank=(d + c) / 2) for e, d, c in zip(entries, dino, clip_t)]

    def order(e: dict) -> tuple:
        pres, dino_value = finite(e.get("pres")), finite(e.get("dino"))
        return (e["mean_rank"], pres if math.isfinite(pres) else math.inf,
                -dino_value if math.isfinite(dino_value) else math.inf)

    ranked.sort(key=order)  # stable: full ties keep the sweep's order
    for position, entry in enumerate(ranked, 1):
        entry["rank"] = position
    return ranked


def summarize(rows: list[dict]) -> list[dict]:
    """One entry per (trial, setting): every metric pooled over prompts and seeds."""
    groups: dict[tuple[str, Setting], list[dict]] = {}
    for row in rows:
        groups.setdefault((str(row.get("trial")), setting_of(row)), []).append(row)
    entries = []
    for (trial, setting), group in groups.items():
        entry: dict[str, Any] = {"trial": trial, "setting": setting, "n": sum(int(r.get("n") or 0) for r in group)}
        for key in METRICS:
            source = group
            if key == "pres":
                # PRES comes from the class prompt's images, so prompt rows repeat one measurement: count it once.
                source = list({(r.get("n"), r.get("pres"), r.get("pres_se")): r for r in group}.values())
            entry[key], entry[f"{key}_se"] = pooled(source, key)
        entries.append(entry)
    return entries


def smooth_curve(values: list[float]) -> list[float]:
    """The run's loss smoothed with a window of about 1/30 of the curve (diffusion loss is noisy)."""
    return smooth(values, weight=max(0.0, 1.0 - 30.0 / max(len(values), 1)))


# Reading the sweep folder --------------------------------------------------------------------------------

def setting_of(row: dict) -> Setting:
    return int(row.get("steps") or 0), float(row.get("guidance") or 0.0), str(row.get("scheduler") or "")


def setting_label(setting: Setting) -> str:
    steps, guidance, scheduler = setting
    return f"{steps} steps, guidance {guidance:g}" + (f", {scheduler}" if scheduler else "")


def format_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def trial_label(settings: dict) -> str:
    """The trial's grid values in words, e.g. "lr 3e-06, 900 steps"."""
    words = [WORDS.get(key, key.replace("_", " ") + " {}").format(
                 ("on" if value else "off") if isinstance(value, bool) else format_value(value))
             for key, value in settings.items()]
    return ", ".join(words) or "base settings"


def read_sweep_file(directory: Path) -> tuple[dict, str]:
    path = directory / SWEEP_COPY
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:  # the copy is only informative; a broken one must not stop the report
        data = None
    return (data if isinstance(data, dict) else {}), text


def read_trials(directory: Path) -> list[dict]:
    if not (directory / TRIALS).is_file():
        raise UserError(f"{directory}: no {TRIALS}; give the --output folder of `dreambooth sweep`")
    return list(read_trial_records(directory).values())


def read_images(directory: Path, trials: list[dict]) -> dict[tuple[str, Setting, str], list[Img]]:
    """(trial, setting, prompt) -> its images in seed order; files the manifest names but that are gone are left out."""
    images: dict[tuple[str, Setting, str], list[tuple[int, Img]]] = {}
    for trial in trials:
        folder = Path("samples") / trial["trial"]
        for row in read_jsonl(directory / folder / MANIFEST):
            src = (folder / str(row.get("file", ""))).as_posix()
            if row.get("file") and (directory / src).is_file():
                image = Img(src, f"{trial['trial']}, {row.get('prompt')}, seed {row.get('seed')}", 0)
                images.setdefault((trial["trial"], setting_of(row), str(row.get("prompt"))), []).append(
                    (int(row.get("seed") or 0), image))
    return {key: [image for _, image in sorted(value, key=lambda pair: pair[0])] for key, value in images.items()}


def read_losses(directory: Path, trials: list[dict]) -> dict[str, list[tuple[int, float, float]]]:
    """trial -> (step, loss, smoothed loss) up to its step; smoothed over the whole run so shared runs agree."""
    curves = {}
    for trial in trials:
        by_step = {}
        for row in read_jsonl(directory / str(trial.get("run", "")) / "metrics.jsonl"):
            loss = row.get("loss")
            if isinstance(row.get("step"), int) and isinstance(loss, (int, float)) and math.isfinite(loss):
                by_step[row["step"]] = float(loss)  # a resumed run logs some steps twice: the later line wins
        steps = sorted(by_step)
        smoothed = smooth_curve([by_step[s] for s in steps])
        points = [(s, by_step[s], m) for s, m in zip(steps, smoothed) if s <= int(trial.get("step") or 0)]
        if points:
            curves[trial["trial"]] = points
    return curves


def plot_losses(curves: dict[str, list[tuple[int, float, float]]], path: Path) -> None:
    """All smoothed curves on one plot; longer trials first and thicker, so a shorter trial of one run shows on top."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    figure = Figure(figsize=(8, 4.5), dpi=110, layout="constrained")
    axes = figure.add_subplot()
    order = sorted(curves, key=lambda name: -len(curves[name]))
    for i, name in enumerate(order):
        points = curves[name]
        low = min(points, key=lambda p: p[1])
        axes.plot([p[0] for p in points], [p[2] for p in points], linewidth=3.0 - 1.8 * i / max(len(order), 1),
                  linestyle=("-", "--", "-.", ":")[i % 4], marker="o" if len(points) < 20 else None,
                  label=f"{name} (lowest {low[1]:.4f} at step {low[0]})")
    axes.set(xlabel="training step", ylabel="loss (smoothed)", title="Training loss of every trial")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    with atomic_file(path) as tmp:  # readers see the old plot or the new one
        figure.savefig(tmp, format="png")


# The page ------------------------------------------------------------------------------------------------

def metric_text(entry: dict, key: str) -> str:
    mean, se = entry[key], entry[f"{key}_se"]
    if not math.isfinite(mean):
        return "–"
    return f"{mean:.3f}\u00a0±\u00a0{se:.3f}" if math.isfinite(se) else f"{mean:.3f}"


def sized(images: list[Img], width: int) -> list[Part]:
    return [Img(image.src, image.alt, width) for image in images]


@dataclass
class Folder:
    """What the report shows, read once from the sweep folder."""

    directory: Path
    trials: list[dict]
    labels: dict[str, str]  # trial -> its grid values in words
    images: dict[tuple[str, Setting, str], list[Img]]
    metric_rows: list[dict]
    ranked: list[dict]  # (trial, setting) entries in RULE order; empty when nothing was measured
    settings: list[Setting]
    prompts: list[str]
    class_prompts: set[str]
    seeds: int
    sweep_text: str


def read_folder(directory: Path) -> tuple[Folder, dict]:
    sweep, sweep_text = read_sweep_file(directory)
    trials = read_trials(directory)
    labels = {t["trial"]: trial_label(t.get("settings") or {}) for t in trials}
    images = read_images(directory, trials)
    metric_rows = [r for r in read_jsonl(directory / METRIC_ROWS) if r.get("trial") in labels]
    entries = summarize(metric_rows)
    # Rows without DINO and CLIP-T (evaluation skipped) cannot name a best model.
    scored = any(math.isfinite(e["dino"]) or math.isfinite(e["clip_t"]) for e in entries)
    ranked = rank_trials(entries) if scored else []
    prompts = list(dict.fromkeys(key[2] for key in images))
    # The plain class prompt (for PRES) has no metric rows of its own; the sweep file names it too.
    class_prompt = plain_class_prompt(sweep.get("class_prompt"), sweep.get("class"))
    measured = {str(r.get("prompt")) for r in metric_rows}
    class_prompts = {p for p in prompts if p == class_prompt or (measured and p not in measured)}
    folder = Folder(directory, trials, labels, images, metric_rows, ranked,
                    settings=list(dict.fromkeys([key[1] for key in images] + [e["setting"] for e in ranked])),
                    prompts=prompts, class_prompts=class_prompts,
                    seeds=max((len(v) for v in images.values()), default=0), sweep_text=sweep_text)
    return folder, sweep


def choose_prompt(folder: Folder, sweep: dict, prompt: str | None) -> str | None:
    """The seed table's prompt: the one asked for (placeholders allowed), else the first that is not the
    class prompt."""
    if prompt is None:
        return next((p for p in folder.prompts if p not in folder.class_prompts), next(iter(folder.prompts), None))
    filled = fill_prompt(prompt, str(sweep.get("identifier", "")), str(sweep.get("class", "")))
    if filled not in folder.prompts:
        raise UserError(f"--prompt {prompt!r}: not a prompt of this sweep; choose one of: " + "; ".join(folder.prompts))
    return filled


def summary(f: Folder) -> list[Block]:
    counts = {s: sum(t.get("status") == s for t in f.trials) for s in ("done", "pending", "failed")}
    blocks: list[Block] = [("h1", f"DreamBooth sweep: {f.directory.resolve().name}"), ("p", (
        f"{len(f.trials)} trials ({counts['done']} done, {counts['pending']} pending, {counts['failed']} failed), "
        f"each sampled with {len(f.settings)} setting(s), {len(f.prompts)} prompt(s) and {f.seeds} seed(s)."))]
    if not f.ranked:
        return blocks + [("lead", "Metrics: not measured (no DINO / CLIP-T rows in metrics.jsonl), so no best model "
                                  "is named; compare the images and loss curves below by eye.")]
    best = f.ranked[0]
    numbers = ", ".join(f"{METRICS[k]} {metric_text(best, k)}" for k in METRICS)
    return blocks + [("lead", f"Best model: {best['trial']} ({f.labels[best['trial']]}) sampled with "
                              f"{setting_label(best['setting'])}: {numbers}. Chosen for {reason(f.ranked)}.")]


def trials_table(f: Folder) -> list[Block]:
    keys = list(dict.fromkeys(k for t in f.trials for k in (t.get("settings") or {})))
    rows = [[t["trial"], *[format_value((t.get("settings") or {}).get(k, "")) for k in keys], str(t.get("run", "")),
             str(t.get("step", "")),
             str(t.get("status", "")) + (f": {str(t['error'])[:300]}" if t.get("error") else "")]
            for t in f.trials]
    return [("h2", "Trials"), ("table", ["Trial", *keys, "Run", "Step", "Status"], rows)]


def image_table(f: Folder, prompt: str | None) -> list[Block]:
    """The seed's table: one column per trial, one row per sampling setting, the images in the cells."""
    blocks: list[Block] = [("h2", "Images: every trial × sampling setting")]
    if prompt is None:
        return blocks + [("p", f"No images yet: no trial has a samples/<trial>/{MANIFEST}.")]
    names, width = [t["trial"] for t in f.trials], 200 if f.seeds <= 1 else 96
    empty = {t["trial"]: "–" if t.get("status") == "done" else str(t.get("status")) for t in f.trials}
    rows = [[setting_label(s), *[sized(f.images.get((n, s, prompt), []), width) or empty[n] for n in names]]
            for s in f.settings]
    command = f"dreambooth report {shlex.quote(str(f.directory))} --prompt \"...\""
    return blocks + [("p", f"Prompt: “{prompt}”, one image per seed. Another prompt: {command}."),
                     ("table", ["Sampling", *[f"{f.labels[n]}\n({n})" for n in names]], rows)]


def loss_section(f: Folder) -> list[Block]:
    curves = read_losses(f.directory, f.trials)
    if not curves:
        return [("h2", "Training loss"), ("p", "No loss logged yet (no runs/<run>/metrics.jsonl lines).")]
    plot_losses(curves, f.directory / LOSS_PLOT)
    rows = []
    for name, points in curves.items():
        low = min(points, key=lambda p: p[1])
        rows.append([name, str(len(points)), f"{low[1]:.4f} (step {low[0]})", f"{points[-1][2]:.4f}"])
    return [("h2", "Training loss"), ("img", Img(LOSS_PLOT, "training loss of every trial", 720)),
            ("table", ["Trial", "Logged steps", "Lowest loss (step)", "Final loss (smoothed)"], rows)]


def metrics_section(f: Folder) -> list[Block]:
    if not f.ranked:
        return [("h2", "Metrics"), ("p", "Not measured.")]
    div = sorted({str(r["div_metric"]) for r in f.metric_rows if r.get("div_metric")})
    rows = [[str(e["rank"]), e["trial"], setting_label(e["setting"]), *[metric_text(e, k) for k in METRICS],
             f"{e['mean_rank']:g} ({e['dino_rank']}, {e['clip_t_rank']})", str(e["n"])] for e in f.ranked]
    header = ["Rank", "Trial", "Sampling", *[f"{METRICS[k]} {BETTER[k]}" for k in METRICS],
              "Mean rank (DINO, CLIP-T)", "Images"]
    blocks: list[Block] = [("h2", "Metrics"), ("p", (
        "Mean ± standard error over prompts and seeds (PRES from the class prompt's images). DIV metric: "
        + (", ".join(DIV_NAMES.get(d, d) for d in div) or "not recorded") + ".")), ("p", RULE), ("table", header, rows)]
    measured = {e["trial"] for e in f.ranked}
    missing = [f"{t['trial']} ({t.get('status')})" for t in f.trials if t["trial"] not in measured]
    return blocks + ([("p", "Not measured: " + ", ".join(missing) + ".")] if missing else [])


def best_images(f: Folder) -> list[Block]:
    if not f.ranked:
        return []
    best = f.ranked[0]
    rows = [[p + ("\n(class prompt, for PRES)" if p in f.class_prompts else ""),
             sized(f.images.get((best["trial"], best["setting"], p), []), 160) or "–"] for p in f.prompts]
    return [("h2", f"Best model: {best['trial']}, {setting_label(best['setting'])}"),
            ("table", ["Prompt", "Images (one per seed)"], rows)]


def reproduce(f: Folder) -> list[Block]:
    folder = shlex.quote(str(f.directory))
    note = "" if f.sweep_text else f" ({SWEEP_COPY} was not saved in this folder: use the sweep file you ran.)"
    blocks: list[Block] = [
        ("h2", "Reproduce"),
        ("pre", f"dreambooth sweep {shlex.quote(str(f.directory / SWEEP_COPY))} --output {folder}\n"
                f"dreambooth report {folder}"),
        ("p", "The same --output continues a killed sweep and skips finished work; "
              "a new folder repeats it from scratch." + note)]
    return blocks + ([("h2", "Sweep file"), ("pre", f.sweep_text.rstrip())] if f.sweep_text else [])


def reason(ranked: list[dict]) -> str:
    best = ranked[0]
    text = (f"the best mean rank of DINO ({best['dino_rank']}) and CLIP-T ({best['clip_t_rank']}) = "
            f"{best['mean_rank']:g} among {len(ranked)} measured (trial, setting) pairs")
    tied = [e for e in ranked[1:] if e["mean_rank"] == best["mean_rank"]]
    if tied:
        other = tied[0]
        name = f"{other['trial']} with {setting_label(other['setting'])}"
        if math.isfinite(best["pres"]) and best["pres"] != other["pres"]:
            text += f"; it ties with {name} and wins on lower PRES ({best['pres']:.3f} vs {other['pres']:.3f})"
        else:
            text += f"; it ties with {name} on mean rank and PRES and wins on higher DINO"
    return text


def write_report(directory: Path, prompt: str | None = None) -> tuple[Path, Path]:
    """Write DIR/report.html and DIR/report.md (atomically) and DIR/report_files/loss.png; return the two reports."""
    directory = Path(directory)
    folder, sweep = read_folder(directory)
    chosen = choose_prompt(folder, sweep, prompt)
    blocks = (summary(folder) + trials_table(folder) + image_table(folder, chosen) + loss_section(folder)
              + metrics_section(folder) + best_images(folder) + reproduce(folder))
    paths = directory / "report.html", directory / "report.md"
    atomic_write_text(paths[0], render_html(blocks))
    atomic_write_text(paths[1], render_md(blocks))
    return paths


def report(config: ReportConfig) -> Path:
    """`dreambooth report DIR`: write the report of a sweep folder and print where it is."""
    directory = Path(config.directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: no such folder; give the --output folder of `dreambooth sweep`")
    html_path, md_path = write_report(directory, config.prompt)
    print(f"report: {html_path} (open it in a browser) and {md_path}")
    return html_path
