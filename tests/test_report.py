"""The sweep report: ranking rule, pooled statistics, the written files, and the page in real headless Chromium.

Everything runs on a synthetic sweep folder (PNGs drawn with PIL, hand-made metric rows), so no torch is needed.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from dreambooth.config import ReportConfig
from dreambooth.errors import UserError
from dreambooth.files import write_jsonl
from dreambooth.report import pooled, rank_trials, report, write_report

PROMPTS = ["a photo of miru cat by the sea", "a photo of miru cat <in> the forest & more"]  # <, & test escaping
CLASS_PROMPT = "a photo of a cat"
SETTINGS = [(30, 6.0), (50, 12.0)]
SEEDS = [0, 1]
BEST = "lr3e-06-steps900"


def run_loss(step: int, lr: float) -> float:
    """A decreasing loss with a deterministic wiggle: the lowest value up to step 600 differs from up to 900."""
    return 0.3 - (lr * 4e4) * step / 1000 + 0.01 * math.sin(step)


def make_sweep(root: Path, *, metrics: bool = True) -> Path:
    """2 runs, 4 trials (2 learning rates x 600/900 steps), 2 sampling settings, 2 prompts + the class prompt,
    2 seeds."""
    directory = root / "sweep-out"
    (directory).mkdir(parents=True)
    (directory / "sweep.yaml").write_text("identifier: miru\nclass: cat\nclass_prompt: a photo of a cat\n"
                                          "grid:\n  learning_rate: [1.0e-6, 3.0e-6]\n  max_train_steps: [600, 900]\n")
    trials = []
    for lr in (1e-06, 3e-06):
        run = f"runs/lr{lr:g}"
        write_jsonl(directory / run / "metrics.jsonl",
                    [{"step": s, "loss": run_loss(s, lr), "instance_loss": 0.1, "lr": lr, "seconds": s * 0.5}
                     for s in range(1, 901)])
        for steps in (600, 900):
            trials.append({"trial": f"lr{lr:g}-steps{steps}", "run": run, "step": steps,
                           "settings": {"learning_rate": lr, "max_train_steps": steps}, "status": "done"})
    write_jsonl(directory / "trials.jsonl", trials)
    rows = []
    for t, trial in enumerate(trials):
        manifest = []
        for (steps, guidance), p, seed in ((s, p, seed) for s in SETTINGS for p in range(3) for seed in SEEDS):
            file = f"images/s{steps}-g{guidance:g}-p{p}-seed{seed}.png"
            path = directory / "samples" / trial["trial"] / file
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32), (40 * t + 20, 60 * p + 30, 100 + 80 * seed)).save(path)
            manifest.append({"file": file, "prompt": (PROMPTS + [CLASS_PROMPT])[p], "negative_prompt": "", "seed": seed,
                             "steps": steps, "guidance": guidance, "scheduler": "ddim", "model": "m", "height": 32,
                             "width": 32})
        write_jsonl(directory / "samples" / trial["trial"] / "manifest.jsonl", manifest)
        Image.new("RGB", (64, 64), "gray").save(directory / "samples" / trial["trial"] / "grid.png")
        # Known numbers: DINO and CLIP-T grow with the trial index and the sampling setting, so BEST at (50, 12) wins.
        for s, (steps, guidance) in enumerate(SETTINGS):
            for p, prompt in enumerate(PROMPTS):
                value = 0.5 + 0.05 * t + 0.02 * s + 0.001 * p
                rows.append({"trial": trial["trial"], "steps": steps, "guidance": guidance, "scheduler": "ddim",
                             "prompt": prompt, "n": 2, "dino": value, "dino_se": 0.01, "clip_i": value + 0.2,
                             "clip_i_se": 0.01, "clip_t": value / 2, "clip_t_se": 0.005, "pres": 0.4, "pres_se": 0.02,
                             "div": 0.3, "div_se": 0.01, "div_metric": "1-dino"})
    if metrics:
        write_jsonl(directory / "metrics.jsonl", rows)
    return directory


def text_of(html_text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html_text))


class ImageSources(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def image_sources(html_text: str) -> list[str]:
    parser = ImageSources()
    parser.feed(html_text)
    return parser.sources


# The ranking rule and the pooled statistics -------------------------------------------------------------

def test_rank_by_mean_of_dino_and_clip_t_ranks():
    entries = [{"trial": "A", "dino": 0.70, "clip_t": 0.28, "pres": 0.5},
               {"trial": "B", "dino": 0.65, "clip_t": 0.31, "pres": 0.5},
               {"trial": "C", "dino": 0.60, "clip_t": 0.30, "pres": 0.5},
               {"trial": "D", "dino": 0.55, "clip_t": 0.25, "pres": 0.1}]
    ranked = rank_trials(entries)
    # DINO ranks A1 B2 C3 D4, CLIP-T ranks B1 C2 A3 D4 -> means A 2, B 1.5, C 2.5, D 4; D's low PRES cannot lift it.
    assert [e["trial"] for e in ranked] == ["B", "A", "C", "D"]
    assert [(e["dino_rank"], e["clip_t_rank"], e["mean_rank"]) for e in ranked] == [
        (2, 1, 1.5), (1, 3, 2), (3, 2, 2.5), (4, 4, 4)]
    assert [e["rank"] for e in ranked] == [1, 2, 3, 4]


def test_rank_ties_broken_by_lower_pres_then_higher_dino():
    # A and B tie on mean rank (1.5 each); B has the lower PRES, so it wins despite its lower DINO.
    pres_decides = [{"trial": "A", "dino": 0.9, "clip_t": 0.2, "pres": 0.6},
                    {"trial": "B", "dino": 0.8, "clip_t": 0.3, "pres": 0.5}]
    assert [e["trial"] for e in rank_trials(pres_decides)] == ["B", "A"]
    # Equal PRES: the higher DINO wins (listed second, so input order alone would not put it first).
    dino_decides = [{"trial": "B", "dino": 0.8, "clip_t": 0.3, "pres": 0.5},
                    {"trial": "A", "dino": 0.9, "clip_t": 0.2, "pres": 0.5}]
    assert [e["trial"] for e in rank_trials(dino_decides)] == ["A", "B"]
    # Equal values share a rank; unmeasured values rank last; unmeasured PRES loses a tie to a measured one.
    shared = rank_trials([{"trial": "X", "dino": 0.5, "clip_t": 0.3, "pres": None},
                          {"trial": "Y", "dino": 0.5, "clip_t": 0.3, "pres": 0.7},
                          {"trial": "Z", "dino": None, "clip_t": 0.9, "pres": 0.1}])
    assert [(e["trial"], e["dino_rank"], e["clip_t_rank"]) for e in shared] == [("Y", 1, 2), ("X", 1, 2), ("Z", 3, 1)]


def test_pooled_matches_direct_computation_over_all_values():
    rng = np.random.default_rng(0)
    groups = [rng.normal(0.6, 0.1, size=n) for n in (4, 7, 2, 3)]
    rows = [{"n": len(g), "dino": float(g.mean()), "dino_se": float(g.std(ddof=1) / math.sqrt(len(g)))} for g in groups]
    rows.append({"n": 5, "dino": None, "dino_se": None})  # a row without the metric is left out
    values = np.concatenate(groups)
    mean, se = pooled(rows, "dino")
    assert mean == pytest.approx(values.mean(), rel=1e-12)
    assert se == pytest.approx(values.std(ddof=1) / math.sqrt(len(values)), rel=1e-12)
    assert all(math.isnan(x) for x in pooled([], "dino"))


# The written report -----------------------------------------------------------------------------------

def test_report_names_best_trial_and_contains_every_trial(tmp_path, capsys):
    directory = make_sweep(tmp_path)
    html_path = report(ReportConfig(directory=str(directory)))
    assert html_path == directory / "report.html" and str(html_path) in capsys.readouterr().out
    html_text, md_text = html_path.read_text(), (directory / "report.md").read_text()
    for text in (text_of(html_text), md_text):
        assert re.search(rf"Best model: {BEST} \(lr 3e-06, 900 steps\) sampled with 50 steps, guidance 12", text)
        assert "best mean rank of DINO (1) and CLIP-T (1)" in text and "Ranking rule:" in text
        assert "1 − DINO cosine similarity" in text
        # One class-prompt measurement, repeated on every prompt's row, is counted once.
        assert "PRES 0.400 ± 0.020" in text.replace("\u00a0", " ")
        for trial in ("lr1e-06-steps600", "lr1e-06-steps900", "lr3e-06-steps600", BEST):
            assert trial in text
        assert f"dreambooth report {directory}" in text
    # The metrics table is ranked: BEST at (50, 12) first, then BEST at (30, 6).
    first_rows = re.findall(r"<tr><td>(\d+)</td><td>([^<]+)</td><td>([^<]+)</td>", html_text)[:2]
    assert first_rows == [("1", BEST, "50 steps, guidance 12, ddim"), ("2", BEST, "30 steps, guidance 6, ddim")]
    # Text is escaped: the prompt's "<in>" never becomes markup.
    assert "<in>" not in html_text and "&lt;in&gt; the forest &amp; more" in html_text


def test_every_image_resolves_and_tables_are_complete(tmp_path):
    directory = make_sweep(tmp_path)
    html_path, md_path = write_report(directory)
    sources = image_sources(html_path.read_text())
    assert sources and all((directory / unquote(src)).is_file() for src in sources)
    assert all(not src.startswith(("/", "http")) for src in sources)  # relative: works from a copied folder
    # Seed table: 4 trials x 2 settings x 2 seeds; best trial: 3 prompts x 2 seeds; the loss plot.
    assert len(sources) == 4 * 2 * 2 + 3 * 2 + 1
    assert sorted(image_sources(md_path.read_text())) == sorted(sources)
    # The default prompt of the seed table is the first non-class prompt; --prompt picks another.
    assert all("p0-seed" in s for s in sources[:16])
    write_report(directory, "a photo of {id} {class} <in> the forest & more")
    assert all("p1-seed" in s for s in image_sources(html_path.read_text())[:16])
    with pytest.raises(UserError, match="not a prompt of this sweep"):
        write_report(directory, "a photo of nobody")


def test_loss_plot_and_lowest_loss_up_to_each_trials_step(tmp_path):
    directory = make_sweep(tmp_path)
    _, md_path = write_report(directory)
    with Image.open(directory / "report_files" / "loss.png") as plot:
        assert plot.width > 300 and plot.height > 200
    md_text = md_path.read_text()
    for lr in (1e-06, 3e-06):
        for steps in (600, 900):
            low = min(range(1, steps + 1), key=lambda s: run_loss(s, lr))
            assert f"| lr{lr:g}-steps{steps} | {steps} | {run_loss(low, lr):.4f} (step {low}) |" in md_text


def test_a_runs_loss_plot_is_written_whole_and_skipped_without_records(tmp_path):
    from dreambooth.artifacts import write_loss_plot

    metrics, plot_path = tmp_path / "run" / "metrics.jsonl", tmp_path / "run" / "loss.png"
    assert write_loss_plot(metrics, plot_path) is None and not plot_path.exists()
    write_jsonl(metrics, [{"step": s, "loss": run_loss(s, 1e-6), "instance_loss": 0.1, "prior_loss": 0.05}
                          for s in range(1, 50)])
    assert write_loss_plot(metrics, plot_path) == plot_path
    with Image.open(plot_path) as plot:
        assert plot.format == "PNG" and plot.size == (700, 400)
        pixels = np.asarray(plot.convert("RGB")).reshape(-1, 1, 3).astype(int)
    # The loss (blue) and, with prior preservation, its instance (orange) and prior (green) terms are drawn.
    curves = np.array([[31, 119, 180], [255, 127, 14], [44, 160, 44]])
    assert (np.abs(pixels - curves).max(axis=2) < 30).any(axis=0).all()
    assert sorted(p.name for p in plot_path.parent.iterdir()) == ["loss.png", "metrics.jsonl"]  # no temp file


def test_report_degrades_without_metrics_losses_or_images(tmp_path):
    directory = make_sweep(tmp_path, metrics=False)
    trials = [json.loads(line) for line in (directory / "trials.jsonl").read_text().splitlines()]
    trials[0].update(status="failed", error="CUDA out of memory")
    trials.append({"trial": "lr1e-05-steps600", "run": "runs/lr1e-05", "step": 600,
                   "settings": {"learning_rate": 1e-05, "max_train_steps": 600}, "status": "pending"})
    write_jsonl(directory / "trials.jsonl", trials)
    shutil.rmtree(directory / "samples" / trials[0]["trial"])
    html_path, md_path = write_report(directory)
    text = text_of(html_path.read_text())
    assert "Metrics: not measured" in text and "Best model" not in text
    assert "failed: CUDA out of memory" in text and "lr1e-05-steps600" in md_path.read_text()
    assert all((directory / unquote(src)).is_file() for src in image_sources(html_path.read_text()))
    with pytest.raises(UserError, match="trials.jsonl"):
        write_report(tmp_path)
    with pytest.raises(UserError, match="no such folder"):
        report(ReportConfig(directory=str(tmp_path / "missing")))


def test_summary_explains_a_tie_broken_by_pres(tmp_path):
    directory = make_sweep(tmp_path)
    base = {"steps": 50, "guidance": 12, "scheduler": "ddim", "prompt": PROMPTS[0], "n": 4, "clip_i": 0.8,
            "div": 0.3, "div_metric": "lpips"}
    # A wins DINO, B wins CLIP-T: equal mean rank (1.5); B's lower PRES decides.
    write_jsonl(directory / "metrics.jsonl", [
        {**base, "trial": "lr1e-06-steps600", "dino": 0.7, "clip_t": 0.30, "pres": 0.60},
        {**base, "trial": "lr1e-06-steps900", "dino": 0.6, "clip_t": 0.32, "pres": 0.50}])
    _, md_path = write_report(directory)
    text = md_path.read_text()
    assert "Best model: lr1e-06-steps900" in text and "wins on lower PRES (0.500 vs 0.600)" in text
    assert "LPIPS distance" in text
    assert "Not measured: lr3e-06-steps600 (done), lr3e-06-steps900 (done)." in text


def test_report_never_imports_torch(tmp_path):
    directory = make_sweep(tmp_path)
    code = ("import sys; from pathlib import Path; import dreambooth.report as r; "
            f"r.write_report(Path({str(directory)!r})); assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# The page in a real browser ---------------------------------------------------------------------------

PROBE = """<script>window.addEventListener("load", () => {
  const images = Array.from(document.images);
  document.body.dataset.images = images.length;
  document.body.dataset.loaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.text = document.body.innerText.trim().length;
});</script>"""


def chromium() -> str:
    found = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if found is None:
        message = "headless Chromium not installed (apt-get install -y chromium)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must run this test")
        pytest.skip(message)
    return found


def run_chromium(tmp_path: Path, *args: str) -> str:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--virtual-time-budget=10000", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_page_in_headless_chromium_loads_every_image(tmp_path):
    directory = make_sweep(tmp_path)
    html_path, _ = write_report(directory)
    html_text = html_path.read_text()
    # The report itself has no script; a copy beside it (same relative paths) carries the probe.
    probe = directory / "probe.html"
    probe.write_text(html_text.replace("</body>", PROBE + "</body>"))
    dom = run_chromium(tmp_path, "--dump-dom", probe.as_uri())
    found = re.search(r'data-images="(\d+)" data-loaded="(\d+)" data-text="(\d+)"', dom)
    assert found, dom[:2000]
    images, loaded, text = map(int, found.groups())
    assert images == len(image_sources(html_text)) > 0
    assert loaded == images
    assert text > 500


def test_page_in_headless_chromium_is_not_blank(tmp_path):
    directory = make_sweep(tmp_path)
    html_path, _ = write_report(directory)
    shot = tmp_path / "page.png"
    run_chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2400", html_path.as_uri())
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("L"))
    assert pixels.shape == (2400, 1280)
    assert (pixels < 200).mean() > 0.02  # text, borders and images, not a white page
