"""One Markdown + HTML page per run folder, from what the commands left there (needs no torch: it reads files).

Sections appear only for what exists: the similarity heatmap and plan (analyze, share), training curves (distill),
the evaluation tables (eval, compare) and speed tables (bench) as those commands wrote them, the summary (run). Plots
are drawn with matplotlib; the HTML is the `markdown` package's rendering of the same Markdown.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import markdown

from echoatt.common import is_model_folder
from echoatt.engines.vllm_serve import serving_text
from echoatt.planning.plan import AT_MOST
from echoatt.run.results import OTHER_ROW, QUICK_SPEED, RunSummary, TradeCurve, training_line, zero_shot_summary
from echoatt.run.rundir import RunDir, SharingInfo, read_student_config


@dataclass
class Section:
    title: str
    text: list[str] = field(default_factory=list)  # Markdown paragraphs (tables included)
    images: list[str] = field(default_factory=list)  # file names beside the report


def training_curves(log_path: Path, png: Path) -> bool:
    """Loss terms per step and validation perplexity, from distill's log.jsonl."""
    entries = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    steps = [e for e in entries if "loss" in e]
    vals = [e for e in entries if "val_ppl" in e]
    if not steps and not vals:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    for key in ("loss", "hard", "soft", "hidden"):
        if steps and key in steps[0]:
            ax1.plot([e["step"] for e in steps], [e[key] for e in steps], label=key)
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss term (unweighted; loss is the weighted sum)")
    ax1.set_yscale("log")
    ax1.legend()
    ax1.set_title("distillation losses")
    ax2.plot([e["step"] for e in vals], [e["val_ppl"] for e in vals], marker="o")
    ax2.set_xlabel("step")
    ax2.set_ylabel("validation perplexity")
    ax2.set_title("held-out perplexity of the student")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


def trade_plot(curve: TradeCurve, png: Path) -> None:
    """Quality against the predicted speed bound, one line per method: perplexity, retrieval-probe accuracy and (where
    tasks were scored) zero-shot mean before training, and each method's distilled point (a star). Zero-shot bars are
    the stderr of each point's gap to the teacher, paired item by item, where the items were kept (what says whether
    a point is below the teacher's line), else of the mean itself."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("perplexity", "validation perplexity (lower is better)"),
              ("retrieval", "retrieval-probe accuracy (higher is better)")]
    if "zero_shot_mean" in curve.teacher:
        paired = any("zero_shot_gap_stderr" in p for ps in curve.points.values() for p in ps)
        panels.append(("zero_shot_mean", f"zero-shot mean over {curve.teacher['tasks']} tasks "
                       + ("\n(± paired stderr of the gap to the teacher only, not between methods)" if paired
                          else "(± stderr)")))
    bars = lambda ps, key: [p.get("zero_shot_gap_stderr", p.get("zero_shot_stderr", 0)) for p in ps] if key == "zero_shot_mean" else None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), constrained_layout=True)
    for ax, (key, title) in zip(axes, panels, strict=True):
        for label, points in curve.points.items():
            points = sorted(points, key=lambda p: p["bounds"][curve.metric])
            line = ax.errorbar([p["bounds"][curve.metric] for p in points], [p.get(key) for p in points],
                               yerr=bars(points, key),
                               marker="o", capsize=3, label=f"{label}, untrained")[0]
            done = [p for p in curve.trained.get(label, []) if p.get(key) is not None]
            if done:
                ax.errorbar([p["bounds"][curve.metric] for p in done], [p[key] for p in done], yerr=bars(done, key),
                            marker="*", markersize=14, linestyle="", capsize=3, color=line.get_color(),
                            label=f"{label}, distilled")
        ax.axhline(curve.teacher[key], color="black", linestyle="--", label="teacher")
        ax.set_xlabel(f"predicted {curve.metric} bound (teacher time / student time)" if curve.metric != "kv"
                      else "KV-cache bytes per token, student / teacher")
        ax.set_title(title)
        if key == "perplexity":
            ax.set_yscale("log")
    axes[1].legend(fontsize=8)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def zero_shot_cell(point: dict) -> str:
    """Mean ± stderr, and where paired with the teacher the gap to it in points ± the paired stderr."""
    if "zero_shot_mean" not in point:
        return "–"
    gap = (f" ({point['zero_shot_gap'] * 100:+.1f} ± {point['zero_shot_gap_stderr'] * 100:.1f})"
           if "zero_shot_gap" in point else "")
    return f"{point['zero_shot_mean']:.3f} ± {point['zero_shot_stderr']:.3f}{gap}"


def ratio_cell(point: dict, teacher: dict, key: str = "other_perplexity") -> str:
    """A perplexity of the point (`key`: on the other text, or `key_perplexity` on the key tokens of the validation
    text), and its ratio to the teacher's."""
    if key not in point:
        return "–"
    ratio = point[key] / teacher[key] if key in teacher else None
    return f"{point[key]:.2f}" + (f" ({ratio:.2f}×)" if ratio and point is not teacher else "")


def trade_text(curve: TradeCurve) -> list[str]:
    t = curve.teacher
    rows = [("| method | target | followers | prefill bound | decode bound | KV ratio | perplexity | key tokens | "
             "other text | retrieval | zero-shot |"), "|---|---|---|---|---|---|---|---|---|---|---|",
            (f"| teacher | | 0 | 1 | 1 | 1 | {t['perplexity']:.2f} | {ratio_cell(t, t, 'key_perplexity')} | "
             f"{ratio_cell(t, t)} | {t['retrieval']:.3f} | {zero_shot_cell(t)} |")]
    for label, points in curve.points.items():
        rows += [f"| {label} | {curve.metric} {p['target']} | {p['followers']} | {p['bounds']['prefill']:.3f}× | "
                 f"{p['bounds']['decode']:.3f}× | {p['bounds']['kv']:.3f} | {p['perplexity']:.2f} | "
                 f"{ratio_cell(p, t, 'key_perplexity')} | {ratio_cell(p, t)} | {p['retrieval']:.3f} | "
                 f"{zero_shot_cell(p)} |" for p in points]
    scope = (f"and the zero-shot mean over {t['tasks']} tasks (± its stderr; in brackets the gap to the teacher in "
             "points, ± its stderr over the per-item differences — against the teacher only: two methods' points "
             "are not compared by these bars, their gap to each other has a stderr of its own)" if "zero_shot_mean" in t
             else "(no zero-shot tasks were scored on the curve)")
    text = [("Every method at its own plan for each predicted speed (`compare --equal-bound`), calibrated, before "
            "any training: perplexity on the validation text, on its key tokens (where the teacher needs the far "
            "context) and on text of another kind (`--other-text`; × the teacher's in brackets), accuracy on the retrieval probe (repeated random "
            f"tokens: what copying attention loses first) {scope}. Stars in the plot are the distilled students."),
            "\n".join(rows)]
    for label, missed in curve.unreachable.items():
        most = (min if curve.metric in AT_MOST else max)(missed.values())
        text.append(f"{label} cannot reach {curve.metric} " + ", ".join(missed) + " at all: its densest plan (as many "
                    f"layers following, or with attention dropped, as its budget allows) reaches only {most:.3f}.")
    if curve.trained:
        done = [("| method (distilled) | target | prefill bound | decode bound | measured (bound at that setting) | "
                 "perplexity | key tokens | other text | retrieval | zero-shot mean |"),
                "|---|---|---|---|---|---|---|---|---|---|"]
        for label, p in ((label, p) for label, ps in curve.trained.items() for p in ps):
            zs = f"{zero_shot_cell(p)} ({p['tasks']} tasks)" if "zero_shot_mean" in p else "–"
            retrieval = "–" if p.get("retrieval") is None else f"{p['retrieval']:.3f}"
            measured = "; ".join(f"{name} {m['setting']['batch']} × {m['setting'].get('tokens', m['setting'].get('context'))}"
                                 f": {m['ratio']:.3f}× ({m['bound']:.3f}×)" for name, m in p.get("measured", {}).items())
            done.append(f"| {label} | {curve.metric} {p.get('target', '')} | {p['bounds']['prefill']:.3f}× | {p['bounds']['decode']:.3f}× | {measured or '–'} | "
                        f"{p['perplexity']:.2f} | {ratio_cell(p, t, 'key_perplexity')} | {ratio_cell(p, t)} | "
                        f"{retrieval} | {zs} |")
        text.append("\n".join(done))
    return text


def sections(run: RunDir) -> list[Section]:
    out: list[Section] = []
    summary = RunSummary.load(run)
    if summary:
        p = summary.perplexity
        line = (f"Validation perplexity ({summary.validation_windows} windows of {summary.seq_len} tokens): teacher "
                f"**{p['teacher']:.2f}**, student before distillation **{p['student_before_kd']:.2f}**, after "
                f"**{p['student_after_kd']:.2f}**.")
        if summary.gap_closed_percent is not None:
            line += f" Distillation closed **{summary.gap_closed_percent:.1f}%** of the gap."
        if summary.other_text:
            o = summary.other_text["perplexity"]
            line += (f" Text of another kind ({summary.other_text['text'].removeprefix(OTHER_ROW + ' (')[:-1]}): teacher "
                     f"**{o['teacher']:.2f}**, student **{o['student_before_kd']:.2f}** → **{o['student_after_kd']:.2f}**"
                     f" ({o['student_after_kd'] / o['teacher']:.2f}× the teacher's).")
        keys = summary.key_lines()
        if keys:  # what breaks first: the predictions only the far context makes (key_tokens.py)
            line += " Perplexity on key tokens, the predictions that need the far context: " + "; ".join(keys) + "."
        out.append(Section("Summary", [line]))
    if run.similarity.is_file():
        data = json.loads(run.similarity.read_text())
        settings = data.get("settings", {})
        text = [(f"Attention similarity of the teacher `{settings.get('teacher', '?')}` over {data['tokens']:,} tokens "
                f"({settings.get('sequences', '?')} windows of {settings.get('seq_len', '?')}). Head-averaged maps of "
                "neighbouring inner layers are alike; the same head index often is not, which is why followers read "
                "the most similar leader head (head-matched copy).")]
        images = [run.heatmap.name] if run.heatmap.is_file() else []
        out.append(Section("Attend: attention similarity", text, images))
    info = SharingInfo.load(run.student)
    if info:
        out.append(Section("Copy: the student", student_text(info)))
    if run.log.is_file() and training_curves(run.log, run.curves):
        trained = json.loads(run.distill_summary.read_text()) if run.distill_summary.is_file() else {}
        how = f" The student was {training_line(trained['training'])}." if "training" in trained else ""
        out.append(Section("Adjust: distillation", [f"Loss terms per step and held-out perplexity (`{run.log.name}`)."
                                                    + how], [run.curves.name]))
    for name, title in (("eval", "Evaluation"), ("compare", "Methods compared")):
        table = run.results(name)[1]
        if table.is_file():
            out.append(Section(title, [table.read_text().strip()]))
    curve = TradeCurve.load(run.trade_curve)
    if curve and (curve.points or curve.unreachable):
        if curve.points:
            trade_plot(curve, run.trade_plot)
        out.append(Section("The trade: quality against speed", trade_text(curve),
                           [run.trade_plot.name] if curve.points else []))
    if info and info.bounds and (placed := curve_place(run, info, summary)):
        out.append(placed)
    if is_model_folder(run.distilled):
        out.append(Section("Serve it", serving_text(run.distilled, read_student_config(run.distilled))))
    for path in run.bench_results():
        label = path.stem.removeprefix("bench").lstrip("-") or "this run's teacher and student"
        table = run.results(path.stem)[1]
        if table.is_file():
            out.append(Section(f"Speed and size: {label}", [table.read_text().strip()]))
    return out


MEASURED_CURVE = Path(__file__).with_name("measured_curve.json")  # the default teacher's curve, distilled and scored
CURVE_SPEED = {"prefill": {"batch": 1, "tokens": int(QUICK_SPEED["prefill"])},  # its points' timings: `run`'s own
               "decode": dict(zip(("batch", "context"), map(int, QUICK_SPEED["decode"].split("x"))))}


def curve_place(run: RunDir, info: SharingInfo, summary: RunSummary | None) -> Section | None:
    """Where this run's student sits among the measured plans of the default teacher (`MEASURED_CURVE`): its bounds
    beside theirs, with their paired zero-shot gaps and other-text perplexity ratios; this run's own figures beside
    where it scored them. None for another teacher (the curve says nothing about it)."""
    curve = json.loads(MEASURED_CURVE.read_text())
    if not Path(info.identity["teacher"]).name.startswith(curve["teacher_file"]):
        return None
    own = {"bounds": info.bounds, "label": "this run"}
    if summary and summary.other_text:
        o = summary.other_text["perplexity"]
        own["other_ratio"] = o["student_after_kd"] / o["teacher"]
    scored = run.results("eval")[0]
    if scored.is_file():
        results = json.loads(scored.read_text())["results"]
        if "distilled" in results and "teacher" in results:
            own |= zero_shot_summary(results["distilled"], results["teacher"])
        if "lambada" in results.get("distilled", {}):
            own |= {"lambada": results["distilled"]["lambada"]["acc"],
                    "lambada_stderr": results["distilled"]["lambada"]["acc_stderr"]}
    timed = run.results("bench")[0]
    bench = json.loads(timed.read_text()) if timed.is_file() else {}
    if bench.get("device", "").startswith("CPU"):  # the run's own short timing (QUICK_SPEED), as each point's
        # `measured_speed` was taken (on a CPU; a GPU's is another machine's ratio); a later full `bench` into the
        # same folder times other settings too: only the curve's two are shown
        own["measured_speed"] = {f["figure"]: f["ratios"]["headline"]["ratio"] for f in bench["figures"]
                                 if f["figure"] in CURVE_SPEED and CURVE_SPEED[f["figure"]].items() <= f["setting"].items()}
    header = ("| plan | prefill bound | decode bound | measured on CPU, prefill 1 × 512 / decode 8 × 256 | "
              f"zero-shot gap, points (paired) | other text × teacher | lambada (teacher {curve['teacher']['lambada']:.3f}) |")
    rows = [header, "|---|---|---|---|---|---|---|"]
    for p in [*curve["points"], own]:
        gap = (f"{100 * p['zero_shot_gap']:+.1f} ± {100 * p['zero_shot_gap_stderr']:.1f}"
               + (f" ({p['gap_tasks']} tasks, this run's items)" if p is own else "")) if "zero_shot_gap" in p else "–"
        other = f"{p['other_ratio']:.2f}×" if "other_ratio" in p else "–"
        speed = p.get("measured_speed", {})
        measured = " / ".join(f"{speed[f]:.3f}×" if f in speed else "–" for f in ("prefill", "decode"))
        name = "**this run's student**" if p is own else p["label"] + (" (the default)" if p.get("default") else "")
        lambada = f"{p['lambada']:.3f}" if "lambada" in p else "–"
        rows.append(f"| {name} | {p['bounds']['prefill']:.3f}× | {p['bounds']['decode']:.3f}× | {measured} | {gap} "
                    f"| {other} | {lambada} |")
    trade_place_plot(curve, own, run.root / "trade_place.png")
    text = [(f"The default teacher's measured trade curve ({curve['measured']}): each plan calibrated and distilled as "
             f"the default run does, scored on {curve['tasks']} zero-shot tasks × {curve['items']} items (gap to the "
             "teacher paired item by item, ± its stderr) and on Wikipedia perplexity. The default is the fastest plan "
             f"with {curve['quality']}. Measured speed is echoatt's own PyTorch model against the teacher on that "
             "machine (SDPA, fp32, medians of 3 repeats: what `run` times at its end). This run's student sits at its "
             "own bounds; its figures are its own where it scored and timed them (a run's 30 items a task cannot "
             "separate the plans)."), "\n".join(rows)]
    return Section("Where this student sits on the trade curve", text, ["trade_place.png"])


def own_mark(own: dict, key: str, scale: float) -> tuple[float, list[float] | None]:
    """This run's point on the curve plot and its error bar: ± 2 stderr of the run's own items where it has one — the
    zero-shot gap (paired; at the run's 30 items a task about ± 2 points: a star without it would look better than the
    curve by noise), lambada's accuracy —; none for the perplexity ratio (its windows are many)."""
    if f"{key}_stderr" not in own:
        return scale * own[key], None
    return scale * own[key], [2 * scale * own[f"{key}_stderr"]]


def trade_place_plot(curve: dict, own: dict, png: Path) -> None:
    """Zero-shot gap, other-text perplexity ratio and lambada (long-range prediction: what breaks first) against the
    decode bound: the measured plans, and this run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5), constrained_layout=True)
    panels = ((axes[0], "zero_shot_gap", 100, -2, "the default's quality limit",
               "zero-shot gap to the teacher, points (± 2 paired stderr)"),
              (axes[1], "other_ratio", 1, 1.2, "the default's quality limit", "Wikipedia perplexity × the teacher's"),
              (axes[2], "lambada", 1, curve["teacher"].get("lambada"), "the teacher",
               "lambada accuracy (± 2 stderr): prediction from far back"))
    for ax, key, scale, limit, limit_label, title in panels:
        for method in dict.fromkeys(p["method"] for p in curve["points"]):
            ps = sorted((p for p in curve["points"] if p["method"] == method and key in p),
                        key=lambda p: p["bounds"]["decode"])
            err = [2 * scale * p[f"{key}_stderr"] for p in ps] if all(f"{key}_stderr" in p for p in ps) else None
            ax.errorbar([p["bounds"]["decode"] for p in ps], [scale * p[key] for p in ps], yerr=err, marker="o",
                        capsize=3, label=method)
        if key in own:
            y, err = own_mark(own, key, scale)
            ax.errorbar([own["bounds"]["decode"]], [y], yerr=err, marker="*", markersize=16, color="black",
                        linestyle="", capsize=4, label="this run")
        ax.axvline(own["bounds"]["decode"], color="black", linestyle=":", linewidth=1)
        if limit is not None:
            ax.axhline(limit, color="red", linestyle="--", linewidth=1, label=limit_label)
        ax.set_xlabel("predicted decode bound (teacher time / student time)")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def student_text(info: SharingInfo) -> list[str]:
    params, kv = info.parameters, info.kv_cache_bytes_per_token_bf16
    bounds = ("" if not info.bounds else
              f" The cost model's bound on speed (teacher time / student time, bf16): prefill 1 × 512 "
              f"**{info.bounds['prefill']:.3f}×**, decode 16 × 1024 context **{info.bounds['decode']:.3f}×**.")
    fitted = info.calibration or {}
    calibration = "".join(
        f" {what} calibrated on {fitted['windows']} windows: {error} error vs the teacher "
        f"{fitted[prefix + 'error_before']:.3f} → {fitted[prefix + 'error_after']:.3f}."
        for prefix, what, error in (("", "Followers", "attention-output"),
                                    ("replaced_", "Linear attention and narrowed FFNs", "sub-layer output"))
        if prefix + "error_before" in fitted)  # only what was fitted: a student without followers has no such line
    return [
        f"Plan `{info.plan}`: {info.sharing_plan().describe()}. Method: {info.method}"
        + (f", head map: {info.head_map}." if info.head_map else ".")
        + (f" LiSA: rank {info.lisa['rank']}, alignment hidden width {info.lisa['hidden']}." if info.lisa else "")
        + bounds + calibration,
        ("| | teacher | student | removed |\n|---|---|---|---|\n"
        f"| parameters | {params['teacher']:,} | {params['student']:,} | {params['removed']:,} "
        f"({params['removed_percent']:.2f}%) |\n"
        f"| KV-cache bytes per token (bf16) | {kv['teacher']:,} | {kv['student']:,} | "
        f"{kv['teacher'] - kv['student']:,} ({100 * (1 - kv['student'] / kv['teacher']):.1f}%) |"),
    ]


STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
         "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}td,th{border:1px solid #ccc;padding:4px 8px}"
         "img{max-width:100%}")


def write_report(folder: str | Path) -> tuple[Path, Path]:
    """report.md and report.html in the run folder."""
    run = RunDir(Path(folder))
    if not run.root.is_dir():
        raise FileNotFoundError(f"no run folder at {run.root}")
    found = sections(run)
    if not found:
        raise FileNotFoundError(f"{run.root} holds nothing to report (run `echoatt run` or its steps there first)")
    md = [f"# echoatt report: {run.root.name}", ""]
    for s in found:
        md += [f"## {s.title}", ""] + [p + "\n" for p in s.text] + [f"![{s.title}]({img})\n" for img in s.images]
    text = "\n".join(md)
    body = markdown.markdown(text, extensions=["tables"])
    title = html.escape(f"echoatt report: {run.root.name}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style></head>"
            f"<body>{body}</body></html>")
    md_path, html_path = run.report
    md_path.write_text(text)
    html_path.write_text(page)
    return md_path, html_path
