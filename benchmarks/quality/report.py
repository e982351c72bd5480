"""Summaries of the quality suite: per (task, optimizer) mean ± std over seeds, the gap to the 32-bit AdamW
reference in units of seed std, the Markdown table and the learning-curve plot.

Gap = (optimizer mean - reference mean) / pooled seed std, signed so that positive means worse (higher validation
loss, lower accuracy); pooled std = sqrt((s_opt² + s_ref²) / 2), so one lucky low-variance arm cannot shrink the unit.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

TOLERANCE_STD = {"adamw8": 1.0, "adamw4": 2.0}  # issue 4's bar: 8-bit within 1 seed std, 4-bit within 2


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _gap(mean: float, std: float, ref_mean: float, ref_std: float, worse_is_higher: bool) -> float | None:
    pooled = math.sqrt((std ** 2 + ref_std ** 2) / 2)
    diff = (mean - ref_mean) if worse_is_higher else (ref_mean - mean)
    if pooled == 0:
        return 0.0 if diff == 0 else None
    return diff / pooled


def summarize(payload: dict) -> list[dict]:
    reference = payload["reference"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in payload["runs"]:
        groups.setdefault((run["task"], run["optimizer"]), []).append(run)
    rows = []
    for (task, optimizer), runs in groups.items():
        loss_mean, loss_std = _mean_std([r["val_loss"] for r in runs])
        accs = [r["val_acc"] for r in runs if r["val_acc"] is not None]
        acc_mean, acc_std = _mean_std(accs) if accs else (None, None)
        rows.append(dict(task=task, optimizer=optimizer, label=payload["optimizers"][optimizer], seeds=len(runs),
                         val_loss_mean=loss_mean, val_loss_std=loss_std, val_acc_mean=acc_mean, val_acc_std=acc_std,
                         state_bytes_per_param=statistics.fmean(r["state_bytes_per_param"] for r in runs),
                         step_ms=statistics.median(r["step_ms"] for r in runs),
                         opt_step_ms=statistics.median(r["opt_step_ms"] for r in runs),
                         all_finite=all(r["finite"] for r in runs),
                         val_loss_by_seed={r["seed"]: r["val_loss"] for r in runs}))
    task_order, optimizer_order = list(payload["tasks"]), list(payload["optimizers"])
    rows.sort(key=lambda r: (task_order.index(r["task"]), optimizer_order.index(r["optimizer"])))
    by_key = {(r["task"], r["optimizer"]): r for r in rows}
    for row in rows:
        ref = by_key.get((row["task"], reference))
        row["loss_gap_std"] = row["acc_gap_std"] = None
        if ref is None:
            continue
        row["loss_gap_std"] = _gap(row["val_loss_mean"], row["val_loss_std"], ref["val_loss_mean"],
                                   ref["val_loss_std"], worse_is_higher=True)
        if row["val_acc_mean"] is not None:
            row["acc_gap_std"] = _gap(row["val_acc_mean"], row["val_acc_std"], ref["val_acc_mean"],
                                      ref["val_acc_std"], worse_is_higher=False)
    return rows


SHAMPOO_4BIT = ("shampoo4", "shampoo4_sr", "shampoo4_unrotated", "shampoo4_sr_unrotated")


def verdicts(rows: list[dict]) -> list[str]:
    """Issue 4's checks, one line each: low-bit AdamW gaps, and 4-bit Shampoo's share of 32-bit Shampoo's gain."""
    lines = []
    by_key = {(r["task"], r["optimizer"]): r for r in rows}
    for row in rows:
        tolerance = TOLERANCE_STD.get(row["optimizer"])
        if tolerance is None or row["loss_gap_std"] is None:
            continue
        gaps = [g for g in (row["loss_gap_std"], row["acc_gap_std"]) if g is not None]
        ok = all(g <= tolerance for g in gaps)
        lines.append(f"{row['task']}: {row['label']} gap {', '.join(f'{g:+.2f}' for g in gaps)} std "
                     f"(loss{', acc' if len(gaps) > 1 else ''}) -> {'within' if ok else 'MISSES'} {tolerance:g} std")
    for task in dict.fromkeys(r["task"] for r in rows):
        s32, ref = by_key.get((task, "shampoo32")), by_key.get((task, "torch_adamw"))
        for s4 in (by_key.get((task, k)) for k in SHAMPOO_4BIT):
            if not (s32 and s4 and ref):
                continue
            gain32 = ref["val_loss_mean"] - s32["val_loss_mean"]
            gain4 = ref["val_loss_mean"] - s4["val_loss_mean"]
            kept = f"{100 * gain4 / gain32:.0f}%" if gain32 > 0 else "n/a (32-bit Shampoo does not beat AdamW)"
            lines.append(f"{task}: Shampoo val-loss gain over AdamW 32-bit {gain32:+.4f}, {s4['label']} "
                         f"{gain4:+.4f}; keeps {kept}{_paired(s4, s32)}")
    return lines


def _paired(row: dict, base: dict) -> str:
    """Mean ± standard error of the per-seed val-loss difference (same seeds, same data order): tells a real loss
    from seed noise where the gains being compared are small."""
    seeds = sorted(set(row.get("val_loss_by_seed", {})) & set(base.get("val_loss_by_seed", {})))
    if len(seeds) < 2:
        return ""
    diffs = [row["val_loss_by_seed"][s] - base["val_loss_by_seed"][s] for s in seeds]
    return (f" (per-seed val loss minus 32-bit Shampoo's: {statistics.fmean(diffs):+.4f} ± "
            f"{statistics.stdev(diffs) / math.sqrt(len(diffs)):.4f} s.e.)")


def _fmt(mean, std, digits=4):
    return "n/a" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def title(environment: dict) -> str:
    """The report's heading: where it ran and at which settings (payloads from before the GPU mode: CPU, small)."""
    device = "CPU" if environment.get("device", "cpu") == "cpu" else "GPU"
    quick = ", quick" if environment.get("quick") else ""
    return f"# Quality suite ({device}, {environment.get('scale', 'small')} settings{quick})"


def markdown(payload: dict, rows: list[dict]) -> str:
    env = payload["environment"]
    where = (f"{env['device_name']}, " if env.get("device_name") else "") + (
        f"CUDA {env['cuda']}, " if env.get("cuda") else "")
    lines = [title(env), "",
             f"{where}torch {env['torch']}, {env['threads']} thread(s), "
             + (f"our first-order optimizers compiled (backend {env['compile_backend']}), the others eager"
                if env.get("compile_backend") else "optimizers run eagerly")
             + f"; reference for gaps: {payload['optimizers'][payload['reference']]}. Gap = (mean - ref mean) / "
             "pooled seed std, positive = worse.", ""]
    settings = env.get("settings", {})
    for task, info in payload["tasks"].items():
        line = f"- **{task}**: " + ", ".join(f"{k}={v}" for k, v in info.items() if k != "model")
        if task in settings:
            s = settings[task]
            line += (f"; batch {s['batch']}, model " + ", ".join(f"{k} {v}" for k, v in s["model"].items())
                     + f"; Shampoo T1={s['shampoo']['precondition_frequency']}, "
                       f"T2={s['shampoo']['inverse_root_frequency']}")
        lines.append(line)
    lines += ["", "| task | optimizer | seeds | val loss | val acc | loss gap (std) | acc gap (std) | state B/param "
              "| ms/step | opt ms/step |", "|" + "---|" * 10]
    for r in rows:
        gap = lambda g: "n/a" if g is None else f"{g:+.2f}"  # noqa: E731
        lines.append(f"| {r['task']} | {r['label']} | {r['seeds']} | {_fmt(r['val_loss_mean'], r['val_loss_std'])} | "
                     f"{_fmt(r['val_acc_mean'], r['val_acc_std'])} | {gap(r['loss_gap_std'])} | "
                     f"{gap(r['acc_gap_std'])} | {r['state_bytes_per_param']:.3f} | {r['step_ms']:.2f} | "
                     f"{r['opt_step_ms']:.2f} |")
    lines += ["", "## Checks (issue 4)", "", *(f"- {line}" for line in verdicts(rows)), ""]
    if payload.get("skipped"):
        lines += ["## Skipped (time budget)", "", "Not in the table: pairs whose seeds did not all run.", "",
                  *(f"- {s['task']} / {payload['optimizers'].get(s['optimizer'], s['optimizer'])}: "
                    f"{s['seeds_done']} of {s['seeds']} seeds ran" for s in payload["skipped"]), ""]
    return "\n".join(lines)


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in payload["tasks"] if any(r["task"] == t for r in payload["runs"])]
    if not tasks:  # every run cut off by the time budget
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.text(0.5, 0.5, "no (task, optimizer) pair completed", ha="center", va="center")
        ax.set_axis_off()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return
    columns = min(2, len(tasks))
    rows = math.ceil(len(tasks) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(7 * columns, 4.5 * rows), squeeze=False)
    styles = ("-", "--", "-.", ":")
    for ax in axes.flat[len(tasks):]:
        ax.set_visible(False)
    for ax, task in zip(axes.flat, tasks):
        optimizers = list(dict.fromkeys(r["optimizer"] for r in payload["runs"] if r["task"] == task))
        for i, optimizer in enumerate(optimizers):
            curves = [r["val_curve"] for r in payload["runs"] if r["task"] == task and r["optimizer"] == optimizer]
            steps = [point[0] for point in curves[0]]
            losses = [[curve[j][1] for curve in curves] for j in range(len(steps))]
            means = [statistics.fmean(v) for v in losses]
            stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in losses]
            line, = ax.plot(steps, means, styles[i % len(styles)], label=payload["optimizers"][optimizer])
            ax.fill_between(steps, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=line.get_color(), alpha=0.15)
        ax.set(title=task, xlabel="step", ylabel="validation loss (mean ± std over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(payload: dict, out: Path, name: str) -> None:
    rows = summarize(payload)
    payload["summary"] = rows
    payload["checks"] = verdicts(rows)
    (out / f"{name}.json").write_text(json.dumps(payload))
    (out / f"{name}.md").write_text(markdown(payload, rows))
    plot(payload, out / f"{name}.png")


if __name__ == "__main__":
    import sys

    source = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/quality.json")
    write(json.loads(source.read_text()), source.parent, source.stem)
