"""Plot the committed benchmark results that README's tables quote, as SVG beside their JSON.

    pip install matplotlib  # (or: pip install -e '.[plots]')
    python bench/plot_results.py            # every plot into bench/results/
    python bench/plot_results.py --out DIR  # elsewhere

Each plot reads one or two files of `bench/results/` and says which in its title; nothing is
typed in by hand. SVGs are written without dates or random ids, so re-running on the same JSON
gives the same bytes. A pp sweep (`bench_pp.py`, needs 2+ GPUs) is plotted when its result exists.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))
plt.rcParams.update({"svg.hashsalt": "streamdit", "font.size": 9, "figure.dpi": 100})


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _jobs(name: str) -> dict[str, dict]:
    return {j["job"]: j for j in _load(name)["jobs"] if "error" not in j}


def _bars(ax, labels: list[str], values: list[float], colors: list[str], fmt: str = "{:.1f}") -> None:
    bars = ax.bar(labels, values, color=colors)
    for bar, value in zip(bars, values, strict=True):
        x = bar.get_x() + bar.get_width() / 2
        ax.annotate(
            fmt.format(value), (x, value * 0.96), ha="center", va="top", color="white", fontweight="bold"
        )


def e2e_wan14b(ax) -> str:
    name = "e2e_wan14b_h200_final17b.json"
    jobs = _jobs(name)
    order = [
        ("before", "landed\ndefault", "#aaa"),
        ("bf16", "default", "#1f77b4"),
        ("bf16-soft", "default\nsoft", "#9ecae1"),
        ("fp8", "--fp8", "#ff7f0e"),
        ("fp8-soft", "--fp8\nsoft", "#fdbe85"),
        ("fp8-tiny", "--fp8\n--vae tiny", "#2ca02c"),
        ("fp8-tiny-soft", "--fp8 --vae\ntiny soft", "#a1d99b"),
    ]
    labels, colors = [label for _, label, _ in order], [c for *_, c in order]
    # two decimals: 19.97 against a target of 20 must not read as 20.0
    _bars(ax, labels, [jobs[k]["fps"] for k, _, _ in order], colors, fmt="{:.2f}")
    for i, target in ((1, 20), (3, 24), (5, 28)):
        ax.plot([i - 0.4, i + 0.4], [target, target], color="#d62728", linestyle="--", linewidth=1)
        ax.annotate(
            f"target {target}", (i + 0.4, target), ha="right", va="bottom", color="#d62728", fontsize=8
        )
    ax.set_ylabel("FPS (frames delivered per second)")
    ax.set_ylim(0, 32)
    ax.tick_params(axis="x", labelsize=7)
    return f"wan-14b 320x576, one H200, compiled, plain and soft, one run ({name})"


def e2e_wan13b(ax) -> str:
    name, later = "e2e_wan13b_480x832_h200.json", "e2e_wan13b_480x832_h200_vae17.json"
    jobs, compiled = _jobs(name), _jobs(later)
    labels = ["landed default", "Wan VAE", "--vae tiny", "Wan VAE,\ncompiled decoder*"]
    values = [
        jobs["1.3b-before"]["fps"],
        jobs["1.3b"]["fps"],
        jobs["1.3b-tiny"]["fps"],
        compiled["1.3b"]["fps"],
    ]
    _bars(ax, labels, values, ["#aaa", "#1f77b4", "#2ca02c", "#17becf"])
    for fps, peer in (
        (17.0, "Self-Forcing (H100)"),
        (20.7, "LongLive (H100)"),
        (28.0, "FlashDreams, tiny decoder (H100)"),
    ):
        ax.axhline(fps, color="#777", linestyle=":", linewidth=0.8)
        ax.annotate(peer, (-0.45, fps), ha="left", va="bottom", color="#555", fontsize=8)
    ax.set_ylabel("FPS")
    return f"wan-1.3b 480x832, one H200 ({name}; *: {later.removeprefix('e2e_wan13b_480x832_h200')})"


def generator_profile(ax) -> str:
    from bench_generator import _kind  # the classifier the bench uses today

    names = {"bf16": "generator_tuning_bf16_h200.json", "fp8": "generator_tuning_fp8_h200.json"}
    kinds = ("matmul", "attention", "triton (fused pointwise / reductions)", "other")
    colors = ("#1f77b4", "#ff7f0e", "#2ca02c", "#aaa")
    totals = {}
    for label, name in names.items():
        result = next(r for r in _load(name)["results"] if r.get("variant", "compile") == "compile")
        split = dict.fromkeys(kinds, 0.0)
        for kernel in result["profile"]["top"]:
            split[_kind(kernel["name"])] += kernel["ms_per_call"]
        totals[label] = split
    bottom = [0.0, 0.0]
    for kind, color in zip(kinds, colors, strict=True):
        values = [totals[label][kind] for label in names]
        ax.bar(list(names), values, bottom=bottom, label=kind, color=color)
        for i, value in enumerate(values):
            if value > 3:
                ax.annotate(
                    f"{value:.1f}", (i, bottom[i] + value / 2), ha="center", va="center", color="white"
                )
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel("device ms per generator call (top 20 kernels)")
    ax.legend(loc="upper right", fontsize=8)
    return "wan-14b generator call by kernel kind, one H200 (generator_tuning_{bf16,fp8}_h200.json)"


def recipes(ax) -> str:
    name = "recipes_wan14b_h200.json"
    jobs = _jobs(name)
    order = ["streamdit", "scope-krea", "self-forcing"]
    _bars(ax, order, [jobs[k]["fps"] for k in order], ["#1f77b4", "#9467bd", "#8c564b"])
    ax.set_ylabel("FPS at 320x576")
    return f"recipes, wan-14b, one H200, compiled, before issue 17 ({name})"


def chaos(ax) -> str:
    name = "chaos_gloo_seed7_cpu.json"
    doc = _load(name)
    kinds = sorted({c["case"]["kind"] for c in doc["cases"]})
    for i, kind in enumerate(kinds):
        seconds = [s for c in doc["cases"] if c["case"]["kind"] == kind for s in c["seconds"].values()]
        ax.scatter([i + (j % 7 - 3) * 0.05 for j in range(len(seconds))], seconds, s=10, color="#1f77b4")
    ax.axhline(doc["window_s"], color="#d62728", linestyle="--", linewidth=0.8)
    ax.annotate(
        "watchdog window", (len(kinds) - 0.5, doc["window_s"]), ha="right", va="bottom", color="#d62728"
    )
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_ylabel("s from the fault to each rank's exit")
    passed = doc["summary"]["passed"]
    return f"{passed}/{doc['summary']['cases']} seeded faults, gloo on 2 CPU cores ({name})"


def pp_sweep(ax, name: str) -> str:
    """A `bench_pp.py` sweep: period and stages against the queue depth D (recompute off)."""
    doc = _load(name)
    runs = sorted(
        (r for r in doc["runs"] if "error" not in r and r["recompute"] == "off"), key=lambda r: r["depth"]
    )
    depths = [r["depth"] for r in runs]
    for key, color in (("period_ms", "#d62728"), ("stage0_ms", "#1f77b4"), ("stage1_ms", "#2ca02c")):
        ax.plot(depths, [r[key] for r in runs], marker="o", color=color, label=key)
    for depth, run in zip(depths, runs, strict=True):
        ax.annotate(f"overlap {run['overlap_score']:.2f}", (depth, run["period_ms"]), va="bottom", fontsize=8)
    ax.set_xlabel("queue depth D")
    ax.set_ylabel("ms per chunk")
    ax.legend()
    return f"pp sweep ({name})"


PLOTS: dict[str, Callable] = {
    "e2e_wan14b_h200_final17b.svg": e2e_wan14b,
    "e2e_wan13b_480x832_h200.svg": e2e_wan13b,
    "generator_profile_h200.svg": generator_profile,
    "recipes_wan14b_h200.svg": recipes,
    "chaos_gloo_seed7_cpu.svg": chaos,
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    plots = dict(PLOTS)
    for sweep in sorted(RESULTS.glob("pp0_*.json")):  # 2+ GPUs: none committed yet
        plots[sweep.with_suffix(".svg").name] = lambda ax, name=sweep.name: pp_sweep(ax, name)
    for filename, draw in plots.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.set_title(draw(ax), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.out / filename, metadata={"Date": None, "Creator": None})
        plt.close(fig)
        print(args.out / filename)
    return 0


if __name__ == "__main__":
    sys.exit(main())
