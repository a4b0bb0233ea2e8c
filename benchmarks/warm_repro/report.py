"""The reproduction's section of benchmarks/RESULTS.md: tables of figures plus the PNGs."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from bench_report import markdown_table


def _table_lines(header: list[str], rows: list[list[str]]) -> list[str]:
    return markdown_table(header, rows).splitlines()


def _interpolation(result: dict[str, Any]) -> list[str]:
    rows = []
    for split in ("val", "ood", "corrupted"):
        diag = result[split]
        curve = diag["curve"]
        mid = curve[len(curve) // 2]
        rows.append(
            [
                split,
                str(diag["pairs"]),
                f"{curve[0]['wa_accuracy']:.3f} / {curve[-1]['wa_accuracy']:.3f}",
                f"{mid['wa_accuracy']:.3f}",
                f"{mid['ens_accuracy']:.3f}",
                f"{mid['chord']:.3f}",
                f"{max(p['wa_accuracy'] - p['ens_accuracy'] for p in curve):+.3f}",
                f"{diag['barrier']:+.3f}",
                f"{sum(p['agreement'] for p in curve) / len(curve):.3f}",
            ]
        )
    header = [
        "split",
        "pairs",
        "members A / B",
        "WA at λ=.5",
        "ENS at λ=.5",
        "chord at λ=.5",
        "max WA - ENS",
        "barrier (max chord - WA)",
        "WA/ENS agreement",
    ]
    return _table_lines(header, rows)


def _corruption(result: dict[str, Any]) -> list[str]:
    rows = result["rows"]
    splits = list(next(iter(rows.values())))
    return _table_lines(
        ["model", *splits], [[name, *(f"{v[s]:.3f}" for s in splits)] for name, v in rows.items()]
    )


def _best_of_n(result: dict[str, Any]) -> list[str]:
    return _table_lines(
        ["selector", *(f"N={n}" for n in result["n"])],
        [[name, *(f"{x:.3f}" for x in c)] for name, c in result["curves"].items()],
    )


def _rl(result: dict[str, Any]) -> list[str]:
    rows = []
    for name, log in result["logs"].items():
        last = log[-10:]
        peak = max(log, key=lambda r: r["control_reward"])
        rows.append(
            [
                name,
                f"{sum(r['reward'] for r in last) / len(last):+.3f}",
                f"{sum(r['control_reward'] for r in last) / len(last):+.3f}",
                f"{peak['control_reward']:+.3f} (step {peak['step']:.0f})",
                f"{sum(r['kl'] for r in last) / len(last):.3f}",
                f"{result['final_control'][name]:+.3f}",
            ]
        )
    header = [
        "policy trained against",
        "proxy reward, last 10 steps",
        "control reward, last 10 steps",
        "best control step",
        "KL, last 10 steps",
        f"final policy's control reward ({result['eval_samples']} held-out samples)",
    ]
    return _table_lines(header, rows)


def markdown(
    results: dict[str, Any],
    figures: dict[str, Path],
    root: Path,
    command: str,
    commit: str,
    machine: str,
) -> str:
    """The report section, with figure links relative to `root` (where RESULTS.md lives)."""
    setup = results["setup"]

    def image(name: str) -> str:
        return f"![{name}]({os.path.relpath(figures[name], root)})"

    rl = results["rl"]
    lines = [
        f"## WARM reproduction, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        f"- Command: `{command}` (commit {commit}; took {results['total_s'] / 60:.1f} min)",
        f"- Machine: {machine}",
        f"- Reward models: {setup['members']} x MiniLM-L6 from one shared init, "
        f"{setup['train_pairs']} training pairs with {setup['noise']:.0%} flipped labels, "
        f"{setup['epochs']:g} epochs, lr {setup['learning_rates']}, dropout "
        f"{setup['dropouts']}; {setup['eval_pairs']} clean ID validation and OOD pairs",
        "- Stage times (s): " + ", ".join(f"{k} {v:g}" for k, v in results["timings"].items()),
        "",
        "### 1. Interpolation: WA vs ENS vs the chord",
        "",
        *_interpolation(results["interpolation"]),
        "",
        image("interpolation"),
        "",
        "### 2. 25% label corruption: memorisation and generalisation",
        "",
        "corrupted-train is accuracy against the flipped labels (memorising them; lower is "
        "better); the other columns are against the true labels.",
        "",
        *_corruption(results["corruption"]),
        "",
        image("corruption"),
        "",
        "### 3. Best-of-N, control (oracle) reward of the pick",
        "",
        *_best_of_n(results["best_of_n"]),
        "",
        image("best_of_n"),
        "",
        "### 4. RL with `warm-rl train`",
        "",
        *_rl(rl),
        "",
        f"Initial policy's control reward: {rl['initial_control']:+.3f}. Win rate of the "
        f"policy trained against {rl['win_rate_of']} over the one trained against "
        f"{rl['against']}, judged by the oracle on the same held-out prompts: "
        f"**{rl['win_rate']:.1%}** (the paper: 79.4% against the best single RM).",
        "",
        image("rl"),
        "",
    ]
    return "\n".join(lines)
