"""Draw per-stage timelines as a PNG: simulated (scripts/plot_schedule.py) or measured
(the demo's step of each schedule, chunkflow/demo.py).

One subplot per panel, one bar row per stage (stage 0 on top), time to the right, all
panels on one time axis so bar lengths compare::

    Megatron 1F1B       stage 0 |F0|F1|  |B0|F2|B1|B2|
                        stage 1 |  |F0|B0|F1|B1|F2|B2|
    ChunkFlow C K       stage 0 |F0|F1|F2|B2|B1|B0| ...

Forward blue (hatched: a forward that kept no graph, K/V only), recompute orange,
backward green, idle grey; labels are micro-batch indices. matplotlib is imported only
when drawing.
"""

from __future__ import annotations

from typing import Optional

from chunkflow.pipeline.plan import PipelinePlan
from chunkflow.pipeline.simulate import Timeline

__all__ = ["COLORS", "Panel", "draw_timelines", "describe"]

COLORS = {"forward": "#4C78A8", "recompute": "#F58518", "backward": "#54A24B", "idle": "#E6E6E6"}

Panel = tuple[str, Timeline, Optional[PipelinePlan]]  # (title, timeline, plan or None)


def draw_timelines(panels: list[Panel], path: str, *, unit: str = "forward cost units") -> None:
    """One subplot per panel, one bar row per stage; saved as PNG at ``path``. ``unit``
    labels the time axis (e.g. "seconds" for a measured timeline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    span = max(t.makespan for _, t, _ in panels) or 1.0
    stages = max(t.num_stages for _, t, _ in panels)
    fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                             figsize=(12, 0.55 * stages * len(panels) + 1.2 * len(panels) + 0.6))
    for ax, (title, t, plan) in zip(axes[:, 0], panels):
        no_graph = set()
        if plan is not None:
            no_graph = {a.mb for s in range(plan.num_stages) for a in plan.actions(s)
                        if type(a).__name__ == "Forward" and not a.keep_graph}
        for s, ivs in enumerate(t.stages):
            y = t.num_stages - 1 - s
            ax.barh(y, t.makespan, left=0, height=0.8, color=COLORS["idle"], edgecolor="none")
            for iv in ivs:
                hatch = "///" if iv.kind == "forward" and (iv.mb in no_graph or not iv.graph) else None
                ax.barh(y, iv.end - iv.start, left=iv.start, height=0.8, color=COLORS[iv.kind],
                        edgecolor="white", linewidth=0.8, hatch=hatch)
                if iv.end - iv.start > span / 80:
                    ax.text((iv.start + iv.end) / 2, y, str(iv.mb), ha="center", va="center",
                            fontsize=8, color="white", fontweight="bold")
        ax.set_yticks(range(t.num_stages), [f"stage {s}" for s in reversed(range(t.num_stages))])
        ax.set_xlim(0, span)
        deps = describe(plan) if plan is not None else ""
        note = f"   ({deps})" if 0 < deps.count("=") - 1 <= 8 else ""
        ax.set_title(f"{title}   makespan {t.makespan:.4g}   bubble {100 * t.bubble_fraction:.1f}%{note}",
                     loc="left", fontsize=10)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    axes[-1, 0].set_xlabel(f"time ({unit})")
    legend = [Patch(color=COLORS[k], label=k) for k in ("forward", "recompute", "backward", "idle")]
    legend.insert(1, Patch(facecolor=COLORS["forward"], hatch="///", edgecolor="white", label="forward, no graph"))
    fig.legend(handles=legend, loc="lower center", ncol=5, frameon=False, fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def describe(plan: PipelinePlan) -> str:
    """Which micro-batches are chunks of which long sample."""
    parts = []
    for mb, c in enumerate(plan.chunks):
        if c.dependent:
            parts.append(f"{mb}={c.sample}.{c.chunk_index}")
    return "mb=sample.chunk: " + (", ".join(parts) if parts else "all standalone")
