"""Plot a `bench_pp.py` result as an SVG (no plotting library needed).

Left: median period, stage0 and stage1 (ms) against the queue depth D (recompute off), with the
r0a run as a separate marker. Right: OverlapScore against D with the 0.9 target line.

    python bench/plot_pp.py bench/results/pp0_wan14b_h200x2.json bench/results/pp0_wan14b_h200x2.svg
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

W, H, PAD = 420, 300, 50
COLORS = {"period_ms": "#d62728", "stage0_ms": "#1f77b4", "stage1_ms": "#2ca02c", "overlap_score": "#9467bd"}


def _panel(x0: int, title: str, depths: list[int], series: dict[str, list[float]], ymax: float) -> list[str]:
    def px(d: float) -> float:
        return x0 + PAD + (d - min(depths)) / max(1, max(depths) - min(depths)) * (W - 2 * PAD)

    def py(v: float) -> float:
        return H - PAD - v / ymax * (H - 2 * PAD)

    out = [
        f'<text x="{x0 + W / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
        f'<line x1="{x0 + PAD}" y1="{H - PAD}" x2="{x0 + W - PAD}" y2="{H - PAD}" stroke="black"/>',
        f'<line x1="{x0 + PAD}" y1="{PAD}" x2="{x0 + PAD}" y2="{H - PAD}" stroke="black"/>',
        f'<text x="{x0 + W / 2}" y="{H - 12}" text-anchor="middle" font-size="12">queue depth D</text>',
    ]
    for d in depths:
        out.append(f'<text x="{px(d)}" y="{H - PAD + 16}" text-anchor="middle" font-size="11">{d}</text>')
    for i in range(5):
        v = ymax * i / 4
        out.append(
            f'<text x="{x0 + PAD - 6}" y="{py(v) + 4}" text-anchor="end" font-size="10">{v:.3g}</text>'
        )
    for k, (name, values) in enumerate(series.items()):
        pts = " ".join(f"{px(d):.1f},{py(v):.1f}" for d, v in zip(depths, values, strict=True))
        color = COLORS.get(name, "#555")
        out.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"/>')
        label = f'x="{x0 + W - PAD}" y="{PAD + 14 * k}" text-anchor="end" font-size="11" fill="{color}"'
        out.append(f"<text {label}>{name}</text>")
    return out


def plot(result: dict) -> str:
    runs = [r for r in result["runs"] if "error" not in r and r["recompute"] == "off"]
    runs.sort(key=lambda r: r["depth"])
    depths = [r["depth"] for r in runs]
    ms = {k: [r[k] for r in runs] for k in ("period_ms", "stage0_ms", "stage1_ms")}
    ymax = max(max(v) for v in ms.values()) * 1.15
    body = _panel(0, f"{result['preset']} PP0: ms per chunk", depths, ms, ymax)
    body += _panel(W, "OverlapScore", depths, {"overlap_score": [r["overlap_score"] for r in runs]}, 1.0)
    target = H - PAD - 0.9 * (H - 2 * PAD)
    line = f'x1="{W + PAD}" y1="{target}" x2="{2 * W - PAD}" y2="{target}"'
    body.append(f'<line {line} stroke="#999" stroke-dasharray="4"/>')
    for r in result["runs"]:
        if r.get("recompute") == "r0a" and "error" not in r:
            note = f"r0a at D={r['depth']}: score {r['overlap_score']:.2f}, period {r['period_ms']:.0f} ms"
            body.append(f'<text x="{W + PAD + 4}" y="{H - PAD - 6}" font-size="11">{note}</text>')
    head = f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * W}" height="{H}" font-family="sans-serif">'
    return head + "".join(body) + "</svg>\n"


def main() -> int:
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    dst.write_text(plot(json.loads(src.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
