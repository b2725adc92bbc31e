"""The researcher-facing report: every number recomputed from the per-question files of each stage.

Reads, per model (a folder name under training_data/ and results/):
  training_data/<model>/probe_*.jsonl             probe records (run_MMLU.py / run_ParaRel.py)
  training_data/<model>/state_*.jsonl             Cor, Cer per question (query_state.py)
  training_data/<model>/flow_*.jsonl              Cor, Cer of M0 and M~ per question (rehearsal_finetune.py)
  training_data/<model>/rait_*_text2text.json     RAIT sets with the ids each kept (build_rait.py);
                                                  CRSS is recomputed from them and state_*.reps.npy
  results/<model>/eval/<method>/*.jsonl           evaluation records per method and test set (evaluate.py)
and writes results/report.md, results/report.html (self-contained: PNGs inlined as base64) and the
PNGs under results/report_files/. A stage whose files are absent becomes a "missing: run ..." line, so
the report can be generated after any prefix of the pipeline.

Summaries written by the stages (results/<model>/probe_*.json, ...) are deliberately not read for
numbers: a report that recomputes from the records cannot drift from them.
"""

from __future__ import annotations

import base64
import functools
import html
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: reports are built on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from kb import bootstrap, findings, metrics  # noqa: E402
from kb.errors import KbError  # noqa: E402
from kb.io import read_json, read_jsonl  # noqa: E402
from kb.metrics import DEFAULT_BINS, ece, reliability_bins  # noqa: E402
from kb.paths import shown_path  # noqa: E402

OUTCOMES = metrics.LABELS  # Pc + Pw + Pr + P_fail = 100%
_OUTCOME_ALIASES = {"correct": "correct", "incorrect": "incorrect", "wrong": "incorrect", "refused": "refused",
                    "refusal": "refused", "idk": "refused", "fail_parse": "fail_parse", "fail": "fail_parse",
                    "failparse": "fail_parse", "unparsed": "fail_parse", "fail-parse": "fail_parse"}
INITIAL_METHODS = ("initial", "init", "m0", "base", "basic")  # method names meaning "the untuned model"
IDK = "I don't know"
SELECTION_COLOURS = {"vanilla": "tab:blue", IDK: "tab:red", "dropped": "tab:gray"}
MAX_SURE_PANELS = 6  # sure-probability reliability panels drawn; every row still gets its ECE in the table
MAX_ARROWS = 400  # more arrows than this make the flow plot unreadable; a seeded subset is drawn
RESERVED = {"report_files", "example"}  # folders under results/ that are not models


# ----------------------------------------------------------------------------------------- blocks
@dataclass
class Report:
    """The report as a list of blocks, rendered to both Markdown and HTML from the same content."""

    out_dir: Path
    blocks: list[tuple[str, Any]] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", (level, text)))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.blocks.append(("table", (list(headers), [[_cell(c) for c in r] for r in rows])))

    def miss(self, text: str) -> None:
        self.missing.append(text)
        self.blocks.append(("missing", text))

    def fig(self, fig: Any, name: str, caption: str) -> None:
        path = self.out_dir / "report_files" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        self.figures.append(path)
        self.blocks.append(("fig", (path, caption)))


def _cell(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.2f}"
    return str(v)


def render_md(rep: Report) -> str:
    out = []
    for kind, val in rep.blocks:
        if kind == "h":
            out.append("#" * val[0] + " " + val[1])
        elif kind == "p":
            out.append(val)
        elif kind == "missing":
            out.append(f"> **missing:** {val}")
        elif kind == "table":
            headers, rows = val
            out.append("| " + " | ".join(headers) + " |\n|" + "---|" * len(headers))
            out[-1] += "".join("\n| " + " | ".join(r) + " |" for r in rows)
        elif kind == "fig":
            path, caption = val
            out.append(f"![{path.stem}]({path.relative_to(rep.out_dir).as_posix()})\n\n*{caption}*")
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #bbb;padding:3px 8px;text-align:left}
th{background:#eee}td.num{text-align:right}figure{margin:1.5em 0}img{max-width:100%}
figcaption{font-size:14px;color:#444;max-width:900px}.missing{background:#fff4e5;border-left:4px solid #f0a020;
padding:6px 10px;margin:0.6em 0}code{background:#f3f3f3;padding:0 3px}"""


def _align(cell: str) -> str:
    """Numbers right-aligned (so decimals line up), words left."""
    return " class='num'" if re.fullmatch(r"-?[\d.]+( \(n=\d+\))?|n/a", cell) else ""


def render_html(rep: Report, title: str) -> str:
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{CSS}</style></head><body>"]
    for kind, val in rep.blocks:
        if kind == "h":
            out.append(f"<h{val[0]}>{_inline(val[1])}</h{val[0]}>")
        elif kind == "p":
            out.append(f"<p>{_inline(val)}</p>")
        elif kind == "missing":
            out.append(f"<div class='missing'><b>missing:</b> {_inline(val)}</div>")
        elif kind == "table":
            headers, rows = val
            out.append("<table><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in headers) + "</tr>")
            out.extend("<tr>" + "".join(f"<td{_align(c)}>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows)
            out.append("</table>")
        elif kind == "fig":
            path, caption = val
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            out.append(f"<figure><img alt='{html.escape(caption, quote=True)}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{_inline(caption)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------- inputs
def _pick(rec: dict[str, Any], *names: str) -> Any:
    for n in names:
        if rec.get(n) is not None:
            return rec[n]
    return None


def find_models(training_dir: Path, results_dir: Path) -> list[str]:
    """Model folders present under either tree (a folder with at least one file in it)."""
    names: set[str] = set()
    for root in (training_dir, results_dir):
        if root.is_dir():
            names |= {d.name for d in root.iterdir() if d.is_dir() and d.name not in RESERVED and any(d.rglob("*.*"))}
    return sorted(names)


@dataclass
class ProbeSet:
    """One probe file of one model: its records and what kind of questions they are."""

    name: str  # e.g. MMLU_ID_train_5shot
    records: list[dict[str, Any]]
    mcq: bool

    @property
    def accuracy(self) -> float:
        return sum(bool(r["correct"]) for r in self.records) / len(self.records)

    def by_group(self) -> list[tuple[str, int, float]]:
        """(group, n, accuracy) sorted by accuracy then name: the knowledge boundary, best known first."""
        groups: dict[str, list[bool]] = defaultdict(list)
        for r in self.records:
            groups[str(r.get("group") or "all")].append(bool(r["correct"]))
        rows = [(g, len(v), sum(v) / len(v)) for g, v in groups.items()]
        return sorted(rows, key=lambda t: (-t[2], t[0]))

    def chance(self) -> float | None:
        if not self.mcq:
            return None
        return metrics.chance_accuracy([len(r["choices"]) if r.get("choices") else 4 for r in self.records])


def load_probes(model_dir: Path) -> list[ProbeSet]:
    out = []
    for path in sorted(model_dir.glob("probe_*.jsonl")):
        recs = read_jsonl(path)
        if not recs:
            continue
        for i, r in enumerate(recs, start=1):
            if "correct" not in r:
                raise KbError(f"{path}: row {i}: field 'correct' missing; is this a probe file?")
        mcq = "letter_probs" in recs[0] or "choices" in recs[0]
        out.append(ProbeSet(path.stem[len("probe_"):], recs, mcq))
    return out


def pretty(name: str) -> str:
    """MMLU_ID_train_5shot -> 'MMLU ID train (5-shot)'."""
    m = re.match(r"(.*)_(\d+)shot$", name)
    base, shots = (m.group(1), f" ({m.group(2)}-shot)") if m else (name, "")
    return base.replace("_", " ") + shots


def load_state(model_dir: Path, problems: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """{state set name: {id: {'cor', 'cer'}}} from query_state.py's files, validated by kb.statefile.

    A file that does not load (an interrupted query, a stale meta) is reported in `problems`, not raised:
    the rest of the report is still worth reading.
    """
    from kb import statefile

    out = {}
    for path in sorted(model_dir.glob("state_*.jsonl")):
        if path.stem.endswith("_rehearsed"):
            continue  # M~'s state (rehearsal_finetune.py): shown through the flow file, not as a source set
        try:
            sf = statefile.load_state(path)
        except KbError as err:
            problems.append(f"{err}")
            continue
        out[path.stem[len("state_"):]] = {r["id"]: {"cor": r["cor"], "cer": r["cer"]} for r in sf.records}
    return out


def load_flow(model_dir: Path, problems: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """{flow set name: {id: {'cor0','cer0','cor1','cer1'}}} from rehearsal_finetune.py's flow files."""
    from kb import statefile

    out = {}
    for path in sorted(model_dir.glob("flow_*.jsonl")):
        try:
            ff = statefile.load_flow(path)
        except KbError as err:
            problems.append(f"{err}")
            continue
        out[path.stem[len("flow_"):]] = {r["id"]: {k: r[k] for k in ("cor0", "cer0", "cor1", "cer1")} for r in ff.records}
    return out


def load_rait(model_dir: Path, problems: list[str]) -> dict[str, dict[str, dict[str, list[str]]]]:
    """{source name: {method: {'van': ids, 'idk': ids}}} from the ids build_rait.py stores in each RAIT set."""
    out: dict[str, dict[str, dict[str, list[str]]]] = defaultdict(dict)
    for path in sorted(model_dir.glob("rait_*_text2text.json")):
        data = read_json(path)
        meta = data.get("kb_meta") if isinstance(data, dict) else None
        ids, labels = (meta or {}).get("instance_ids"), (meta or {}).get("instance_labels")
        method = (meta or {}).get("method")
        if not isinstance(ids, list) or not isinstance(labels, list) or len(ids) != len(labels) or not method:
            problems.append(f"{path}: no kb_meta instance_ids / instance_labels / method (rerun build_rait.py)")
            continue
        name = path.name.removeprefix(f"rait_{method}_").removesuffix("_text2text.json")
        out[name][method] = {"van": [i for i, x in zip(ids, labels) if x == "van"],
                             "idk": [i for i, x in zip(ids, labels) if x == "idk"],
                             "tau_sim": meta.get("crss_tau_sim"),  # type: ignore[dict-item]
                             "tau_mu": (meta.get("params") or {}).get("tau_mu")}  # type: ignore[dict-item]
    return dict(out)


def recompute_crss(model_dir: Path, rait: dict[str, dict[str, dict[str, Any]]], problems: list[str],
                   kinds: dict[str, str]) -> dict[str, dict[str, float | None]]:
    """CRSS of every RAIT set, recomputed from M0's question representations and the set's own ids."""
    from kb import statefile
    from kb.crss import TAU_SIM, crss_report

    out: dict[str, dict[str, float | None]] = {}
    for name, methods in rait.items():
        path = model_dir / f"state_{name}.jsonl"
        try:
            state = statefile.load_state(path)
            index, reps = statefile.load_reps(state)
            kinds[name] = state.kind
        except KbError as err:
            problems.append(f"CRSS of the {name} sets not recomputed: {err}")
            continue
        out[name] = {m: crss_report(index, reps, sel["van"], sel["idk"], sel.get("tau_sim") or TAU_SIM, ())["crss"]
                     for m, sel in methods.items()}
    return out


def outcome_of(rec: dict[str, Any]) -> str:
    """Normalise one evaluation record to correct / incorrect / refused / fail_parse."""
    raw = _pick(rec, "outcome", "label", "status", "judgement")
    if isinstance(raw, str):
        key = raw.strip().lower().replace(" ", "_")
        if key in _OUTCOME_ALIASES:
            return _OUTCOME_ALIASES[key]
        raise KbError(f"unknown evaluation outcome {raw!r}; expected one of {', '.join(OUTCOMES)}")
    if rec.get("refused"):
        return "refused"
    if rec.get("fail_parse"):
        return "fail_parse"
    if "correct" in rec:
        return "correct" if rec["correct"] else "incorrect"
    raise KbError("evaluation record has no outcome field (outcome / refused / correct)")


@dataclass
class EvalSet:
    """Evaluation records of one (method, test set) of one model."""

    method: str
    test_set: str
    records: list[dict[str, Any]]
    path: Path

    def rates(self, ids: set[str] | None = None) -> dict[str, float] | None:
        """Pc, Pw, Pr, P_fail in percent (kb.metrics, as evaluate.py computes them), over `ids` when
        given (None when some of them were not evaluated here)."""
        recs = self.records if ids is None else [r for r in self.records if r["id"] in ids]
        if ids is not None and len(recs) != len(ids):
            return None
        return metrics.rates([outcome_of(r) for r in recs])

    def ap(self) -> float | None:
        """R-Tuning's AP as evaluate.py defines it: over answers with both answer_conf and sure_prob,
        correctness of the answer (`ap_correct`) ranked by 0.5·answer_conf + 0.5·sure_prob."""
        return metrics.table_ap(self.table())

    def table(self, broad: bool = False) -> metrics.QuestionTable:
        """The per-question table of kb.metrics, outcomes normalised by outcome_of (records without
        outcome_broad use the strict outcome for the broad rule too)."""
        def norm(r: dict[str, Any]) -> dict[str, Any]:
            strict = outcome_of(r)
            broad = outcome_of({**r, "outcome": r["outcome_broad"]}) if r.get("outcome_broad") else strict
            return {**r, "outcome": strict, "outcome_broad": broad}

        return metrics.QuestionTable.from_records([norm(r) for r in self.records], broad=broad)

    @property
    def abstention(self) -> bool:
        """A set made to test abstention (SelfAware, FalseQA: registry `abstain_groups`)."""
        from kb.data import abstention_datasets

        return any(self.test_set.startswith(f"{d}_") for d in abstention_datasets()) or \
            any(r.get("should_abstain") for r in self.records)

    @property
    def kind(self) -> str:
        """mcq or open, from the record fields evaluate.py writes (choices vs aliases)."""
        return "mcq" if "choices" in self.records[0] else "open"


def answer_correct(rec: dict[str, Any]) -> bool:
    """Was the answer right, whatever the reply's verdict: MCQ's argmax letter (`ap_correct`), else the outcome."""
    return bool(rec["ap_correct"]) if "ap_correct" in rec else outcome_of(rec) == "correct"


def load_evals(res_dir: Path) -> list[EvalSet]:
    out = []
    root = res_dir / "eval"
    for path in sorted(root.rglob("*.jsonl")) if root.is_dir() else []:
        recs = read_jsonl(path)
        if not recs:
            continue
        rel = path.relative_to(root).with_suffix("")
        method = str(_pick(recs[0], "method") or (rel.parts[0] if len(rel.parts) > 1 else rel.stem))
        test = str(_pick(recs[0], "test_set", "dataset") or (rel.parts[-1] if len(rel.parts) > 1 else "test"))
        out.append(EvalSet(method, test, recs, path))
    return out


def is_initial(method: str) -> bool:
    return method.strip().lower() in INITIAL_METHODS


# ---------------------------------------------------------------------------------------- figures
MAX_COLS = 3  # panels per row; more models or test sets wrap onto further rows


def _grid(n: int, width: float, height: float, max_cols: int = MAX_COLS) -> tuple[Any, list[Any]]:
    """n panels side by side (wrapping after max_cols), so models compare at a glance; spare axes hidden."""
    cols = min(n, max_cols)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def fig_accuracy(sets: list[tuple[str, ProbeSet]]) -> Any:
    """Horizontal bars of accuracy per group, sorted, one panel per model."""
    n_groups = max(len(ps.by_group()) for _, ps in sets)
    fig, axes = _grid(len(sets), 6.0, max(2.5, 0.22 * n_groups + 1.5))
    for ax, (model, ps) in zip(axes, sets):
        rows = ps.by_group()[::-1]  # best on top
        y = np.arange(len(rows))
        ax.barh(y, [100 * a for _, _, a in rows], color="tab:blue", alpha=0.8)
        ax.set_yticks(y, [g for g, _, _ in rows], fontsize=7)
        for yi, (_, n, a) in zip(y, rows):  # right answers / questions: a 1/1 bar is not a 40/40 bar
            ax.text(min(100 * a, 88) + 1, yi, f"{round(a * n)}/{n}", va="center", fontsize=6)
        ax.axvline(100 * ps.accuracy, color="k", ls="--", lw=1, label=f"overall {100 * ps.accuracy:.1f}%")
        if ps.chance() is not None:
            ax.axvline(100 * ps.chance(), color="tab:red", ls=":", lw=1.2, label=f"chance {100 * ps.chance():.0f}%")
        ax.set_xlim(0, 100)
        ax.set_ylim(-0.6, len(rows) - 0.4)
        ax.set_xlabel("accuracy (%)")
        ax.set_title(f"{model}: {pretty(ps.name)}", fontsize=10)
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return fig


def fig_reliability(panels: list[tuple[str, np.ndarray, np.ndarray]], what: str) -> Any:
    """Reliability diagram per panel: accuracy per confidence bin against the diagonal, with ECE."""
    fig, axes = _grid(len(panels), 4.2, 4.2)
    for ax, (title, conf, correct) in zip(axes, panels):
        bins = reliability_bins(conf, correct)
        centres = [(b.lo + b.hi) / 2 for b in bins]
        acc = [b.accuracy if b.count else 0 for b in bins]
        ax.bar(centres, acc, width=1 / DEFAULT_BINS, edgecolor="k", color="tab:blue", alpha=0.75, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        for c, b in zip(centres, bins):
            if b.count:
                ax.text(c, 0.02, str(b.count), ha="center", fontsize=6, color="white" if (b.accuracy or 0) > 0.08 else "k")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel(f"{what} (bin)")
        ax.set_ylabel("fraction correct")
        ax.set_title(f"{title}\nECE = {ece(conf, correct):.3f}, n = {len(conf)}", fontsize=9)
        ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    return fig


def fig_state(panels: list[tuple[str, dict[str, dict[str, float]], dict[str, str] | None, float | None]]) -> Any:
    """Cor vs Cer of the source set, coloured by the CRaFT selection when known, with its τ_μ line."""
    fig, axes = _grid(len(panels), 5.0, 4.5)
    for ax, (title, state, sel, tau_mu) in zip(axes, panels):
        if tau_mu is not None:
            ax.axvline(tau_mu, color="k", ls="--", lw=0.8, label=f"τ_μ = {tau_mu:g} (known to the right)")
        groups: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for qid, s in state.items():
            groups[(sel.get(qid, "dropped") if sel is not None else "not selected yet")].append((s["cor"], s["cer"]))
        for label, pts in sorted(groups.items()):
            xy = np.asarray(pts)
            ax.scatter(xy[:, 0], xy[:, 1], s=9, alpha=0.6, color=SELECTION_COLOURS.get(label, "tab:purple"),
                       label=f"{label} ({len(pts)})")
        ax.set_xlabel("Cor (correctness of M0)")
        ax.set_ylabel("Cer (certainty of M0)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def fig_flow(panels: list[tuple[str, dict[str, dict[str, float]]]]) -> Any:
    """Arrows from each question's (Cor, Cer) under M0 to its place under the rehearsed M~."""
    fig, axes = _grid(len(panels), 5.0, 4.5)
    rng = np.random.default_rng(0)
    for ax, (title, flow) in zip(axes, panels):
        rows = np.asarray([[f["cor0"], f["cer0"], f["cor1"], f["cer1"]] for f in flow.values()])
        shown = rows if len(rows) <= MAX_ARROWS else rows[rng.choice(len(rows), MAX_ARROWS, replace=False)]
        d = shown[:, 2:] - shown[:, :2]
        up = d[:, 0] >= 0
        for mask, colour, label in ((up, "tab:green", "Cor rises or stays"), (~up, "tab:red", "Cor falls")):
            if mask.any():
                ax.quiver(shown[mask, 0], shown[mask, 1], d[mask, 0], d[mask, 1], angles="xy", scale_units="xy", scale=1,
                          width=0.003, color=colour, alpha=0.6, label=f"{label} ({int(mask.sum())})")
        ax.scatter(shown[:, 0], shown[:, 1], s=4, color="k", alpha=0.5)
        pad = 0.05
        ax.set_xlim(min(rows[:, [0, 2]].min(), 0) - pad, max(rows[:, [0, 2]].max(), 1) + pad)
        lo, hi = rows[:, [1, 3]].min(), rows[:, [1, 3]].max()
        ax.set_ylim(lo - pad * (hi - lo + 1e-9), hi + pad * (hi - lo + 1e-9))
        ax.set_xlabel("Cor")
        ax.set_ylabel("Cer")
        extra = f", {len(shown)} of {len(rows)} drawn" if len(shown) < len(rows) else ""
        ax.set_title(f"{title}{extra}", fontsize=9)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def fig_flow_density(panels: list[tuple[str, dict[str, dict[str, float]]]]) -> Any:
    """Before/after distributions of Cor and Cer: where the rehearsal moved the whole set, even when arrows are short."""
    fig, axes = _grid(2 * len(panels), 4.2, 3.4, max_cols=2)  # one row per model: Cor, Cer
    for k, (title, flow) in enumerate(panels):
        for ax, (key, label) in zip(axes[2 * k: 2 * k + 2], (("cor", "Cor"), ("cer", "Cer"))):
            before = np.asarray([f[f"{key}0"] for f in flow.values()])
            after = np.asarray([f[f"{key}1"] for f in flow.values()])
            lo, hi = min(before.min(), after.min()), max(before.max(), after.max())
            bins = np.linspace(lo, hi + 1e-9, 21)
            ax.hist(before, bins=bins, histtype="step", lw=1.8, color="tab:blue", label=f"M0 (mean {before.mean():.3f})")
            ax.hist(after, bins=bins, histtype="step", lw=1.8, ls="--", color="tab:orange", label=f"M̃ (mean {after.mean():.3f})")
            ax.set_xlabel(label)
            ax.set_ylabel("questions")
            ax.set_title(f"{title}: {label} before / after", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


MARKERS = "osD^vP<>Xph"  # one marker shape per method in a panel, so coinciding points stay distinguishable


def fig_plane(panels: list[tuple[str, list[dict[str, Any]]]]) -> Any:
    """Per panel (model x test set) two axes: the (W, Pc) plane with interval whiskers and numbered points
    (names in the legend, so labels never overlap), and THS per method with its interval."""
    fig, axes = _grid(2 * len(panels), 4.6, 5.0, max_cols=2)
    for k, (title, rows) in enumerate(panels):
        ax, ax2 = axes[2 * k], axes[2 * k + 1]
        wrong = [r["Pw"] + r["P_fail"] for r in rows]
        top = max([r["Pc"] for r in rows] + wrong + [1.0]) * 1.15
        init = next((r for r in rows if is_initial(r["method"])), None)
        if init is not None and init["Pw"] + init["P_fail"] > 0:
            xs = np.linspace(0, top, 10)
            ax.plot(xs, xs * init["Pc"] / (init["Pw"] + init["P_fail"]), "k--", lw=1, label="THS = 0")
        for i, (r, w) in enumerate(zip(rows, wrong), start=1):
            ci = r["ci"]
            pc_err = np.array([[r["Pc"] - ci["Pc"][0]], [ci["Pc"][1] - r["Pc"]]]) if ci.get("Pc") else None
            ax.errorbar([w], [r["Pc"]], yerr=pc_err, fmt=MARKERS[(i - 1) % len(MARKERS)] if not is_initial(r["method"])
                        else "*", ms=7, capsize=2, lw=0.8, label=r["method"], zorder=3, alpha=0.85)
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.set_xlabel("W = Pw + P_fail: answered wrongly or unparseably (%)")
        ax.set_ylabel("Pc: answered correctly (%)")
        ax.set_title(title, fontsize=9)
        # names in a legend below the axes: points may coincide, their labels never overlap
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
        tuned = [r for r in rows if not is_initial(r["method"]) and r["THS"] is not None]
        ys = np.arange(len(tuned))
        for y, r in zip(ys, tuned):
            ci = r["ci"].get("THS")
            err = np.array([[r["THS"] - ci[0]], [ci[1] - r["THS"]]]) if ci else None
            ax2.errorbar([r["THS"]], [y], xerr=err, fmt="o", capsize=3, color="C0" if ci is None or ci[0] <= 0 <= ci[1]
                         else ("C2" if ci[0] > 0 else "C3"))
        ax2.axvline(0, color="k", lw=1, ls="--")
        ax2.set_yticks(ys, [r["method"] for r in tuned], fontsize=7)
        ax2.invert_yaxis()
        ax2.set_xlabel("THS vs the initial model (95% interval)")
        ax2.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------- builder
@dataclass
class ModelData:
    """Everything the report reads for one model."""

    name: str
    probes: list[ProbeSet]
    state: dict[str, dict[str, dict[str, float]]]
    flow: dict[str, dict[str, dict[str, float]]]
    rait: dict[str, dict[str, dict[str, list[str]]]]  # source name -> method -> {'van', 'idk'} ids
    crss: dict[str, dict[str, float | None]]  # source name -> method -> CRSS at the set's tau_sim
    evals: list[EvalSet]
    problems: list[str] = field(default_factory=list)  # files present but unreadable, reported verbatim
    source_kind: dict[str, str] = field(default_factory=dict)  # state/RAIT source name -> mcq | open


def load_model_data(name: str, training_dir: Path, results_dir: Path) -> ModelData:
    td, rd = training_dir / name, results_dir / name
    problems: list[str] = []
    have_td, have_rd = td.is_dir(), rd.is_dir()
    rait = load_rait(td, problems) if have_td else {}
    kinds: dict[str, str] = {}
    crss = recompute_crss(td, rait, problems, kinds)
    return ModelData(name, load_probes(td) if have_td else [], load_state(td, problems) if have_td else {},
                     load_flow(td, problems) if have_td else {}, rait, crss,
                     load_evals(rd) if have_rd else [], problems, kinds)


def _fig_name(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(parts)).strip("-")


def method_rows(md: ModelData) -> list[dict[str, Any]]:
    """One row per (test set, method): rates, THS against the initial model on that test set, AP, CRSS."""
    by_test: dict[str, list[EvalSet]] = defaultdict(list)
    for ev in md.evals:
        if ev.abstention:  # SelfAware / FalseQA: the refusal-transfer section, not THS
            continue
        by_test[ev.test_set].append(ev)
    rows = []
    for test, evs in sorted(by_test.items()):
        init = next((e for e in evs if is_initial(e.method)), None)
        for ev in sorted(evs, key=lambda e: (not is_initial(e.method), e.method)):
            r = ev.rates()
            assert r is not None
            outcomes = [outcome_of(x) for x in ev.records]
            # THS against the initial model on this method's own questions (a smaller --limit is a subset)
            ids = [x["id"] for x in ev.records]
            r1 = init.rates(set(ids)) if init else None
            ci = bootstrap.rate_intervals(outcomes)
            if r1 is not None and not is_initial(ev.method):
                by_id = {x["id"]: outcome_of(x) for x in init.records}  # type: ignore[union-attr]
                ci["THS"] = bootstrap.ths_interval(outcomes, [by_id[i] for i in ids])
            ap = ev.ap()
            ci["AP"] = None if ap is None else bootstrap.table_ap_interval(ev.table())
            rows.append({"model": md.name, "test_set": test, "method": ev.method, "n": len(ev.records), **r,
                         "THS": metrics.ths_of_rates(r, r1) if r1 else None,
                         "AP": None if ap is None else 100 * ap, "ci": ci,
                         "CRSS": crss_for(md, ev.method, ev.kind)})
    return rows


def _ci_cell(row: dict[str, Any], key: str) -> str:
    return bootstrap.fmt(row[key], row["ci"].get(key) if row[key] is not None else None)


def crss_for(md: ModelData, method: str, kind: str) -> float | None:
    """CRSS of the RAIT set a method was trained on: the source set of the test set's kind (MCQ / open)
    that has a set of that method name, when exactly one does (else n/a rather than a guess)."""
    hits = [c[method] for name, c in md.crss.items() if method in c and md.source_kind.get(name) == kind]
    return hits[0] if len(hits) == 1 else None


def build_report(training_dir: Path, results_dir: Path, models: Sequence[str] | None = None,
                 report_dir: Path | None = None) -> Report:
    """Assemble the report for `models` (default: every model folder found), to be written to
    `report_dir` (default: the results dir)."""
    found = find_models(training_dir, results_dir)
    if models:
        unknown = [m for m in models if m not in found]
        if unknown:
            raise KbError(f"no files for model(s) {', '.join(unknown)} under {training_dir} or {results_dir}; "
                          f"found: {', '.join(found) or 'none'}")
        names = list(models)
    else:
        names = found
    if not names:
        raise KbError(f"no model folders under {training_dir} or {results_dir}: run run_MMLU.py / run_ParaRel.py first")
    data = [load_model_data(n, training_dir, results_dir) for n in names]
    rep = Report(report_dir or results_dir)
    rep.h(1, "Knowledge-boundary report")
    rep.p(f"Models: {', '.join(names)}. Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC from `{shown_path(training_dir)}` and "
          f"`{shown_path(results_dir)}`. Every number below is recomputed from the per-question record files.")
    _section_answers(rep, results_dir, names)
    _section_summary(rep, data)
    _section_boundary(rep, data)
    _section_state(rep, data)
    _section_calibration(rep, data)
    _section_methods(rep, data)
    _section_transfer(rep, data)
    return rep


def _section_answers(rep: Report, results_dir: Path, names: Sequence[str]) -> None:
    """The study's four answers first, when its fine-tunes were repeated over seeds (kb.findings)."""
    tests = findings.seeded_test_sets(results_dir, names)
    if not tests:
        return
    result = findings.study(results_dir, names, tests)
    rep.h(2, "The answers")
    for question, text in findings.answers(result, names):
        rep.p(f"**{question}**")
        for line in text.splitlines():
            rep.p(line)
    rep.fig(findings.forest_figure(result), "answers_forest",
            "Head-to-head ΔTHS per model and test set: the seed mean (dot), its 95% bootstrap interval over "
            "questions (bar) and each seed's difference (grey). Right of 0: the first method is better.")
    for title, table in (("Methods (means over seeds)", findings.methods_table(result["methods"])),
                         ("Head-to-head comparisons", findings.comparisons_table(result["comparisons"])),
                         ("Refusal transfer (SelfAware, FalseQA)", findings.transfer_table(result["transfer"]))):
        rep.h(3, title)
        rep.table(*table)
    rep.p(findings.NOTES)


def _section_summary(rep: Report, data: list[ModelData]) -> None:
    rep.h(2, "Cross-model summary")
    sets = sorted({ps.name for md in data for ps in md.probes})
    if not sets:
        rep.miss("no probe records for any model: run `python run_MMLU.py --model <model>` and "
                 "`python run_ParaRel.py --model <model>`")
        return
    rows = []
    for md in data:
        got = {ps.name: ps for ps in md.probes}
        row: list[Any] = [md.name]
        for s in sets:
            ps = got.get(s)
            row.append(f"{100 * ps.accuracy:.1f} (n={len(ps.records)})" if ps else "missing")
        mrows = [r for r in method_rows(md) if r["THS"] is not None and not is_initial(r["method"])]
        best = max(mrows, key=lambda r: r["THS"], default=None)
        row.append(f"{best['method']} on {best['test_set']}: {best['THS']:.1f}" if best else "missing")
        rows.append(row)
    rep.p("Probe accuracy (%) of the untuned model M0 per probe set, and the tuned method with the highest THS.")
    rep.table(["model", *(pretty(s) for s in sets), "best THS"], rows)
    all_rows = [r for md in data for r in method_rows(md)]
    if len(data) > 1 and all_rows:
        keys = sorted({(r["test_set"], r["method"]) for r in all_rows}, key=lambda k: (k[0], not is_initial(k[1]), k[1]))
        got = {(r["model"], r["test_set"], r["method"]): r for r in all_rows}
        rep.p("THS and Pc / Pw / Pr (%) per test set and method, one column per model (\"missing\": not evaluated).")
        rep.table(["test set", "method", *(md.name for md in data)],
                  [[t, m, *(_brief(got.get((md.name, t, m))) for md in data)] for t, m in keys])
    for md in data:
        for ps in md.probes:
            ch = ps.chance()
            note = None if ch is None else metrics.near_chance_note(ps.accuracy, ch)
            if note:
                rep.p(f"Note: {md.name} on {pretty(ps.name)}: {note} (docs/method.md §3.7).")


def _brief(row: dict[str, Any] | None) -> str:
    if row is None:
        return "missing"
    th = "n/a" if row["THS"] is None else f"{row['THS']:.1f}"
    return f"THS {th} ({row['Pc']:.0f}/{row['Pw']:.0f}/{row['Pr']:.0f})"


def _section_boundary(rep: Report, data: list[ModelData]) -> None:
    rep.h(2, "1. Knowledge boundary: accuracy per subject and relation")
    rep.p("A question is known when M0's greedy answer is correct (MMLU: the argmax letter; ParaRel: the gold answer "
          "occurs in the greedy answer). Bars are sorted, best-known group on top; each bar is labelled right answers / "
          "questions of that group in the probe file.")
    for name in sorted({ps.name for md in data for ps in md.probes}):
        sets = [(md.name, ps) for md in data for ps in md.probes if ps.name == name]
        rep.h(3, pretty(name))
        rep.fig(fig_accuracy(sets), _fig_name("accuracy", name),
                f"Accuracy of M0 per {'subject' if sets[0][1].mcq else 'relation'} on {pretty(name)}, one panel per "
                "model. Dashed: overall accuracy" + ("; dotted red: chance (1 / number of options)." if sets[0][1].mcq else "."))
        for model, ps in sets:
            rows = ps.by_group()
            if len(rows) > 1:
                rep.p(f"{model}: best known {rows[0][0]} ({100 * rows[0][2]:.0f}%), least known {rows[-1][0]} "
                      f"({100 * rows[-1][2]:.0f}%), over {len(rows)} groups.")
    for md in data:
        kinds = {"MMLU" if ps.name.startswith("MMLU") else ps.name.split("_")[0] for ps in md.probes}
        if "MMLU" not in kinds:
            rep.miss(f"{md.name}: no MMLU probe: run `python run_MMLU.py --model {md.name}`")
        if "ParaRel" not in kinds:
            rep.miss(f"{md.name}: no ParaRel probe: run `python run_ParaRel.py --model {md.name}`")


def _section_state(rep: Report, data: list[ModelData]) -> None:
    rep.h(2, "2. Knowledge state and knowledge flow (CRaFT)")
    for md in data:
        for problem in md.problems:
            rep.miss(f"{md.name}: unreadable stage file: {problem}")
    rep.p("Each point is a source-set question placed by M0's correctness Cor and certainty Cer (docs/method.md §4). Colours: "
          "what the CRaFT RAIT set did with it: kept with its answer (vanilla), relabelled \"I don't know\", or dropped.")
    panels = []
    for md in data:
        if not md.state:
            rep.miss(f"{md.name}: no knowledge-state file (training_data/{md.name}/state_*.jsonl): "
                     f"run `python query_state.py --model {md.name}`")
            continue
        for name, st in md.state.items():
            craft = md.rait.get(name, {}).get("craft")
            sel = None if craft is None else {**{i: "vanilla" for i in craft["van"]}, **{i: IDK for i in craft["idk"]}}
            panels.append((f"{md.name}: {pretty(name)} (n={len(st)})", st, sel, None if craft is None else craft.get("tau_mu")))
            if sel is None:
                rep.miss(f"{md.name}: no CRaFT set for {pretty(name)} (training_data/{md.name}/rait_craft_{name}_text2text.json): "
                         f"run `python build_rait.py --model {md.name}`")
            else:
                got = Counter(sel.get(q, "dropped") for q in st)
                rep.p(f"{md.name} {pretty(name)}: CRaFT kept {got['vanilla']} as vanilla, relabelled {got[IDK]} "
                      f"\"{IDK}\", dropped {got['dropped']} of {len(st)} questions.")
    if panels:
        rep.fig(fig_state(panels), "state_map", "Knowledge-state map: Cor vs Cer of M0 on the source set, one panel per "
                "model and state file, coloured by the CRaFT selection (counts in the legend).")
    flows = []
    for md in data:
        if not md.flow:
            rep.miss(f"{md.name}: no knowledge-flow file (training_data/{md.name}/flow_*.jsonl): "
                     f"run `python rehearsal_finetune.py --model {md.name}`")
            continue
        for name, fl in md.flow.items():
            flows.append((f"{md.name}: {pretty(name)}", fl))
            dmu = np.asarray([f["cor1"] - f["cor0"] for f in fl.values()])
            dsig = np.asarray([f["cer1"] - f["cer0"] for f in fl.values()])
            rep.p(f"{md.name} {pretty(name)}: mean Δμ = {dmu.mean():+.3f}, mean Δσ = {dsig.mean():+.3f}; Cor falls for "
                  f"{int((dmu < 0).sum())}, stays for {int((dmu == 0).sum())}, rises for {int((dmu > 0).sum())} of "
                  f"{len(dmu)} questions.")
    if flows:
        rep.fig(fig_flow(flows), "flow", "Knowledge flow M0 → M̃ (rehearsal fine-tune): each arrow goes from a "
                "question's (Cor, Cer) under M0 to its (Cor, Cer) under M̃. Red: Cor falls (CRaFT may relabel it "
                "\"I don't know\" when Cor < τ_μ); green: Cor rises or stays.")
        rep.fig(fig_flow_density(flows), "flow_density", "Distribution of Cor and Cer over the source set under M0 (solid) "
                "and under the rehearsed model M̃ (dashed), per model: the same flow as the arrows, summarised.")


def _section_calibration(rep: Report, data: list[ModelData]) -> None:
    rep.h(2, "3. Calibration")
    rep.p(f"Reliability diagrams: questions are put in {DEFAULT_BINS} equal-width confidence bins; a bar is the "
          "fraction correct in the bin (its count printed at the bottom). ECE = Σ (bin size / n) · |accuracy − mean "
          "confidence|. MMLU confidence: the highest of the four renormalised letter probabilities; ParaRel: the "
          "geometric mean of the greedy tokens' probabilities.")
    for name in sorted({ps.name for md in data for ps in md.probes}):
        panels = []
        for md in data:
            for ps in md.probes:
                if ps.name != name:
                    continue
                recs = [r for r in ps.records if r.get("answer_conf") is not None]
                if recs:
                    panels.append((f"{md.name}: {pretty(name)}", np.asarray([r["answer_conf"] for r in recs], float),
                                   np.asarray([bool(r["correct"]) for r in recs])))
        if panels:
            rep.fig(fig_reliability(panels, "answer confidence"), _fig_name("reliability", name),
                    f"Reliability of M0's answer confidence on {pretty(name)} (probe records), one panel per model.")
            rep.table(["model", "set", "n", "mean confidence", "accuracy", "ECE"],
                      [[t.split(":")[0], pretty(name), len(c), float(c.mean()), float(y.mean()), ece(c, y)]
                       for t, c, y in panels])
    sure = []
    for md in data:
        for ev in md.evals:
            recs = [r for r in ev.records if r.get("sure_prob") is not None]
            if recs:
                sure.append((f"{md.name}: {ev.method} on {ev.test_set}", np.asarray([r["sure_prob"] for r in recs], float),
                             np.asarray([answer_correct(r) for r in recs])))
    if sure:
        # R-Tuning's rows are what the sure-probability is for; other rows are listed in the table only.
        shown = [p for p in sure if "rtuning" in p[0].split(": ", 1)[1]] or sure
        shown = shown[:MAX_SURE_PANELS]
        rep.fig(fig_reliability(shown, "sure-probability"), "reliability_sure",
                "Reliability of R-Tuning's sure-probability p(sure)/(p(sure)+p(unsure)), read after the answer and "
                "\"Are you sure …? I am\", against whether the answer was right"
                + (f"; {len(shown)} of {len(sure)} evaluated rows shown (R-Tuning's first)." if len(shown) < len(sure) else "."))
        rep.table(["model: method on test set", "n", "mean sure_prob", "answer accuracy", "ECE"],
                  [[t, len(c), float(c.mean()), float(y.mean()), ece(c, y)] for t, c, y in sure])
    else:
        rep.miss("no evaluation records with `sure_prob` (R-Tuning's confidence): run `python evaluate.py` "
                 "(without --no-ap)")


def _section_methods(rep: Report, data: list[ModelData]) -> None:
    rep.h(2, "4. Methods: refusal-aware tuning compared")
    rep.p("Pc / Pw / Pr / P_fail: percent of test questions answered correctly / wrongly / refused / unparsable "
          "(they sum to 100). THS = (Pc·W1 − W·Pc1)/W1 with W = Pw + P_fail (an unparseable reply counts as wrong) "
          "against the initial model (Pc1, W1) on the same questions (0 for the initial model, 100 for perfect). "
          "AP (%): average precision of correctness ranked by "
          "0.5·answer_conf + 0.5·sure_prob (answer_conf alone when there is no sure_prob). CRSS: the share of the "
          "method's \"I don't know\" training questions with a near-identical vanilla one (docs/method.md §5).")
    rows = [r for md in data for r in method_rows(md)]
    for md in data:
        if not md.evals:
            rep.miss(f"{md.name}: no evaluation records (results/{md.name}/eval/): run `python evaluate.py --model {md.name}`")
        elif not any(is_initial(e.method) for e in md.evals):
            rep.miss(f"{md.name}: no evaluation of the initial model, so THS is n/a: run `python evaluate.py` on M0")
        if not md.rait:
            rep.miss(f"{md.name}: no RAIT sets, so no CRSS (training_data/{md.name}/rait_*.json): "
                     f"run `python build_rait.py --model {md.name}`")
    crss_rows = [[md.name, pretty(name), m, len(md.rait[name][m]["van"]), len(md.rait[name][m]["idk"]), val]
                 for md in data for name, methods in md.crss.items() for m, val in methods.items()]
    if crss_rows:
        rep.p("RAIT sets built from each source set, with CRSS recomputed here from M0's question representations "
              "(state_*.reps.npy) and each set's own vanilla / \"I don't know\" ids, at the τ_sim the set was built with.")
        multi_m = len(data) > 1
        rep.table((["model"] if multi_m else []) + ["source set", "method", "vanilla", "I don't know", "CRSS"],
                  [r if multi_m else r[1:] for r in crss_rows])
    if not rows:
        return
    multi = len({r["model"] for r in rows}) > 1
    headers = (["model"] if multi else []) + ["test set", "method", "n", "Pc", "Pw", "Pr", "P_fail", "THS", "AP", "CRSS"]
    rep.table(headers, [([r["model"]] if multi else []) + [r["test_set"], r["method"], r["n"], _ci_cell(r, "Pc"),
                        _ci_cell(r, "Pw"), _ci_cell(r, "Pr"), r["P_fail"], _ci_cell(r, "THS"), _ci_cell(r, "AP"), r["CRSS"]]
                       for r in rows])
    rep.p(f"`value [lo, hi]`: 95% bootstrap interval over questions ({bootstrap.N_RESAMPLES} seeded resamples; THS "
          "resamples the method and the initial model together).")
    _differences(rep, data)
    panels = []
    for md in data:
        for test in sorted({r["test_set"] for r in rows if r["model"] == md.name}):
            sub = [r for r in rows if r["model"] == md.name and r["test_set"] == test]
            if any(not is_initial(r["method"]) for r in sub):  # a panel compares methods with M0
                panels.append((f"{md.name}: {test}", sub))
    if not panels:
        return
    rep.fig(fig_plane(panels), "ths_plane", "Left of each pair: the (W, Pc) plane, W = Pw + P_fail, one point "
            "per method with 95% interval whiskers on Pc (star: the initial model); the dashed line through the initial "
            "model is THS = 0. Right: THS per method against the initial model on that method's own questions, with "
            "its paired 95% interval; an interval clear of 0 is a change beyond sampling noise.")


def _differences(rep: Report, data: list[ModelData]) -> None:
    """Paired differences (kb.eval_table.paired_differences), marked where the interval excludes 0."""
    from kb.eval_table import DIFF_COLUMNS, DIFF_NOTES, paired_differences

    runs = {(md.name, ev.test_set, ev.method): functools.partial(lambda e: {x["id"]: {**x, "outcome": outcome_of(x)}
                                                                             for x in e.records}, ev)
            for md in data for ev in md.evals}
    diffs = paired_differences(runs)
    if not diffs:
        return
    rep.p("Paired differences on the same questions. " + DIFF_NOTES)
    multi = len(data) > 1

    def cell(d: dict[str, Any] | None) -> str:
        return "–" if d is None else bootstrap.fmt(d["value"], d["ci"]) + (" *" if d["significant"] else "")

    rep.table((["model"] if multi else []) + list(DIFF_COLUMNS),
              [([d["model"]] if multi else []) + [d["test set"], d["comparison"], d["n"],
                                                  *(cell(d[c]) for c in DIFF_COLUMNS[3:])] for d in diffs])


def fig_transfer(panels: list[tuple[str, list[tuple[str, float, float]]]]) -> Any:
    """Per model: one point per method at (false-refusal rate, refusal rate on should-abstain questions)."""
    fig, axes = _grid(len(panels), 4.8, 5.3)
    for ax, (title, points) in zip(axes, panels):
        ax.plot([0, 100], [0, 100], "k:", lw=1, label="refuses regardless of the question")
        for i, (method, x, y) in enumerate(points):
            ax.scatter([x], [y], s=40, marker="*" if method.startswith("initial") else MARKERS[i % len(MARKERS)],
                       zorder=3, alpha=0.85, label=method)
        ax.set_xlim(-3, 103)
        ax.set_ylim(-3, 103)
        ax.set_xlabel("refused, should answer (%): false refusals")
        ax.set_ylabel("refused, should abstain (%)")
        ax.set_title(title, fontsize=9)
        # names in a legend below the axes: methods often share a point, their labels never overlap
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    fig.tight_layout()
    return fig


def fig_risk_coverage(curves: list[tuple[str, np.ndarray, np.ndarray, float]]) -> Any:
    """Risk (error rate of the kept answers) against coverage, answers kept most confident first."""
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for title, cov, risk, area in curves:
        ax.plot(cov, risk, lw=1.5, label=f"{title} (AURC {area:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("coverage (share of answers kept)")
    ax.set_ylabel("risk (error rate of kept answers)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def _section_transfer(rep: Report, data: list[ModelData]) -> None:
    rep.h(2, "5. Refusal transfer: unanswerable and false-premise questions")
    rep.p("R-Tuning's claim that refusal is a meta-skill, tested on questions nobody can answer (SelfAware's "
          "unanswerable questions) and questions with a false premise (FalseQA), next to questions that should be "
          "answered (SelfAware's answerable ones, FalseQA's valid-premise edits, and the model's own test sets). "
          "Refusals by the strict rule (the reply contains \"I don't know\"; R-Tuning's \"… I am unsure.\" too). "
          "Abstention P / R / F1 (%): AbstentionBench's precision, recall and F1 with \"should abstain\" as the "
          "positive class (kb/metrics.py).")
    rows, panels = [], []
    for md in data:
        by_method: dict[str, list[EvalSet]] = defaultdict(list)
        for ev in md.evals:
            by_method[ev.method].append(ev)
        points = []
        for method in sorted(by_method, key=lambda m: (not m.startswith("initial"), m)):
            evs = sorted(by_method[method], key=lambda e: (not e.abstention, e.test_set))
            if not any(e.abstention for e in evs):
                continue
            for ev in evs:
                st = metrics.suite(ev.table())
                f1b = metrics.suite(ev.table(broad=True))["abstain_f1"]
                rows.append([md.name, method, ev.test_set, st["n"], st["n_should_abstain"], st["Pr_should_abstain"],
                             st["Pr_should_answer"], *(None if v is None else 100 * v for v in
                                                       (st["abstain_precision"], st["abstain_recall"], st["abstain_f1"], f1b))])
            pooled = [ev.table() for ev in evs]
            abst = np.concatenate([t.abstained for t in pooled])
            should = np.concatenate([t.should_abstain for t in pooled])
            x, y = metrics.refusal_rate(abst, ~should), metrics.refusal_rate(abst, should)
            if x is not None and y is not None:
                points.append((method, x, y))
        if points:
            panels.append((md.name, points))
    if not rows:
        rep.miss("no evaluation on SelfAware or FalseQA: run `python evaluate.py --model <model> --test selfaware:test "
                 "--test falseqa:test --template refuse --limit 40` (and with --method for each tuned model)")
    else:
        rep.table(["model", "method", "test set", "n", "should abstain", "refused, should abstain (%)",
                   "refused, should answer (%)", "abst. P", "abst. R", "abst. F1", "abst. F1 broad"], rows)
        rep.fig(fig_transfer(panels), "refusal_transfer",
                "Refusal transfer, one point per method (star: the untuned model): x = share of the questions that should "
                "be answered that it refused (SelfAware answerable, FalseQA valid premise and its own test sets, pooled), "
                "y = share of the unanswerable and false-premise questions it refused. Up and to the left is better; on "
                "the dotted diagonal refusals ignore the question.")
    curves = []
    for md in data:
        for ev in md.evals:
            if ev.method == "initial" and ev.kind == "open" and not ev.abstention:
                t = ev.table()
                ans = t.answered
                if ans.any():
                    y_ok, conf = t.outcome[ans] == "correct", t.confidence[ans]
                    cov, risk = metrics.risk_coverage(y_ok, conf)
                    curves.append((f"{md.name}: {ev.test_set} (n={int(ans.sum())})", cov, risk, metrics.aurc(y_ok, conf)))
    if curves:
        rep.fig(fig_risk_coverage(curves), "risk_coverage",
                "Risk-coverage of the untuned model M0 on the open-answer track: its answers sorted by confidence (geometric "
                "mean of the greedy tokens' probabilities), most confident first; risk = error rate among the answers kept "
                "(tied confidences count at their expected error). AURC = the mean risk over all coverages; lower is better.")
    else:
        rep.miss("no open-answer evaluation of the initial model with answer confidences, so no risk-coverage plot: run "
                 "`python evaluate.py --model <model> --test pararel:ID_test`")


def write_report(rep: Report, title: str = "kb knowledge-boundary report") -> tuple[Path, Path]:
    """Write report.md and the self-contained report.html next to each other in the results dir."""
    from kb.io import write_text

    md = write_text(rep.out_dir / "report.md", render_md(rep))
    ht = write_text(rep.out_dir / "report.html", render_html(rep, title))
    return md, ht


def parse_models(arg: str | None) -> list[str] | None:
    return [m.strip() for m in arg.split(",") if m.strip()] if arg else None


__all__: Iterable[str] = ("build_report", "write_report", "parse_models", "outcome_of")
