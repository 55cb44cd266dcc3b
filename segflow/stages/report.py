"""The pipeline's summary: one line per stage (ran, resumed, skipped; what training did) and
the outputs, as Markdown (the Prefect artifact and the command line's last words)."""

from __future__ import annotations

from typing import Any

from segflow.config import PipelineConfig
from segflow.io import locations
from segflow.stages.plan import StagePlan

__all__ = ["stage_status", "summary", "training_markdown"]


def stage_status(name: str, st: dict[str, Any]) -> str:
    """``ran in X s`` (with what training did) or ``skipped (current)``."""
    if not st["ran"]:
        return "skipped (current)"
    status = f"ran in {st.get('seconds', '?')} s"
    if st.get("plan") == StagePlan.RESUME.value:
        status += " (resumed)"
    if name == "train" and st.get("steps") is not None:
        best = st.get("best_metric")
        status += f", {st['steps']} steps"
        if best is not None:
            status += f", best {st['metric']} {best:.4f}"
    return status


def summary(cfg: PipelineConfig, stages: dict[str, Any]) -> str:
    """The Markdown summary of a pipeline run's ``stages`` results."""
    lines = [f"### segflow pipeline `{cfg.name}`", "", "| stage | status |", "|---|---|"]
    for name, st in stages.items():
        lines.append(f"| {name} | {stage_status(name, st)} |")
    seg = stages["segment_region"]
    outputs = dict(seg.get("outputs") or {})
    if "train" in stages:
        outputs["training curve"] = str(locations.join(cfg.work_path, "train", "curve.png"))
        outputs["model"] = str(locations.join(cfg.work_path, "train", "best"))
    lines += ["", *[f"- {k}: `{v}`" for k, v in outputs.items()]]
    lines += [f"- {k}: {v} px" for k, v in (seg.get("class_pixels") or {}).items()]
    ev = stages.get("evaluate")
    if ev and ev.get("f1") is not None:
        lines.append(
            f"- evaluation: mean IoU {ev['mean_iou']:.4f}; objects F1 {ev['f1']:.4f} "
            f"({ev['tp']} of {ev['reference']} matched at IoU >= 0.5, {ev['fp']} false), "
            f"AP 0.5:0.95 {ev['ap_50_95']:.4f}, PQ {ev['pq'] or 0:.4f}: `{ev['outputs']['markdown']}`"
        )
    col = stages.get("segment_collection")
    if col and col.get("outputs"):
        lines.append(
            f"- collection: {col['scenes']} scenes ({col['done']} done, {col['skipped']} "
            f"skipped): `{col['outputs']['summary_csv']}`"
            + (f", mosaic `{col['outputs']['mosaic']}`" if "mosaic" in col["outputs"] else "")
        )
    return "\n".join(lines) + "\n"


def training_markdown(r: dict[str, Any], metric: str) -> str:
    """The Markdown summary of a training run (the ``summary()`` of its result), ``metric``
    being the one that picked the best checkpoint."""
    rows = "".join(
        f"| {k} | {v:.5g} |\n" if isinstance(v, float) else f"| {k} | {v} |\n"
        for k, v in r["final"].items()
    )
    return (
        f"### segflow train\n\n{r['steps']} of {r['total_steps']} steps in {r['wall_s']} s"
        f"{' (stopped early)' if r['stopped_early'] else ''}; best {metric} "
        f"{r['best_metric']} at step {r['best_step']}; checkpoints `{r['best_checkpoint']}`, "
        f"`{r['last_checkpoint']}`\n\n| final metric | value |\n|---|---|\n{rows}"
    )
