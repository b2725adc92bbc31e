"""The researcher-facing report: every number recomputed from the per-question files of each stage.

Reads, per model (a folder name under training_data/ and results/):
  training_data/<model>/probe_*.jsonl             probe records (run_MMLU.py / run_ParaRel.py)
  training_data/<model>/state_*.jsonl             Cor, Cer per question (query_state.py)
  training_data/<model>/flow_*.jsonl              Cor, Cer of M0 and M~ per question (rehearsal_finetune.py)
  training_data/<model>/rait_*_text2text.json     RAIT sets with the ids each kept (build_rait.py);
                                                  CRSS is recomputed from them and state_*.reps.npy
  results/<model>/eval/<method>/*.jsonl           evaluation records per method and test set (evaluate.py),
                                                  with the verdicts of a *.judged.jsonl beside them (--reclassify)
and writes results/report.md, results/report.html (self-contained: PNGs inlined as base64) and the
PNGs under results/report_files/. A stage whose files are absent becomes a "missing: run ..." line, so
the report can be generated after any prefix of the pipeline.

Summaries written by the stages (results/<model>/probe_*.json, ...) are deliberately not read for
numbers: a report that recomputes from the records cannot drift from them.

Modules: load (read and validate the inputs), figures (the plots), sections (what the report says),
render (Markdown and HTML).
"""

from __future__ import annotations

from kb.report.render import Report, render_html, render_md, write_report
from kb.report.sections import build_report, parse_models

__all__ = ["Report", "build_report", "parse_models", "render_html", "render_md", "write_report"]
