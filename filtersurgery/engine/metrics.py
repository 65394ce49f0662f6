"""What a run folder tells about itself: ``metrics.json`` (:func:`write_metrics`) and where a re-run resumes
(:func:`resume_point`)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from filtersurgery.data import ImageData
from filtersurgery.engine import checkpoint
from filtersurgery.engine.distributed import is_main_process

__all__ = ["preprocess_info", "write_metrics", "resume_point"]


def preprocess_info(data: ImageData) -> Dict:
    """What a re-evaluation needs: normalization mean/std, image size, channels, classes."""
    return {"mean": list(map(float, data.mean)), "std": list(map(float, data.std)), "size": int(data.size),
            "in_chans": int(data.in_chans), "num_classes": int(data.num_classes)}


def write_metrics(out_dir, data: ImageData, config: Dict, steps: List[Dict], **extra) -> Dict:
    """Write ``out_dir/metrics.json`` atomically in the trainer's schema and return it.

    ``{"preprocess": {...}, "steps": [{"step", "test_acc", "val_acc", "seconds", ...}], "config": {...}}``;
    single-run methods (``reactivation``, ``sharing``, ``growth``, ...) write one entry with
    ``step: 1``. ``extra`` items are added at the top level (e.g. per-class-set accuracy).
    """
    for e in steps:
        missing = {"step", "test_acc", "val_acc", "seconds"} - set(e)
        if missing:
            raise ValueError(f"steps: each entry needs step, test_acc, val_acc, seconds; missing {sorted(missing)}")
    metrics = {"preprocess": preprocess_info(data), "steps": list(steps), "config": dict(config), **extra}
    if is_main_process():
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write_json(metrics, out / "metrics.json")
    return metrics


def resume_point(out_dir) -> Optional[Dict]:
    """Where a re-run into ``out_dir`` continues inside a phase: ``{"step", "phase", "epoch"}``
    (``epoch``: epochs of that phase already finished) from ``out_dir/.work/state.pt``, or
    None when there is no such state. Reads only the state's small ``extra`` part."""
    path = Path(out_dir) / ".work" / checkpoint.STATE_FILE
    if not path.is_file():
        return None
    extra = checkpoint.peek_training_state(path)
    if not {"step", "phase", "epoch"} <= set(extra):
        return None
    return {"step": int(extra["step"]), "phase": str(extra["phase"]), "epoch": int(extra["epoch"])}
