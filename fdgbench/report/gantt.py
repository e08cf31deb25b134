"""The per-stage timeline (the FDG paper's Figure 1, from a real run or the
simulator): one lane per stage, a bar per action, coloured by what the stage
was doing; gaps and recv bars are time the stage waited."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..engines.trace import Span

COLOURS = {"forward": "#4C72B0", "backward": "#DD8452", "local": "#8172B3", "update": "#55A868",
           "send": "#937860", "recv": "#C44E52"}
LABELS = {"forward": "forward", "backward": "backward", "local": "local signal", "update": "update",
          "send": "send", "recv": "waiting to receive"}


def window(spans: Sequence[Span], first: int | None, count: int, steps_per_epoch: int | None = None) -> tuple[int, int]:
    """Iterations [first, first + count) to draw; by default the middle of the
    first epoch (past the pipeline's filling and the warm-up, and clear of
    the evaluation between epochs)."""
    iterations = sorted({s.iteration for s in spans})
    if not iterations:
        raise ValueError("the trace has no actions")
    if first is None:
        end = min(iterations[-1] + 1, steps_per_epoch or iterations[-1] + 1)
        first = max(iterations[0], (iterations[0] + end - count) // 2)
    return first, first + count


def draw_gantt(spans: Sequence[Span], out: str | Path, title: str, first: int | None = None,
               count: int = 6, steps_per_epoch: int | None = None) -> list[Path]:
    """Draw iterations [first, first + count) to ``out`` .png and .svg; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    lo, hi = window(spans, first, count, steps_per_epoch)
    shown = [s for s in spans if lo <= s.iteration < hi]
    origin = min(s.start for s in shown)
    span = max(s.start + s.duration for s in shown) - origin
    scale, unit = (1.0, "seconds") if span > 10 else (1000.0, "milliseconds")
    stages = sorted({s.stage for s in spans})
    fig, ax = plt.subplots(figsize=(12, 1.0 + 0.7 * len(stages)))
    for s in shown:
        y = len(stages) - 1 - stages.index(s.stage)
        left, width = scale * (s.start - origin), scale * s.duration
        ax.barh(y, width, left=left, height=0.6, color=COLOURS[s.category], edgecolor="white", linewidth=0.3)
        if s.category in ("forward", "backward", "local") and width > 0:
            ax.text(left + width / 2, y, s.name, ha="center", va="center", fontsize=6, color="white", clip_on=True)
    ax.set_yticks(range(len(stages)), [f"stage {k}" for k in reversed(stages)])
    ax.set_xlabel(f"{unit} (iterations {lo} to {hi - 1})")
    ax.set_title(title, fontsize=10)
    used = [c for c in COLOURS if any(s.category == c for s in shown)]
    ax.grid(axis="x", alpha=0.3)
    fig.legend(handles=[Patch(color=COLOURS[c], label=LABELS[c]) for c in used], loc="lower center",
               ncol=len(used), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12 if len(stages) < 3 else 0.08, 1, 1))
    out = Path(out)
    paths = [out.with_suffix(".png"), out.with_suffix(".svg")]
    for p in paths:
        fig.savefig(p, dpi=150)
    plt.close(fig)
    return paths
