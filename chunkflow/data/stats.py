"""Figures about step plans, for ``scripts/inspect_chunks.py`` and for tests.

One record per plan (:func:`plan_stats`), one over many plans (:func:`total_stats`), and
a plain-text table (:func:`format_table`)::

    batch  schedule   samples  tokens  rows  standalone  dependent  pad  fill   imbalance  cost/rank
    0      megatron   16       5210    7     7           0          0    0.744  1.212      2989 2466
    0      chunkflow  16       5210    23    12          11         0    0.885  1.001      2729 2726

``fill`` is real tokens / (non-empty rows x row capacity); ``imbalance`` is max / mean
estimated cost over data-parallel ranks (over many steps: sum of per-step maxima / sum
of per-step means, since each step waits for its slowest rank).
"""

from __future__ import annotations

from typing import Any, Sequence

from chunkflow.data.plan import StepPlan

__all__ = ["COLUMNS", "plan_stats", "total_stats", "format_table"]

COLUMNS = (
    "batch", "schedule", "samples", "tokens", "rows", "standalone", "dependent", "pad",
    "fill", "imbalance", "cost/rank",
)


def plan_stats(plan: StepPlan) -> dict[str, Any]:
    """The figures of one plan (keys as in :data:`COLUMNS`, plus a few raw ones)."""
    costs = plan.est_cost_per_rank
    return {
        "schedule": plan.schedule,
        "samples": plan.num_samples,
        "tokens": plan.num_tokens,
        "loss_tokens": plan.num_loss_tokens,
        "rows": plan.num_rows,
        "standalone": plan.num_standalone_rows,
        "dependent": plan.num_dependent_rows,
        "pad": plan.num_padding_rows,
        "capacity": plan.capacity,
        "fill": plan.fill_rate,
        "imbalance": plan.imbalance,
        "cost/rank": list(costs),
        "max_cost": max(costs),
        "mean_cost": sum(costs) / len(costs),
    }


def total_stats(plans: Sequence[StepPlan]) -> dict[str, Any]:
    """Figures summed over ``plans`` (all of one schedule and data-parallel size)."""
    if not plans:
        raise ValueError("total_stats needs at least one plan")
    per = [plan_stats(p) for p in plans]
    total: dict[str, Any] = {"schedule": per[0]["schedule"]}
    for key in ("samples", "tokens", "loss_tokens", "rows", "standalone", "dependent", "pad"):
        total[key] = sum(s[key] for s in per)
    capacity_tokens = sum(s["rows"] * s["capacity"] for s in per)
    total["fill"] = total["tokens"] / capacity_tokens if capacity_tokens else 0.0
    total["max_cost"] = sum(s["max_cost"] for s in per)
    total["mean_cost"] = sum(s["mean_cost"] for s in per)
    total["imbalance"] = total["max_cost"] / total["mean_cost"] if total["mean_cost"] else 1.0
    total["cost/rank"] = [sum(c) for c in zip(*(s["cost/rank"] for s in per))]
    return total


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, (list, tuple)):
        if len(value) > 8:  # many ranks: the range is what matters
            return f"{min(value):.0f}..{max(value):.0f}"
        return " ".join(f"{v:.0f}" for v in value)
    return str(value)


def format_table(records: Sequence[dict[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
    """Left-aligned text table of ``records`` (missing keys print as empty cells)."""
    cells = [[_cell(r.get(c, "")) for c in columns] for r in records]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)
