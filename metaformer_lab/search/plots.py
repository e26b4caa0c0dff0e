"""The Pareto plot of a search: score against latency, the budget, the front, the reference points."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import optuna

from metaformer_lab.search.study import Outcome, feasible, front, scored


def pareto_plot(study: optuna.Study, path: Path, report: dict[str, Any]) -> Path:
    """Write ``path`` (PNG): every trial with a score and a latency, the budget line, the front of the
    feasible ones, hand-designed reference points labelled, re-measured finalists linked to their prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    budget = report.get("budget_ms")
    trials = [t for t in study.get_trials(deepcopy=False) if "score" in t.user_attrs and "latency_ms" in t.user_attrs]
    over = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("reason") == Outcome.OVER_BUDGET
            and "score" not in t.user_attrs and not t.user_attrs.get("reference")]
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    ok = [t for t in trials if feasible(t) and not t.user_attrs.get("reference")]
    ax.scatter([t.user_attrs["latency_ms"] for t in ok], [t.user_attrs["score"] for t in ok], s=18, color="tab:blue",
               alpha=0.7, label="searched (within budget)")
    if over:
        ax.scatter([t.user_attrs["latency_ms"] for t in over], [0.01] * len(over), s=14, marker="|", color="tab:gray",
                   transform=ax.get_xaxis_transform(), label="rejected over budget (not evaluated)")
    pareto = front(scored(study))
    if pareto:
        ax.plot([t.user_attrs["latency_ms"] for t in pareto], [t.user_attrs["score"] for t in pareto], "-o",
                color="tab:orange", ms=5, lw=1.5, label="Pareto front")
    latest = {t.user_attrs["reference"]: t for t in study.get_trials(deepcopy=False)
              if t.user_attrs.get("reference") and "latency_ms" in t.user_attrs}  # a reference scored later wins
    refs = [t for t in latest.values() if "score" in t.user_attrs]
    for k, t in enumerate(sorted(refs, key=lambda t: t.user_attrs["latency_ms"])):
        y = t.user_attrs["score"]
        ax.scatter([t.user_attrs["latency_ms"]], [y], marker="*", s=140, color="tab:red", zorder=5)
        ax.annotate(t.user_attrs["reference"], (t.user_attrs["latency_ms"], y), textcoords="offset points",
                    xytext=(6, 4 if k % 2 == 0 else -11), fontsize=8, color="tab:red")  # neighbours alternate
    if refs:
        ax.scatter([], [], marker="*", s=140, color="tab:red", label="reference models")
    placed = sorted((t for t in latest.values() if "score" not in t.user_attrs),
                    key=lambda t: t.user_attrs["latency_ms"])
    if placed:  # no score: along the bottom of the axes, at their latency
        along = ax.get_xaxis_transform()
        xs = [t.user_attrs["latency_ms"] for t in placed]
        ax.scatter(xs, [0.03] * len(xs), transform=along, marker="*", s=110, facecolors="none",
                   edgecolors="tab:red", zorder=5, label="references over budget (latency only, not scored)")
        for t in placed:  # upright names: neighbours a few percent apart stay readable
            ax.annotate(t.user_attrs["reference"], (t.user_attrs["latency_ms"], 0.03), xycoords=along,
                        textcoords="offset points", xytext=(0, 7), fontsize=6, color="tab:red", rotation=90,
                        ha="center", va="bottom")
    finalists = report.get("finalists", {})
    by_number = {t.number: t for t in trials}
    for number, m in finalists.items():
        finalist = by_number.get(int(number))
        if finalist is None or m.get("measured_ms") is None:
            continue
        score = finalist.user_attrs["score"]
        color = "tab:green" if m.get("within_budget", True) else "tab:purple"
        ax.annotate("", xy=(m["measured_ms"], score), xytext=(finalist.user_attrs["latency_ms"], score),
                    arrowprops={"arrowstyle": "->", "color": color})
        ax.scatter([m["measured_ms"]], [score], marker="D" if color == "tab:green" else "X", s=34, color=color,
                   zorder=6)
    measured = [m for m in finalists.values() if m.get("measured_ms") is not None]
    if measured:
        ax.scatter([], [], marker="D", s=30, color="tab:green", label="finalists, re-measured")
    if any(m.get("within_budget") is False for m in measured):
        ax.scatter([], [], marker="X", s=34, color="tab:purple", label="finalists measured over budget")
    if budget:
        ax.axvline(budget, color="black", ls="--", lw=1, label=f"budget {budget:g} ms")
        margin = (report.get("budget_margin") or {}).get("fraction") or 0.0
        if margin:  # what an estimate must stay under: latency x (1 + margin) <= budget
            ax.axvline(budget / (1 + margin), color="black", ls=":", lw=1,
                       label=f"budget less a {margin:.1%} margin ({budget / (1 + margin):.3g} ms)")
    source = report.get("latency") or ""
    ax.set_xscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "1235" else ""))
    ax.set_xlabel("\n".join(textwrap.wrap(f"latency (ms): {source}", 80, break_on_hyphens=False)))
    ax.set_ylabel("score (validation accuracy)" if report.get("evaluator") == "train" else "score")
    best = report.get("best")
    complete = report["trials"]["by_state"].get("complete", 0)
    title = f"{study.study_name}: {complete} scored of {len(study.trials)} trials"
    if best:
        title += f"; best {best['score']:.3f} at {best['latency_ms']:.2f} ms"
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    xs = [t.user_attrs["latency_ms"] for t in (*trials, *over, *placed)] + [m["measured_ms"] for m in measured]
    xs = [x for x in xs + ([budget] if budget else []) if x and x > 0]
    if xs:  # points placed along the bottom do not widen the axes by themselves
        ax.set_xlim(min(xs) / 1.15, max(xs) * 1.15)
    ax.legend(fontsize=7, loc="upper left", framealpha=0.85)  # fast and high-scoring: rarely anything there
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
