"""How good a profile is: measure and predict the same networks, report as nn-Meter does (share within
+-5 % and +-10 %, mean absolute percentage error) plus Spearman's rank correlation, and plot them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from metaformer_lab.core.errors import LatencyError
from metaformer_lab.graph.arch import ArchGraph
from metaformer_lab.latency.interleave import measure_interleaved
from metaformer_lab.latency.predict import predict
from metaformer_lab.latency.profile import Profile


@dataclass(frozen=True)
class Pair:
    name: str
    measured_ms: float
    predicted_ms: float
    noisy: bool
    coverage: float
    median_ms: float | None = None

    @property
    def error(self) -> float:
        return (self.predicted_ms - self.measured_ms) / self.measured_ms


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (scipy's; ties get average ranks)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


@dataclass(frozen=True)
class Accuracy:
    """The accuracy report of one profile on one set of networks."""

    profile: str
    n: int
    within_5: float
    within_10: float
    mape: float
    spearman: float
    max_abs_error: float
    noisy: int
    coverage: float
    pairs: list[Pair] = field(default_factory=list)
    context: dict[str, Any] = field(default_factory=dict)

    def to_json(self, *, pairs: bool = False) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "pairs"}
        if pairs:
            out["pairs"] = [asdict(p) for p in self.pairs]
        return out


def accuracy(profile: Profile, pairs: Sequence[Pair], context: dict[str, Any] | None = None) -> Accuracy:
    errors = [abs(p.error) for p in pairs]
    n = len(pairs)
    return Accuracy(profile=profile.name, n=n, within_5=sum(e <= 0.05 for e in errors) / n,
                    within_10=sum(e <= 0.10 for e in errors) / n, mape=sum(errors) / n,
                    spearman=spearman([p.measured_ms for p in pairs], [p.predicted_ms for p in pairs]),
                    max_abs_error=max(errors), noisy=sum(p.noisy for p in pairs),
                    coverage=sum(p.coverage for p in pairs) / n, pairs=list(pairs), context=context or {})


def evaluate(profile: Profile, graphs: Sequence[ArchGraph], *, group: int = 8, time_per_model_s: float = 2.0,
             progress: Callable[[int, int], None] | None = None, context: dict[str, Any] | None = None) -> Accuracy:
    """Measure every network at the profile's setting, interleaved in groups (:func:`measure_interleaved`),
    and compare its p10 (the profile's statistic) with the prediction."""
    if profile.target.kind != "cpu":
        raise LatencyError.single("--profile", f"evaluating a {profile.target.device} profile needs that device")
    pairs = []
    for k in range(0, len(graphs), group):
        chunk = graphs[k:k + group]
        results = measure_interleaved(chunk, profile.target, time_per_item_s=time_per_model_s)
        for graph, r in zip(chunk, results, strict=True):
            predicted = predict(graph, profile)
            pairs.append(Pair(graph.spec.name, r.p10_ms, predicted.ms, r.noisy, predicted.coverage, r.median_ms))
        if progress is not None:
            progress(min(k + group, len(graphs)), len(graphs))
    return accuracy(profile, pairs, {"statistic": "p10 of interleaved runs", "time_per_model_s": time_per_model_s,
                                     **(context or {})})


def scatter_plot(report: Accuracy, path: str | Path, *, title: str | None = None) -> Path:
    """Predicted against measured latency, log-log, with the +-10 % band; writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [p.measured_ms for p in report.pairs]
    predicted = [p.predicted_ms for p in report.pairs]
    lo, hi = min(measured + predicted) * 0.8, max(measured + predicted) * 1.25
    fig, ax = plt.subplots(figsize=(6, 6), dpi=120)
    line = [lo, hi]
    ax.fill_between(line, [v * 0.9 for v in line], [v * 1.1 for v in line], color="tab:green", alpha=0.15,
                    label="within ±10 %")
    ax.plot(line, line, color="tab:green", lw=1)
    noisy = [p.noisy for p in report.pairs]
    ax.scatter([m for m, q in zip(measured, noisy, strict=True) if not q],
               [p for p, q in zip(predicted, noisy, strict=True) if not q], s=14, color="tab:blue", label="measured")
    if any(noisy):
        ax.scatter([m for m, q in zip(measured, noisy, strict=True) if q],
                   [p for p, q in zip(predicted, noisy, strict=True) if q], s=18, marker="x", color="tab:red",
                   label="measurement flagged noisy")
    ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi),
           xlabel="measured latency (ms, p10 of interleaved runs)", ylabel="predicted latency (ms)")
    ax.set_title(title or f"profile {report.profile}: {report.n} networks", fontsize=10)
    text = (f"within ±5 %: {report.within_5:.1%}\nwithin ±10 %: {report.within_10:.1%}\n"
            f"MAPE: {report.mape:.2%}\nSpearman: {report.spearman:.3f}")
    ax.text(0.03, 0.97, text, transform=ax.transAxes, va="top", fontsize=9,
            bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8})
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    target = Path(path)
    fig.savefig(target)
    plt.close(fig)
    return target
