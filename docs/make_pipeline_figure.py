"""Draw docs/pipeline.svg, the README's picture of the bnfold pipeline.

    python docs/make_pipeline_figure.py

The output is deterministic (fixed hash salt, no date), so re-running it gives a clean git diff.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

# (title, command, what it guarantees), left to right.
STAGES = [
    ("train", "bnfold train", "checkpoint .pt\n(conv/linear + BN)"),
    ("fold", "bnfold fold", "BN folded into\nneighbouring layer;\nunsafe ones kept\nwith a reason"),
    ("verify", "inside fold", "against a float64\nreference: |y-r| <=\natol + rtol max|r|;\ntop-1 agreement"),
    ("export", "inside fold", "ONNX + certificate\n(errors, self-test\nvector) in metadata"),
    ("serve", "bnfold serve", "onnxruntime, no torch;\nself-test on load;\nOpen Inference\nProtocol (v2)"),
]
OUTPUT = Path(__file__).with_name("pipeline.svg")


def draw(path: Path = OUTPUT) -> None:
    plt.rcParams.update({"svg.hashsalt": "bnfold", "svg.fonttype": "none", "font.family": "DejaVu Sans"})
    width, height, gap = 2.4, 2.1, 0.55
    fig, ax = plt.subplots(figsize=(13.5, 3.1))
    ax.set_xlim(-0.1, len(STAGES) * (width + gap) - gap + 0.1)
    ax.set_ylim(-0.15, height + 0.55)
    ax.axis("off")
    for i, (title, command, body) in enumerate(STAGES):
        x = i * (width + gap)
        ax.add_patch(FancyBboxPatch((x, 0), width, height, boxstyle="round,pad=0.02,rounding_size=0.12",
                                    facecolor="#eef3fb" if title != "serve" else "#eaf6ee",
                                    edgecolor="#35507a", linewidth=1.4))
        ax.text(x + width / 2, height - 0.3, title, ha="center", va="center", fontsize=15, weight="bold",
                color="#1d2d44")
        ax.text(x + width / 2, height - 0.62, command, ha="center", va="center", fontsize=9.5,
                family="DejaVu Sans Mono", color="#35507a")
        ax.text(x + width / 2, 0.72, body, ha="center", va="center", fontsize=9.5, color="#222222",
                linespacing=1.35)
        if i + 1 < len(STAGES):
            ax.add_patch(FancyArrowPatch((x + width + 0.04, height / 2), (x + width + gap - 0.04, height / 2),
                                         arrowstyle="-|>", mutation_scale=18, linewidth=1.6, color="#35507a"))
    ax.text(2 * (width + gap) + width / 2, height + 0.33,
            "bnfold quickstart runs all five on the bundled digits data set", ha="center", va="center",
            fontsize=10.5, style="italic", color="#444444")
    fig.savefig(path, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    plt.close(fig)


if __name__ == "__main__":
    draw()
    print(f"wrote {OUTPUT}")
