"""tune.html: a study's trials on one self-contained page (report_html's style): the validation accuracy of each
trial and the best so far, each trial's accuracy per epoch (where the pruner stopped it), the importance of each
parameter, the accuracy against each parameter, the best run's curves, and the table of trials."""
from __future__ import annotations

import tempfile
from datetime import datetime
from pathlib import Path

from .report import plot_curves, plt, save_figure
from .report_html import card_row, esc, image_tag, pct, table, write_page
from .runfolder import RunFolder
from .version import __version__

STATE_STYLE = {"complete": ("o", "C0"), "pruned": ("x", "C1"), "fail": ("v", "C3"), "running": ("s", "C7"),
               "waiting": ("s", "C7")}


def write_tune_page(path: str | Path, study, result: dict, fields: list[str]) -> Path:
    trials = study.get_trials(deepcopy=False)
    with tempfile.TemporaryDirectory(prefix="cnnkit-tune-") as tmp:
        pictures = {"trials": plot_trials(trials, Path(tmp) / "trials.png"),
                    "params": plot_params(trials, fields, result["space"], Path(tmp) / "params.png")}
        if result.get("importances"):
            pictures["importances"] = plot_importances(result["importances"], Path(tmp) / "importances.png")
        best = result.get("best")
        history = RunFolder(best["run_dir"], echo=None, quiet=True).read_history() if best else []
        if history:
            pictures["curves"] = plot_curves(history, Path(tmp) / "curves.png", f"best trial ({best['trial']})")
        parts = page_parts(study, result, fields, trials, {k: image_tag(v, k) for k, v in pictures.items()})
    return write_page(path, f"cnnkit tune: {study.study_name}", parts)


def page_parts(study, result: dict, fields: list[str], trials: list, images: dict[str, str]) -> list[str]:
    s, best = result["states"], result.get("best")
    parts = [f"<h1>Tuning study {esc(study.study_name)}</h1>",
             f'<p class="muted">{esc(result["storage"])} · written {datetime.now().strftime("%Y-%m-%d %H:%M")} '
             f"by cnnkit {esc(__version__)} · the objective is each trial's best validation accuracy</p>"]
    parts.append(card_row([("trials", str(len(trials))), ("complete", str(s.get("complete", 0))),
                           ("pruned", str(s.get("pruned", 0))), ("failed", str(s.get("fail", 0))),
                           ("best val acc", pct(best["val_accuracy"]) if best else "–"),
                           ("its test acc", pct(best.get("test_accuracy")) if best else "–")]))
    if best:
        tuned = ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in best["params"].items())
        parts.append(f"<p>Best: trial {best['trial']} ({esc(tuned)}), in {esc(best['run_dir'])}; "
                     "<code>cnnkit train --config best.yaml</code> trains it again.</p>")
    parts += ["<h2>Trials</h2>", images["trials"]]
    if "importances" in images:
        parts += ["<h2>Parameter importance</h2>",
                  '<p class="muted">fANOVA (Optuna): the share of the variance of validation accuracy over the '
                  "complete trials that each parameter explains.</p>", images["importances"]]
    parts += ["<h2>Accuracy against each parameter</h2>", images["params"]]
    if "curves" in images:
        parts += ["<h2>The best run's curves</h2>", images["curves"]]
    rows = [[t.number, t.state.name.lower(), pct(t.value) if t.value is not None else "–", len(t.intermediate_values),
             *[fmt(t.params.get(f)) for f in fields], pct(t.user_attrs.get("test_accuracy")),
             t.user_attrs.get("run_dir", "")] for t in trials]
    parts += ["<h2>Every trial</h2>", table(["trial", "state", "val acc", "epochs", *fields, "test acc", "run folder"],
                                            rows, text_columns=(1, len(fields) + 5), wrap_columns=(len(fields) + 5,))]
    return parts


def fmt(v) -> str:
    return "–" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def trial_value(t) -> float | None:
    """A complete trial's objective; a pruned one's last reported accuracy (where it stopped)."""
    if t.value is not None:
        return t.value
    return t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None


def plot_trials(trials: list, path: Path) -> Path:
    """Left: each trial's accuracy, by state, and the best so far. Right: each trial's accuracy per epoch."""
    fig, (ax, ax_epochs) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for state, (marker, colour) in STATE_STYLE.items():
        pts = [(t.number, trial_value(t)) for t in trials
               if t.state.name.lower() == state and trial_value(t) is not None]
        if pts:
            ax.plot(*zip(*pts), marker, color=colour, label=state, linestyle="none")
    best, line = None, []
    for t in trials:
        if t.state.name.lower() == "complete" and t.value is not None:
            best = t.value if best is None else max(best, t.value)
        line.append((t.number, best))
    if any(b is not None for _, b in line):
        ax.step(*zip(*[(n, b) for n, b in line if b is not None]), where="post", color="C2", label="best so far")
    ax.set(xlabel="trial", ylabel="validation accuracy", title="trials")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    for t in trials:
        if t.intermediate_values:
            steps = sorted(t.intermediate_values)
            pruned = t.state.name.lower() == "pruned"
            ax_epochs.plot(steps, [t.intermediate_values[s] for s in steps], "x--" if pruned else "o-",
                           color="C1" if pruned else "C0", alpha=0.7)
    ax_epochs.set(xlabel="epoch", ylabel="validation accuracy", title="per epoch (pruned: orange, dashed)")
    ax_epochs.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_importances(values: dict[str, float], path: Path) -> Path:
    names = sorted(values, key=values.get)
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * len(names)), dpi=100)
    ax.barh(names, [values[n] for n in names], color="C0")
    ax.set(xlabel="importance (share of variance)", xlim=(0, 1))
    ax.grid(alpha=0.3, axis="x")
    return save_figure(fig, path)


def plot_params(trials: list, fields: list[str], space: dict, path: Path) -> Path:
    cols = min(3, len(fields))
    rows = -(-len(fields) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 3.2 * rows), dpi=100, squeeze=False)
    for ax, name in zip(axes.flat, fields):
        for state, (marker, colour) in STATE_STYLE.items():
            pts = [(t.params[name], trial_value(t)) for t in trials
                   if t.state.name.lower() == state and name in t.params and trial_value(t) is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot([str(x) for x in xs] if "choice" in space[name] else xs, ys, marker, color=colour,
                        linestyle="none", label=state)
        if set(space[name]) & {"log_uniform", "log_int"}:
            ax.set_xscale("log")
        ax.set(xlabel=name, ylabel="validation accuracy")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(fields):]:
        ax.axis("off")
    return save_figure(fig, path)
