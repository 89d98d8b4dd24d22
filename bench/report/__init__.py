"""Tables and figures from stored records: ``bench report``.

Reads every record under the results folder and writes, per dataset:

- ``<dataset>.md``, ``.tex`` (booktabs) and ``.csv``: every method and operating point.
  Records are grouped by the baseline checkpoint they were measured against (a depth
  study or two checkpoints in one file give several groups, each with its own table
  section and Pareto front). The CSV adds one column per knob, the timing spread and
  provenance; ``<dataset>-per-class.csv`` holds the per-class IoU.
- figures, each as PNG, SVG and PDF at a paper's column or text width: mIoU against
  GFLOPs and against the same-run speedup at every stored batch size, the fraction of
  tokens each block computed, and the training curves of the checkpoints behind the
  rows when their logs are found.
- a copy of the compute maps ``bench run`` drew, and ``README.md`` indexing it all.

A record the report cannot use is named (file and line) and skipped. The same records
always give the same bytes, and every file is replaced atomically.

Modules: ``records`` (which records are usable), ``tables`` (Markdown, LaTeX, CSV),
``figures`` (the one figure style, trade-off and tokens figures), ``training``
(training curves), ``speed`` (``bench speed``'s records), ``study`` (depth studies),
``build`` (``report``: all of it for every dataset, and the index).
"""
from bench.report.build import report
from bench.report.figures import (
                                  WIDTHS,
                                  figure_style,
                                  published_point,
                                  save_figure,
                                  series_styles,
                                  tokens_figure,
                                  tradeoff_figure,
)
from bench.report.records import record_problem, usable_records
from bench.report.speed import speed_report, speed_summary, speed_table
from bench.report.study import study_report, study_table
from bench.report.tables import (
                                  EXECUTION,
                                  batch_sizes,
                                  csv_frame,
                                  display_columns,
                                  group_key,
                                  group_labels,
                                  latex,
                                  markdown,
                                  pareto_front,
                                  per_class_frame,
                                  series,
                                  swept_knobs,
                                  table,
)
from bench.report.training import read_training_log, training_figure, training_logs

__all__ = ["EXECUTION", "WIDTHS", "batch_sizes", "csv_frame", "display_columns", "figure_style", "group_key",
           "group_labels", "latex", "markdown", "pareto_front", "per_class_frame", "published_point",
           "read_training_log", "record_problem", "report", "save_figure", "series", "series_styles", "speed_report",
           "speed_summary", "speed_table", "study_report", "study_table", "swept_knobs", "table", "tokens_figure",
           "tradeoff_figure", "training_figure", "training_logs", "usable_records"]
