"""PNG figures of the reproduction (matplotlib, Agg canvas, no pyplot state)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from merger.writer import atomic_file


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as fh:
        fig.savefig(fh, format="png", dpi=110)
    return path


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def interpolation(result: dict[str, Any], path: Path) -> Path:
    """Accuracy along lambda: WA, ENS and the chord, one panel per split."""
    splits = [s for s in ("val", "ood", "corrupted") if s in result]
    titles = {"val": "ID validation", "ood": "OOD test", "corrupted": "corrupted train labels"}
    fig = _figure(4.2 * len(splits), 3.8)
    for i, split in enumerate(splits, 1):
        ax = fig.add_subplot(1, len(splits), i)
        curve = result[split]["curve"]
        lams = [p["lam"] for p in curve]
        ax.plot(lams, [p["wa_accuracy"] for p in curve], "o-", label="WA (weights)")
        ax.plot(lams, [p["ens_accuracy"] for p in curve], "s--", label="ENS (rewards)")
        ax.plot(lams, [p["chord"] for p in curve], ":", color="gray", label="chord")
        ax.set_title(f"{titles[split]} ({result[split]['pairs']} pairs)", fontsize=10)
        ax.set_xlabel(r"$\lambda$")
        ax.grid(alpha=0.3)
        if i == 1:
            ax.set_ylabel("pairwise accuracy")
            ax.legend(fontsize=8)
    fig.suptitle(f"Interpolating {result['members'][0]} -> {result['members'][1]}", fontsize=10)
    return _save(fig, path)


def corruption(result: dict[str, Any], path: Path) -> Path:
    """Members (dots), ENS and WA per evaluation set."""
    rows = result["rows"]
    splits = list(next(iter(rows.values())))
    fig = _figure(7.5, 3.8)
    ax = fig.add_subplot()
    for j, split in enumerate(splits):
        members = [v[split] for k, v in rows.items() if k.startswith("member")]
        ax.scatter([j - 0.2] * len(members), members, color="gray", s=18, label=None)
        ens = next(v[split] for k, v in rows.items() if k.startswith("ENS"))
        wa = next(v[split] for k, v in rows.items() if k.startswith("WA"))
        ax.bar(j, ens, width=0.18, color="tab:orange", label="ENS" if j == 0 else None)
        ax.bar(j + 0.2, wa, width=0.18, color="tab:blue", label="WA" if j == 0 else None)
    ax.scatter([], [], color="gray", s=18, label="members")
    ax.set_xticks(range(len(splits)), splits)
    ax.set_ylabel("accuracy (vs the labels given)")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(f"25% label corruption: {result['corrupted_pairs']} flipped pairs", fontsize=10)
    return _save(fig, path)


def best_of_n(result: dict[str, Any], path: Path) -> Path:
    """Control (oracle) reward of best-of-N against N."""
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot()
    n = result["n"]
    for name, curve in result["curves"].items():
        style = ":" if name == "oracle" else "--" if name.startswith("ENS") else "o-"
        ax.plot(n, curve, style, label=name, markersize=4)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N (samples per prompt)")
    ax.set_ylabel("control reward (oracle) of the pick")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Best-of-N over {result['prompts']} prompts", fontsize=10)
    return _save(fig, path)


def rl(result: dict[str, Any], path: Path) -> Path:
    """Proxy and control reward over RL steps, one line per reward model."""
    fig = _figure(10, 3.8)
    proxy, control = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for name, log in result["logs"].items():
        steps = [r["step"] for r in log]
        proxy.plot(steps, _smooth([r["reward"] for r in log]), label=name)
        control.plot(steps, _smooth([r["control_reward"] for r in log]), label=name)
    proxy.set_title("proxy reward (the RM optimised)", fontsize=10)
    control.set_title("control reward (oracle, never optimised)", fontsize=10)
    for ax in (proxy, control):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def _smooth(values: list[float], window: int = 10) -> list[float]:
    """Trailing moving average, so the trend shows through per-step sampling noise."""
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out
