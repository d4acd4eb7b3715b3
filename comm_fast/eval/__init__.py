"""Evaluation on the paper's tasks: referring expressions (rec), POPE (pope) and VQA (vqa).

    metrics = comm_fast.eval.evaluate("runs/tiny-finetune/model", "rec", "data/val.json", out="eval-rec")
    metrics = comm_fast.eval.rescore("eval-rec/predictions.jsonl")      # no model: score saved answers again

``comm-fast eval`` is the same from the command line. The scorers are usable alone:
``parse_box``/``box_iou`` (REC), ``llava_yes_no`` (POPE), ``normalize_answer``/``vqa_accuracy`` (VQA).
"""
from comm_fast.data.boxes import box_iou, box_to_square, parse_box, square_frame
from comm_fast.eval.pope import llava_yes_no
from comm_fast.eval.run import TASKS, evaluate, load_items, rescore
from comm_fast.eval.vqa import normalize_answer, vqa_accuracy

__all__ = ["TASKS", "evaluate", "rescore", "load_items", "parse_box", "box_iou", "box_to_square", "square_frame",
           "llava_yes_no", "normalize_answer", "vqa_accuracy"]
