"""The GPU check: `echoatt bench --arch` at the sizes GPU users run, one command, a table at the end.

On a bare CUDA machine with PyTorch and transformers (no network, echoatt imported from src/):

    bash scripts/gpu_check.sh [OUT]          # about 8 minutes on one H200; writes OUT/gpu_check.md and .json
    bash scripts/gpu_check.sh OUT --only tinyllama-copy,llama-3.2-1b-drop    # some jobs only

Every file is written as its job ends (OUT/NAME.json, and the summary gpu_check.json and table gpu_check.md so far):
a command cut short still leaves every finished job's figures, in at most eight files at OUT's top (the jobs' own
bench folders are under OUT/jobs/).

`--quick` runs every job at tiny shapes and sizes on whatever device is there (CI does it on a CPU), so the check
cannot rot. Each job is one `bench --arch` run; a job that fails is a row saying why, never the end of the check.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

# The default plan's student of the default teacher (measured on its real weights: one block 27<-28, attention dropped
# at 5, 6, 7, 9, 25, 26), at its shape; random weights do not choose plans, so the plan is given.
DEFAULT_PLAN = "27-28,drop=5,drop=6,drop=7,drop=9,drop=25,drop=26"
JOBS = [  # name, --arch, --plan, --method, sizes
    ("tinyllama-copy", "tinyllama", "k=2,followers=9", "copy",
     {"prefill": "512,2048", "decode": "1x512,16x1024,64x2048", "train_len": 1024, "train_batch": 4}),
    ("tinyllama-copy-compiled", "tinyllama", "k=2,followers=9", "copy",
     {"prefill": "", "decode": "1x512,16x1024", "train_len": 0, "decode_cache": "static", "compile": True}),
    ("tinyllama-lisa", "tinyllama", "k=2,followers=9", "lisa",
     {"prefill": "512,2048", "decode": "16x1024", "train_len": 1024, "train_batch": 4}),
    ("smollm2-135m-default", "smollm2-135m", DEFAULT_PLAN, "copy",
     {"prefill": "512,2048", "decode": "1x512,64x2048", "train_len": 1024, "train_batch": 4}),
    ("llama-3.2-1b-drop", "llama-3.2-1b", "k=2", "drop", {"prefill": "2048", "decode": "64x2048", "train_len": 0}),
    ("mistral-7b-copy", "mistral-7b", "k=2", "copy", {"prefill": "2048", "decode": "64x2048", "train_len": 0}),
]
TINY = {  # --quick: every job at this shape (a LLaMA of 8 layers), at these sizes
    "model_type": "llama", "vocab_size": 4096, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 8,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512, "tie_word_embeddings": False,
}
QUICK_PLANS = {"k=2,followers=9": "k=2,followers=3", DEFAULT_PLAN: "5-6,drop=2,drop=3"}
QUICK_SIZES = {"prefill": "32", "decode": "2x32", "train_len": 32, "train_batch": 2}


def job_args(arch: str, plan: str, method: str, sizes: dict, out: Path, repeats: int, quick: bool) -> list[str]:
    """The `echoatt bench` command line of one job."""
    if quick:
        sizes = {k: (QUICK_SIZES[k] if k in QUICK_SIZES and v not in ("", 0) else v) for k, v in sizes.items()}
        plan = QUICK_PLANS.get(plan, plan)
    args = ["bench", "--arch", arch, "--plan", plan, "--method", method, "--out", str(out),
            "--repeats", str(repeats), "--warmup", "0" if quick else "1"]
    for key, value in sizes.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not False:
            args += [flag, str(value)]
    return args


def rows(name: str, result: dict) -> list[str]:
    """Table rows of one job's result: each figure's headline ratio beside its bound, what limits it."""
    out = []
    for f in result["figures"]:
        setting = " × ".join(str(f["setting"][k]) for k in ("batch", "tokens", "context") if k in f["setting"])
        t, s = (f["timings_s"][c]["median"] * 1000 for c in ("teacher_sdpa", "student_sdpa"))
        h = f["ratios"]["headline"]
        note = []
        if "bandwidth_limit_ms" in f:
            steps = f["setting"]["steps"]
            note.append(f"{t / steps:.2f} / {s / steps:.2f} ms a step, "
                        f"{f['over_bandwidth_limit']['teacher_sdpa']:.1f}× / "
                        f"{f['over_bandwidth_limit']['student_sdpa']:.1f}× the bandwidth limit")
            if f["setting"].get("compiled"):
                note.append("static cache, compiled")
        if "memory" in f:
            peaks = [f["memory"][c].get("peak_bytes") for c in ("teacher_sdpa", "student_sdpa")]
            note.append("peak " + " / ".join("?" if p is None else f"{p / 2**30:.1f} GiB" for p in peaks))
            if f.get("kd_output_bytes_per_token_vocab_entry") is not None:
                note.append(f"KD losses {f['kd_output_bytes_per_token_vocab_entry']:.2f} B/entry")
        skipped = ", ".join(f"{c} {why}" for c, why in f.get("skipped", {}).items())
        note += [f"skipped: {skipped}"] if skipped else []
        out.append(f"| {name} | {f['figure']} | {setting} | {t:.1f} | {s:.1f} | {h['ratio']:.3f}× | "
                   f"{h['bound']:.3f}× | {'; '.join(note)} |")
    for f in result.get("not_run", []):
        setting = " × ".join(str(v) for v in f["setting"].values())
        out.append(f"| {name} | {f['figure']} | {setting} | — | — | — | — | not run: {f['reason']} |")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="runs/gpu-check", help="folder for every job's results and the table")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and sizes (CI, on a CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each figure")
    parser.add_argument("--only", default="", help="comma-separated job names to run (default: all)")
    args = parser.parse_args(argv)
    import torch

    from echoatt.cli import main as echoatt

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    if args.quick:
        (out / "tiny.json").write_text(json.dumps(TINY))
    names = [name for name, *_ in JOBS]
    unknown = [n for n in args.only.split(",") if n and n not in names]
    if unknown:
        parser.error(f"--only: no job named {', '.join(unknown)} (jobs: {', '.join(names)})")
    jobs = [j for j in JOBS if not args.only or j[0] in args.only.split(",")]
    head = [f"GPU check on {device}, torch {torch.__version__}" + (" (quick: tiny shapes)" if args.quick else ""),
            "", "| job | figure | setting | teacher ms | student ms | ratio | bound | notes |",
            "|---|---|---|---|---|---|---|---|"]
    table: list[str] = []
    summary = {"device": device, "torch": torch.__version__, "quick": args.quick, "jobs": {}}
    started = time.perf_counter()
    for name, arch, plan, method, sizes in jobs:
        folder = out / "jobs" / name / "bench"  # three folders down: the lent machine returns only OUT's top files
        cli = job_args(str(out / "tiny.json") if args.quick else arch, plan, method, sizes, folder, args.repeats,
                       args.quick)
        print(f"== {name}: echoatt {' '.join(cli)}", flush=True)
        job_start = time.perf_counter()
        try:
            code = echoatt(cli)
            result = json.loads(next(folder.glob("bench-*.json")).read_text()) if code == 0 else None
            error = None if code == 0 else f"exit {code}"
        except Exception as err:  # noqa: BLE001 — one failed job is a row of the table, the others still run
            traceback.print_exc()
            result, error = None, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]
        summary["jobs"][name] = {"args": cli, "seconds": time.perf_counter() - job_start, "error": error,
                                 "result": result}
        table += rows(name, result) if result else [f"| {name} | — | — | — | — | — | — | failed: {error} |"]
        # Written as each job ends, so a command cut at the lent machine's limit still returns every finished job:
        # OUT/NAME.json, and the summary (gpu_check.json) and table (gpu_check.md) so far.
        (out / f"{name}.json").write_text(json.dumps(summary["jobs"][name], indent=2))
        done = len(summary["jobs"])
        footer = ["", (f"{done} of {len(jobs)} jobs in {(time.perf_counter() - started) / 60:.1f} minutes. Ratio = "
                  "teacher time / student time on SDPA; bound = the analytic best (FLOPs for prefill and training, "
                  "bytes for decode); the bandwidth limit = bytes a decode step reads / the measured copy bandwidth.")]
        (out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
        (out / "gpu_check.md").write_text("\n".join(head + table + footer) + "\n")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print((out / "gpu_check.md").read_text())
    return 1 if any(j["error"] for j in summary["jobs"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
