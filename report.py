"""Write a researcher-readable report of everything the pipeline has produced so far.

Reads the per-question files under training_data/<model>/ and results/<model>/ (probe, state, flow,
RAIT sets, CRSS, evaluation records) for one or more models and recomputes every number from them.
Writes results/report.md, results/report.html (self-contained, images inlined) and the PNGs in
results/report_files/. A stage that has not run yet appears as "missing: run ..." instead of failing.

    python report.py                          # every model found
    python report.py --models smollm2-135m,gemma3-270m
    python report.py --models smollm2-135m,gemma3-270m --report-dir results/example ...   # the committed example (see its README)
"""

from __future__ import annotations

import argparse

from kb.errors import cli_main
from kb.layout import wrote
from kb.paths import repo_path
from kb.report import build_report, parse_models, write_report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help="comma-separated model folder names (default: all found)")
    p.add_argument("--output-dir", default="training_data", help="where the stages wrote per-question records")
    p.add_argument("--results-dir", default="results", help="where eval records live and the report is written")
    p.add_argument("--report-dir", default=None,
                   help="where report.md, report.html and report_files/ go (default: --results-dir)")
    p.add_argument("--title", default="kb knowledge-boundary report", help="HTML page title")
    return p


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    rep = build_report(repo_path(args.output_dir), repo_path(args.results_dir), parse_models(args.models),
                       repo_path(args.report_dir) if args.report_dir else None)
    md, html = write_report(rep, args.title)
    print(f"report: {len(rep.figures)} figures; {len(rep.missing)} missing stage(s)")
    for line in rep.missing:
        print("  missing:", line)
    for path in (md, html, *{f.parent for f in rep.figures}):  # the figures: one folder of PNGs
        wrote(path)


if __name__ == "__main__":
    main()
