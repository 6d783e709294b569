"""Show it: one Markdown + HTML page per run folder, from what the commands left there.

Sections appear only for what exists: the similarity heatmap and plan (analyze, share), training curves (distill),
the evaluation table (eval), the speed tables (bench), the summary (run). Plots are drawn with matplotlib.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

from echoatt.bench import markdown as bench_markdown
from echoatt.evaluate import markdown_table


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


def sections(run: Path) -> list[Section]:
    out: list[Section] = []
    summary = run / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        p = s["perplexity"]
        line = (f"Validation perplexity ({s['validation_windows']} windows of {s['seq_len']} tokens): teacher "
                f"**{p['teacher']:.2f}**, student before distillation **{p['student_before_kd']:.2f}**, after "
                f"**{p['student_after_kd']:.2f}**.")
        if s.get("gap_closed_percent") is not None:
            line += f" Distillation closed **{s['gap_closed_percent']:.1f}%** of the gap."
        out.append(Section("Summary", [line]))
    sim = run / "similarity.json"
    if sim.is_file():
        data = json.loads(sim.read_text())
        settings = data.get("settings", {})
        text = [f"Attention similarity of the teacher `{settings.get('teacher', '?')}` over {data['tokens']:,} tokens "
                f"({settings.get('sequences', '?')} windows of {settings.get('seq_len', '?')}). Head-averaged maps of "
                "neighbouring inner layers are alike; the same head index often is not, which is why followers read "
                "the most similar leader head (head-matched copy)."]
        images = ["attention_similarity.png"] if (run / "attention_similarity.png").is_file() else []
        out.append(Section("Attend: attention similarity", text, images))
    sharing = run / "student" / "sharing.json"
    if sharing.is_file():
        info = json.loads(sharing.read_text())
        params, kv = info["parameters"], info["kv_cache_bytes_per_token_bf16"]
        blocks = ", ".join(f"{b[0]}←{','.join(map(str, b[1:]))}" for b in info["plan"]) or "none"
        out.append(Section("Copy: the student", [
            f"Blocks (leader←followers): {blocks}. Method: {info.get('method', 'copy')}"
            + (f", head map: {info['head_map']}." if info.get("head_map") else ".")
            + (f" LiSA: rank {info['lisa']['rank']}, alignment hidden width {info['lisa']['hidden']}."
               if info.get("lisa") else ""),
            "| | teacher | student | removed |\n|---|---|---|---|\n"
            f"| parameters | {params['teacher']:,} | {params['student']:,} | {params['removed']:,} "
            f"({params['removed_percent']:.2f}%) |\n"
            f"| KV-cache bytes per token (bf16) | {kv['teacher']:,} | {kv['student']:,} | "
            f"{kv['teacher'] - kv['student']:,} ({100 * (1 - kv['student'] / kv['teacher']):.1f}%) |",
        ]))
    log = run / "log.jsonl"
    if log.is_file() and training_curves(log, run / "training_curves.png"):
        out.append(Section("Adjust: distillation", ["Loss terms per step and held-out perplexity (`log.jsonl`)."],
                           ["training_curves.png"]))
    for name in ("eval", "compare"):
        path = run / f"{name}.json"
        if path.is_file():
            out.append(Section("Evaluation" if name == "eval" else "Methods compared",
                               [markdown_table(json.loads(path.read_text()))]))
    for path in sorted(run.glob("bench*.json")):
        result = json.loads(path.read_text())
        label = path.stem.removeprefix("bench").lstrip("-") or "this run's teacher and student"
        out.append(Section(f"Speed and size: {label}", [bench_markdown(result)]))
    return out


def _table_html(block: str) -> str:
    rows = [r.strip().strip("|").split("|") for r in block.strip().splitlines()]
    head, body = rows[0], [r for r in rows[2:]]
    th = "".join(f"<th>{html.escape(c.strip())}</th>" for c in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def _paragraph_html(text: str) -> str:
    parts, table = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            table.append(line)
            continue
        if table:
            parts.append(_table_html("\n".join(table)))
            table = []
        if line.strip():
            escaped = html.escape(line)
            while "**" in escaped:
                escaped = escaped.replace("**", "<b>", 1).replace("**", "</b>", 1)
            parts.append(f"<p>{escaped}</p>")
    return "\n".join(parts)


def write_report(run: str | Path) -> tuple[Path, Path]:
    """report.md and report.html in the run folder."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"no run folder at {run}")
    found = sections(run)
    if not found:
        raise FileNotFoundError(f"{run} holds nothing to report (run `echoatt run` or its steps there first)")
    md = [f"# echoatt report: {run.name}", ""]
    body = []
    for s in found:
        md += [f"## {s.title}", ""] + [p + "\n" for p in s.text] + [f"![{s.title}]({img})\n" for img in s.images]
        body.append(f"<h2>{html.escape(s.title)}</h2>" + "".join(_paragraph_html(p) for p in s.text)
                    + "".join(f'<img src="{img}" alt="{html.escape(s.title)}">' for img in s.images))
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}td,th{border:1px solid #ccc;padding:4px 8px}"
             "img{max-width:100%}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>echoatt report: {html.escape(run.name)}</title>"
            f"<style>{style}</style></head><body><h1>echoatt report: {html.escape(run.name)}</h1>"
            + "\n".join(body) + "</body></html>")
    (run / "report.md").write_text("\n".join(md))
    (run / "report.html").write_text(page)
    return run / "report.md", run / "report.html"
