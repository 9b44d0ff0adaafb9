"""Cross-validation and evaluation reports: numbers (JSON, Markdown) and plots (PNG).

How the scores stay honest:

- Out-of-fold (OOF): each clip is scored once, by the one fold model that never saw it
  (not in its fit part, not in its inner validation split). Three variants per model:
  ``single`` (the clip as is), ``tta-arithmetic`` and ``tta-geometric`` (all time-shift
  views averaged by each rule).
- The combination shipped in the bundle is chosen on the inner validation splits (mean
  log loss over folds), never on the held-out folds, so the OOF score of the chosen
  variant is not inflated by the choice. The averaging rule chosen over views is also
  the rule for averaging fold models: the fold models cannot be compared on CV clips.
- The ensemble of all K fold models cannot be scored on the CV clips at all: each clip
  was in the training data of K-1 of them. It is scored only on a test set never used
  for training or selection (a recipe's group hold-out, or ``audioclf evaluate`` on a
  separate manifest); without one, the report says so instead of printing a number.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from audioclf._io import atomic_path, write_json_atomic, write_text_atomic
from audioclf.metrics import ECE_BINS, confusion_matrix, score_all

__all__ = ["build_cv_report", "score_ensemble_on_test", "evaluate_bundle", "write_report", "summary_text",
           "ENSEMBLE_NOTE"]

log = logging.getLogger(__name__)

METRICS = ("accuracy", "macro_f1", "log_loss", "ece")
ENSEMBLE_NOTE = ("The ensemble of the fold models is not scored on the cross-validation clips: every clip "
                 "was in the training data of all fold models but one. It is scored only on clips never "
                 "used for training or selection (a held-out test set, or `audioclf evaluate` on another "
                 "manifest). The averaging rule and TTA setting are chosen on the inner validation splits.")

HOLDOUT_NOTE = ("One model, fitted on the official training split, selected on the validation split and "
                "scored once on the test split: the scores above are the bundle's.")


def _targets(rows: list[dict], labels: list[str]) -> np.ndarray:
    index = {name: i for i, name in enumerate(labels)}
    return np.array([index[r["label"]] for r in rows], dtype=np.int64)


def build_cv_report(rows: list[dict], preds: dict[int, dict], summaries: list[dict], config: dict) -> dict:
    """Scores of every variant out-of-fold and on the inner validation splits; the choice.

    Args:
        rows: ``folds.csv`` rows (path, label, group, fold) of every clip.
        preds: fold -> arrays of ``predictions.npz`` (heldout_idx, heldout (V, n, K),
            val_idx, val (V, n_val, K)).
        summaries: the folds' ``fold.json`` dicts.
        config: the RunConfig dict.
    """
    from audioclf.bundle import VARIANTS, part_probs

    labels = summaries[0]["identity"]["labels"]
    targets = _targets(rows, labels)
    n_views = next(iter(preds.values()))["heldout"].shape[0]
    variants = VARIANTS if n_views > 1 else ("single",)
    folds = sorted(preds)
    oof, inner = {}, {}
    for v in variants:
        per_fold = [score_all(targets[preds[f]["heldout_idx"]], part_probs(preds[f], "heldout", v)) for f in folds]
        idx = np.concatenate([preds[f]["heldout_idx"] for f in folds])
        pooled = np.concatenate([part_probs(preds[f], "heldout", v) for f in folds])
        oof[v] = {"pooled": score_all(targets[idx], pooled), "per_fold": per_fold,
                  "mean": {m: float(np.mean([s[m] for s in per_fold])) for m in METRICS},
                  "std": {m: sample_std([s[m] for s in per_fold]) for m in METRICS}}
        val = [score_all(targets[preds[f]["val_idx"]], part_probs(preds[f], "val", v)) for f in folds]
        inner[v] = {m: float(np.mean([s[m] for s in val])) for m in METRICS}
    selection = _select(inner, summaries[0]["tta_shifts"])
    chosen = selection["variant"]
    idx = np.concatenate([preds[f]["heldout_idx"] for f in folds])
    pooled = np.concatenate([part_probs(preds[f], "heldout", chosen) for f in folds])
    return {
        "protocol": "k-fold" if len(folds) > 1 else "holdout",
        "n_clips": int(len(idx)),
        "n_folds": len(folds),
        "labels": labels,
        "ece_bins": ECE_BINS,
        "oof": oof,
        "inner_validation": inner,
        "selection": selection,
        "confusion_matrix": confusion_matrix(targets[idx], pooled).tolist(),
        "folds": [{"fold": s["fold"], "n_fit": s["n_fit"], "n_val": s["n_val"], "n_heldout": s["n_heldout"],
                   **s["train"]} for s in summaries],
        "ensemble_test": None,
        "ensemble_note": ENSEMBLE_NOTE if len(folds) > 1 else HOLDOUT_NOTE,
        "config": config,
    }


def sample_std(values) -> float:
    """Sample standard deviation (ddof=1) of per-fold scores; 0.0 for a single fold."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _select(inner: dict[str, dict], shifts: list[int]) -> dict:
    """Lowest mean inner-validation log loss; ties prefer geometric, then TTA."""
    preference = ["tta-geometric", "tta-arithmetic", "single"]
    variant = min(inner, key=lambda v: (round(inner[v]["log_loss"], 12), preference.index(v)))
    if variant == "single":
        tta = [v for v in inner if v != "single"]
        rule = min(tta, key=lambda v: (inner[v]["log_loss"], preference.index(v))).removeprefix("tta-") \
            if tta else "geometric"
    else:
        rule = variant.removeprefix("tta-")
    return {"criterion": "lowest mean log loss on the inner validation splits", "variant": variant,
            "rule": rule, "tta_shifts": shifts if variant != "single" else [0]}


def score_ensemble_on_test(test_rows: list[dict], preds: dict[int, dict], labels: list[str]) -> dict:
    """Every fold model on the test set, averaged by each rule, with and without TTA.

    As in ``audioclf predict``: every (model, view) pair of a window is combined by the
    rule, then a clip's windows are averaged (:func:`audioclf.bundle.window_mean`).
    """
    from audioclf.bundle import window_mean
    from audioclf.ensemble import RULES, combine_log_probs

    targets = _targets(test_rows, labels)
    folds = sorted(preds)
    lp = np.stack([preds[f]["test"] for f in folds])  # (M, V, W, K)
    clip_of = preds[folds[0]].get("test_clip")  # the same windows for every fold model
    scores = {}
    for rule in RULES:
        scores[rule] = score_all(targets, window_mean(combine_log_probs(lp[:, :1], rule), clip_of))
        if lp.shape[1] > 1:
            scores[f"tta-{rule}"] = score_all(targets, window_mean(combine_log_probs(lp, rule), clip_of))
    return {"n_clips": int(len(targets)), "n_models": int(lp.shape[0]), "scores": scores, "chosen": None}


def chosen_key(selection: dict) -> str:
    return ("tta-" if len(selection["tta_shifts"]) > 1 else "") + selection["rule"]


SCORING_NOTE = ("Each file is scored as `audioclf predict` scores it: a clip no longer than the training clip is "
                "padded like training and scored once; a longer one in sliding windows of the training clip "
                "length (hop: half a window) whose probabilities are averaged. Cross-validation scores its "
                "held-out and test clips the same way.")


def evaluate_bundle(bundle_dir, manifest, out_dir, device: str = "auto", batch_size: int = 16,
                    command: str | None = None) -> dict:
    """Score a bundle's ensemble on every clip of ``manifest``; write the report into ``out_dir``.

    Files are streamed through the bundle's :class:`~audioclf.predict.Predictor` (see
    :data:`SCORING_NOTE`), so memory stays bounded whatever their length. A file that
    cannot be read is recorded (``report["failed"]`` and the ``error`` column of
    ``predictions.csv``) and the others are still scored; the metrics cover the scored clips.

    Returns:
        The report dict: ``scores`` (None when no clip could be scored), ``confusion_matrix``,
        ``n_clips`` scored, ``n_failed`` and ``failed`` (path and error of each).

    Raises:
        ManifestError: the manifest has labels the bundle does not know (named).
        BundleError: see :func:`audioclf.bundle.read_bundle` and :func:`audioclf.bundle.load_models`.
    """
    from audioclf._io import atomic_open
    from audioclf.bundle import read_bundle, versions
    from audioclf.errors import ManifestError
    from audioclf.predict import Predictor

    bundle = read_bundle(bundle_dir)
    unknown = sorted({r.label for r in manifest.records} - set(bundle.labels))
    if unknown:
        raise ManifestError(f"the manifest has labels the bundle was not trained on: {', '.join(unknown)} "
                            f"(bundle labels: {', '.join(bundle.labels)})")
    predictor = Predictor.from_bundle(bundle.path, device=device, batch_size=batch_size)
    results = predictor.predict([manifest.abspath(i) for i in range(len(manifest))], top_k=1)
    targets = _targets([{"label": r.label} for r in manifest.records], bundle.labels)
    scored = [i for i, r in enumerate(results) if r.error is None]
    failed = [{"path": manifest.records[i].path, "error": r.error} for i, r in enumerate(results) if r.error]
    for f in failed:
        log.warning("not scored: %s", f["error"])
    k = len(bundle.labels)
    probs = np.stack([results[i].probs for i in scored]) if scored else np.zeros((0, k))
    report = {"protocol": "evaluation", "bundle": str(bundle.path), "n_clips": len(scored),
              "n_failed": len(failed), "failed": failed, "labels": bundle.labels, "rule": bundle.rule,
              "tta_shifts": bundle.tta_shifts, "scoring": SCORING_NOTE, "ece_bins": ECE_BINS,
              "scores": score_all(targets[scored], probs) if scored else None,
              "confusion_matrix": (confusion_matrix(targets[scored], probs) if scored
                                   else np.zeros((k, k), dtype=np.int64)).tolist(),
              "command": command, "versions": versions()}
    out_dir = Path(out_dir)
    with atomic_open(out_dir / "predictions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", "label", "predicted", *(f"p_{name}" for name in bundle.labels), "error"])
        for record, r in zip(manifest.records, results):
            if r.error:
                writer.writerow([record.path, record.label, "", *[""] * k, r.error])
            else:
                writer.writerow([record.path, record.label, bundle.labels[int(r.probs.argmax())],
                                 *(f"{x:.6f}" for x in r.probs), ""])
    write_report(out_dir, report)
    return report


# ---------------------------------------------------------------- writing


def write_report(folder, report: dict, curves: dict[int, Path] | None = None) -> None:
    """``report.json``, ``report.md`` and the plots into ``folder``."""
    folder = Path(folder)
    write_json_atomic(folder / "report.json", report)
    write_text_atomic(folder / "report.md", markdown(report))
    labels = report["labels"]
    _plot_confusion(folder / "confusion.png", np.array(report["confusion_matrix"]), labels)
    if "oof" in report:
        _plot_fold_scores(folder / "fold_scores.png", report)
    if curves:
        _plot_curves(folder / "curves.png", curves)


def _fmt(scores: dict) -> str:
    return " | ".join(f"{scores[m]:.4f}" for m in METRICS)


def markdown(report: dict) -> str:
    """The report as Markdown tables."""
    head = "| | accuracy | macro-F1 | log loss | ECE |\n|---|---|---|---|---|"
    lines = [f"# audioclf report ({report.get('protocol', 'evaluation')})", ""]
    if "oof" in report:
        sel = report["selection"]
        lines += [f"{report['n_clips']} clips, {report['n_folds']} fold(s), {len(report['labels'])} labels. "
                  f"ECE over {report['ece_bins']} equal-width bins.", "",
                  "## Out-of-fold, one fold model per clip (mean ± sample std over folds)", "",
                  "The ± is the sample standard deviation (ddof=1) of the per-fold scores.", "", head]
        for v, s in report["oof"].items():
            cells = " | ".join(f"{s['mean'][m]:.4f} ± {s['std'][m]:.4f}" for m in METRICS)
            lines.append(f"| {v}{' (chosen)' if v == sel['variant'] else ''} | {cells} |")
        lines += ["", "## Per fold (chosen variant)", "", head.replace("| |", "| fold |")]
        for f, s in zip(report["folds"], report["oof"][sel["variant"]]["per_fold"]):
            lines.append(f"| {f['fold']} | {_fmt(s)} |")
        lines += ["", "## Inner validation (selection data)", "", head]
        lines += [f"| {v} | {_fmt(s)} |" for v, s in report["inner_validation"].items()]
        lines += ["", "## Bundle", "", f"Rule: **{sel['rule']}**, TTA shifts (samples): {sel['tta_shifts']}; "
                  f"chosen by {sel['criterion']}.", "", "## Ensemble of the fold models", ""]
        test = report.get("ensemble_test")
        if test:
            lines += [f"On {test['n_clips']} held-out test clips ({test['n_models']} models):", "", head]
            lines += [f"| {k}{' (chosen)' if k == chosen_key(sel) else ''} | {_fmt(s)} |"
                      for k, s in test["scores"].items()]
            lines.append("")
        lines.append(report["ensemble_note"])
    else:
        lines += _evaluation_markdown(report, head)
    if report.get("command") or report.get("versions"):
        versions = ", ".join(f"{name} {v}" for name, v in (report.get("versions") or {}).items())
        lines += ["", "## Provenance", "", f"Command: `{report.get('command') or 'library call'}`", ""]
        lines += _fold_commands_markdown(report)
        lines.append(f"Versions: {versions}")
    return "\n".join(lines) + "\n"


def _evaluation_markdown(report: dict, head: str) -> list[str]:
    lines = [f"{report['n_clips']} clips scored by the bundle's ensemble "
             f"({report['rule']} mean, TTA shifts {report['tta_shifts']}). ECE over {report['ece_bins']} "
             "equal-width bins.", ""]
    if report.get("scoring"):
        lines += [report["scoring"], ""]
    if report["scores"] is not None:
        lines += [head, f"| ensemble | {_fmt(report['scores'])} |"]
    else:
        lines.append("No clip could be scored.")
    failed = report.get("failed") or []
    if failed:
        shown = 20
        lines += ["", f"**{len(failed)} file(s) could not be read** and are not in the scores:", ""]
        lines += [f"- `{f['path']}`: {f['error']}" for f in failed[:shown]]
        if len(failed) > shown:
            lines.append(f"- ... {len(failed) - shown} more (see report.json or predictions.csv)")
    return lines


def _fold_commands_markdown(report: dict) -> list[str]:
    """The commands that trained the folds, when they are not the command above (fold jobs)."""
    by_command: dict[str, list[str]] = {}
    for fold, cmd in (report.get("fold_commands") or {}).items():
        by_command.setdefault(cmd or "library call", []).append(fold)
    if not by_command or list(by_command) == [report.get("command") or "library call"]:
        return []
    lines = ["Fold models trained by:", ""]
    lines += [f"- fold{'s' if len(folds) > 1 else ''} {', '.join(folds)}: `{cmd}`" for cmd, folds in by_command.items()]
    return lines + [""]


def summary_text(report: dict) -> str:
    """A few lines for the terminal."""
    if "oof" not in report:
        s = report["scores"]
        text = (f"{report['n_clips']} clips: accuracy {s['accuracy']:.4f}, macro-F1 {s['macro_f1']:.4f}, "
                f"log loss {s['log_loss']:.4f}, ECE {s['ece']:.4f}" if s else "no clip could be scored")
        if report.get("n_failed"):
            text += f"\n{report['n_failed']} file(s) could not be read (listed in the report)"
        return text
    sel = report["selection"]
    s = report["oof"][sel["variant"]]
    lines = [f"out-of-fold ({sel['variant']}): accuracy {s['mean']['accuracy']:.4f} ± {s['std']['accuracy']:.4f}, "
             f"macro-F1 {s['mean']['macro_f1']:.4f}, log loss {s['mean']['log_loss']:.4f}, "
             f"ECE {s['mean']['ece']:.4f}",
             f"bundle: {sel['rule']} mean, {len(sel['tta_shifts'])} TTA view(s)"]
    if report.get("ensemble_test"):
        t = report["ensemble_test"]["scores"][chosen_key(sel)]
        lines.append(f"ensemble on {report['ensemble_test']['n_clips']} test clips: accuracy {t['accuracy']:.4f}, "
                     f"log loss {t['log_loss']:.4f}")
    return "\n".join(lines)


# ---------------------------------------------------------------- plots


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig, path: Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def _plot_confusion(path: Path, cm: np.ndarray, labels: list[str]) -> None:
    k = len(labels)
    fig = _figure(max(4, 0.5 * k + 2), max(3.5, 0.5 * k + 1.5))
    ax = fig.add_subplot()
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), labels, rotation=90 if k > 8 else 0)
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, label="fraction of true class")
    _save(fig, path)


def _plot_fold_scores(path: Path, report: dict) -> None:
    fig = _figure(8, 3)
    per_fold = {v: s["per_fold"] for v, s in report["oof"].items()}
    folds = [f["fold"] for f in report["folds"]]
    for ax, metric in zip(fig.subplots(1, 2), ("accuracy", "log_loss")):
        width = 0.8 / len(per_fold)
        for i, (v, scores) in enumerate(per_fold.items()):
            ax.bar(np.arange(len(folds)) + i * width, [s[metric] for s in scores], width, label=v)
        ax.set_xticks(np.arange(len(folds)) + 0.4 - width / 2, [str(f) for f in folds])
        ax.set_xlabel("held-out fold")
        ax.set_title(metric)
    ax.legend(fontsize=7)
    _save(fig, path)


def read_curves(path: Path) -> dict[str, list[float]]:
    """Numeric columns of a ``metrics.csv`` (one row per epoch)."""
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns: dict[str, list[float]] = {}
    for name in rows[0] if rows else []:
        try:
            columns[name] = [float(r[name]) if r[name] not in ("", None) else float("nan") for r in rows]
        except ValueError:
            continue
    return columns


def _plot_curves(path: Path, curves: dict[int, Path]) -> None:
    """Losses (left) and other validation metrics (right) per epoch, one line per fold."""
    fig = _figure(9, 3.2)
    left, right = fig.subplots(1, 2)
    for i, (fold, csv_path) in enumerate(sorted(curves.items())):
        cols = read_curves(Path(csv_path))
        x = cols.get("epoch", list(range(1, 1 + len(next(iter(cols.values()), [])))))
        for name, values in cols.items():
            if name == "epoch" or "lr" in name or "time" in name or "seconds" in name:
                continue
            ax = left if "loss" in name else right
            style = "--" if name.startswith("train") else "-"  # one colour per fold
            ax.plot(x, values, style, color=f"C{i % 10}", marker=".", label=f"fold {fold} {name}")
    for ax, title in ((left, "loss"), (right, "validation metrics")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        if ax.lines:
            ax.legend(fontsize=6)
    _save(fig, path)
