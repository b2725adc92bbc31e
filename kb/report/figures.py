"""The report's figures: one function per plot, each taking plain numbers and returning a matplotlib figure.

Figures are saved as PNGs (save_figure) that report.html inlines; panels sit side by side per model or
test set (_grid), so models compare at a glance.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: reports are built on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from kb.metrics import DEFAULT_BINS, ece, is_initial_row, reliability_bins  # noqa: E402
from kb.report.load import IDK, ProbeSet, pretty  # noqa: E402

SELECTION_COLOURS = {"vanilla": "tab:blue", IDK: "tab:red", "dropped": "tab:gray"}
MAX_ARROWS = 400  # more arrows than this make the flow plot unreadable; a seeded subset is drawn
MAX_COLS = 3  # panels per row; more models or test sets wrap onto further rows
MARKERS = "osD^vP<>Xph"  # one marker shape per method in a panel, so coinciding points stay distinguishable


def save_figure(fig: Any, path: Path) -> None:
    """Write a figure as the report's PNG (fixed dpi, tight box) and free it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _grid(n: int, width: float, height: float, max_cols: int = MAX_COLS) -> tuple[Any, list[Any]]:
    """n panels side by side (wrapping after max_cols), so models compare at a glance; spare axes hidden."""
    cols = min(n, max_cols)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def fig_accuracy(sets: list[tuple[str, ProbeSet]]) -> Any:
    """Horizontal bars of accuracy per group, sorted, one panel per model."""
    n_groups = max(len(ps.by_group()) for _, ps in sets)
    fig, axes = _grid(len(sets), 6.0, max(2.5, 0.22 * n_groups + 1.5))
    for ax, (model, ps) in zip(axes, sets):
        rows = ps.by_group()[::-1]  # best on top
        y = np.arange(len(rows))
        ax.barh(y, [100 * a for _, _, a in rows], color="tab:blue", alpha=0.8)
        ax.set_yticks(y, [g for g, _, _ in rows], fontsize=7)
        for yi, (_, n, a) in zip(y, rows):  # right answers / questions: a 1/1 bar is not a 40/40 bar
            ax.text(min(100 * a, 88) + 1, yi, f"{round(a * n)}/{n}", va="center", fontsize=6)
        ax.axvline(100 * ps.accuracy, color="k", ls="--", lw=1, label=f"overall {100 * ps.accuracy:.1f}%")
        if ps.chance() is not None:
            ax.axvline(100 * ps.chance(), color="tab:red", ls=":", lw=1.2, label=f"chance {100 * ps.chance():.0f}%")
        ax.set_xlim(0, 100)
        ax.set_ylim(-0.6, len(rows) - 0.4)
        ax.set_xlabel("accuracy (%)")
        ax.set_title(f"{model}: {pretty(ps.name)}", fontsize=10)
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return fig


def fig_reliability(panels: list[tuple[str, np.ndarray, np.ndarray]], what: str) -> Any:
    """Reliability diagram per panel: accuracy per confidence bin against the diagonal, with ECE."""
    fig, axes = _grid(len(panels), 4.2, 4.2)
    for ax, (title, conf, correct) in zip(axes, panels):
        bins = reliability_bins(conf, correct)
        centres = [(b.lo + b.hi) / 2 for b in bins]
        acc = [b.accuracy if b.count else 0 for b in bins]
        ax.bar(centres, acc, width=1 / DEFAULT_BINS, edgecolor="k", color="tab:blue", alpha=0.75, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        for c, b in zip(centres, bins):
            if b.count:
                ax.text(c, 0.02, str(b.count), ha="center", fontsize=6, color="white" if (b.accuracy or 0) > 0.08 else "k")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel(f"{what} (bin)")
        ax.set_ylabel("fraction correct")
        ax.set_title(f"{title}\nECE = {ece(conf, correct):.3f}, n = {len(conf)}", fontsize=9)
        ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    return fig


def fig_state(panels: list[tuple[str, dict[str, dict[str, float]], dict[str, str] | None, float | None]]) -> Any:
    """Cor vs Cer of the source set, coloured by the CRaFT selection when known, with its τ_μ line."""
    fig, axes = _grid(len(panels), 5.0, 4.5)
    for ax, (title, state, sel, tau_mu) in zip(axes, panels):
        if tau_mu is not None:
            ax.axvline(tau_mu, color="k", ls="--", lw=0.8, label=f"τ_μ = {tau_mu:g} (known to the right)")
        groups: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for qid, s in state.items():
            groups[(sel.get(qid, "dropped") if sel is not None else "not selected yet")].append((s["cor"], s["cer"]))
        for label, pts in sorted(groups.items()):
            xy = np.asarray(pts)
            ax.scatter(xy[:, 0], xy[:, 1], s=9, alpha=0.6, color=SELECTION_COLOURS.get(label, "tab:purple"),
                       label=f"{label} ({len(pts)})")
        ax.set_xlabel("Cor (correctness of M0)")
        ax.set_ylabel("Cer (certainty of M0)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def fig_flow(panels: list[tuple[str, dict[str, dict[str, float]]]]) -> Any:
    """Arrows from each question's (Cor, Cer) under M0 to its place under the rehearsed M~."""
    fig, axes = _grid(len(panels), 5.0, 4.5)
    rng = np.random.default_rng(0)
    for ax, (title, flow) in zip(axes, panels):
        rows = np.asarray([[f["cor0"], f["cer0"], f["cor1"], f["cer1"]] for f in flow.values()])
        shown = rows if len(rows) <= MAX_ARROWS else rows[rng.choice(len(rows), MAX_ARROWS, replace=False)]
        d = shown[:, 2:] - shown[:, :2]
        up = d[:, 0] >= 0
        for mask, colour, label in ((up, "tab:green", "Cor rises or stays"), (~up, "tab:red", "Cor falls")):
            if mask.any():
                ax.quiver(shown[mask, 0], shown[mask, 1], d[mask, 0], d[mask, 1], angles="xy", scale_units="xy", scale=1,
                          width=0.003, color=colour, alpha=0.6, label=f"{label} ({int(mask.sum())})")
        ax.scatter(shown[:, 0], shown[:, 1], s=4, color="k", alpha=0.5)
        pad = 0.05
        ax.set_xlim(min(rows[:, [0, 2]].min(), 0) - pad, max(rows[:, [0, 2]].max(), 1) + pad)
        lo, hi = rows[:, [1, 3]].min(), rows[:, [1, 3]].max()
        ax.set_ylim(lo - pad * (hi - lo + 1e-9), hi + pad * (hi - lo + 1e-9))
        ax.set_xlabel("Cor")
        ax.set_ylabel("Cer")
        extra = f", {len(shown)} of {len(rows)} drawn" if len(shown) < len(rows) else ""
        ax.set_title(f"{title}{extra}", fontsize=9)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def fig_flow_density(panels: list[tuple[str, dict[str, dict[str, float]]]]) -> Any:
    """Before/after distributions of Cor and Cer: where the rehearsal moved the whole set, even when arrows are short."""
    fig, axes = _grid(2 * len(panels), 4.2, 3.4, max_cols=2)  # one row per model: Cor, Cer
    for k, (title, flow) in enumerate(panels):
        for ax, (key, label) in zip(axes[2 * k: 2 * k + 2], (("cor", "Cor"), ("cer", "Cer"))):
            before = np.asarray([f[f"{key}0"] for f in flow.values()])
            after = np.asarray([f[f"{key}1"] for f in flow.values()])
            lo, hi = min(before.min(), after.min()), max(before.max(), after.max())
            bins = np.linspace(lo, hi + 1e-9, 21)
            ax.hist(before, bins=bins, histtype="step", lw=1.8, color="tab:blue", label=f"M0 (mean {before.mean():.3f})")
            ax.hist(after, bins=bins, histtype="step", lw=1.8, ls="--", color="tab:orange", label=f"M̃ (mean {after.mean():.3f})")
            ax.set_xlabel(label)
            ax.set_ylabel("questions")
            ax.set_title(f"{title}: {label} before / after", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def fig_plane(panels: list[tuple[str, list[dict[str, Any]]]]) -> Any:
    """Per panel (model x test set) two axes: the (W, Pc) plane with interval whiskers and numbered points
    (names in the legend, so labels never overlap), and THS per method with its interval."""
    fig, axes = _grid(2 * len(panels), 4.6, 5.0, max_cols=2)
    for k, (title, rows) in enumerate(panels):
        ax, ax2 = axes[2 * k], axes[2 * k + 1]
        wrong = [r["Pw"] + r["P_fail"] for r in rows]
        top = max([r["Pc"] for r in rows] + wrong + [1.0]) * 1.15
        init = next((r for r in rows if is_initial_row(r["method"])), None)
        if init is not None and init["Pw"] + init["P_fail"] > 0:
            xs = np.linspace(0, top, 10)
            ax.plot(xs, xs * init["Pc"] / (init["Pw"] + init["P_fail"]), "k--", lw=1, label="THS = 0")
        for i, (r, w) in enumerate(zip(rows, wrong), start=1):
            ci = r["ci"]
            pc_err = np.array([[r["Pc"] - ci["Pc"][0]], [ci["Pc"][1] - r["Pc"]]]) if ci.get("Pc") else None
            ax.errorbar([w], [r["Pc"]], yerr=pc_err, fmt=MARKERS[(i - 1) % len(MARKERS)] if not is_initial_row(r["method"])
                        else "*", ms=7, capsize=2, lw=0.8, label=r["method"], zorder=3, alpha=0.85)
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.set_xlabel("W = Pw + P_fail: answered wrongly or unparseably (%)")
        ax.set_ylabel("Pc: answered correctly (%)")
        ax.set_title(title, fontsize=9)
        # names in a legend below the axes: points may coincide, their labels never overlap
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
        tuned = [r for r in rows if not is_initial_row(r["method"]) and r["THS"] is not None]
        ys = np.arange(len(tuned))
        for y, r in zip(ys, tuned):
            ci = r["ci"].get("THS")
            err = np.array([[r["THS"] - ci[0]], [ci[1] - r["THS"]]]) if ci else None
            ax2.errorbar([r["THS"]], [y], xerr=err, fmt="o", capsize=3, color="C0" if ci is None or ci[0] <= 0 <= ci[1]
                         else ("C2" if ci[0] > 0 else "C3"))
        ax2.axvline(0, color="k", lw=1, ls="--")
        ax2.set_yticks(ys, [r["method"] for r in tuned], fontsize=7)
        ax2.invert_yaxis()
        ax2.set_xlabel("THS vs the initial model (95% interval)")
        ax2.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def fig_transfer(panels: list[tuple[str, list[tuple[str, float, float]]]]) -> Any:
    """Per model: one point per method at (false-refusal rate, refusal rate on should-abstain questions)."""
    fig, axes = _grid(len(panels), 4.8, 5.3)
    for ax, (title, points) in zip(axes, panels):
        ax.plot([0, 100], [0, 100], "k:", lw=1, label="refuses regardless of the question")
        for i, (method, x, y) in enumerate(points):
            ax.scatter([x], [y], s=40, marker="*" if method.startswith("initial") else MARKERS[i % len(MARKERS)],
                       zorder=3, alpha=0.85, label=method)
        ax.set_xlim(-3, 103)
        ax.set_ylim(-3, 103)
        ax.set_xlabel("refused, should answer (%): false refusals")
        ax.set_ylabel("refused, should abstain (%)")
        ax.set_title(title, fontsize=9)
        # names in a legend below the axes: methods often share a point, their labels never overlap
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    fig.tight_layout()
    return fig


def fig_risk_coverage(curves: list[tuple[str, np.ndarray, np.ndarray, float]]) -> Any:
    """Risk (error rate of the kept answers) against coverage, answers kept most confident first."""
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for title, cov, risk, area in curves:
        ax.plot(cov, risk, lw=1.5, label=f"{title} (AURC {area:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("coverage (share of answers kept)")
    ax.set_ylabel("risk (error rate of kept answers)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig
