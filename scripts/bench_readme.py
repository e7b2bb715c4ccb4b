"""Every CPU figure of the README's Benchmarks section, measured again and printed as the
README's table rows, one benchmark after another (never two at once: they would time each
other).

    python scripts/bench_readme.py --out bench_results            # ~15 min on 2 idle cores
    python scripts/bench_readme.py --out bench_results --only forward sampling
    python scripts/bench_readme.py --out bench_results --quickstart runs/quickstart  # + start-up

Each benchmark writes its JSON (every setting, the machine, versions, threads, the load
during the timing) into --out, and the rows are printed from those files; `--rows-only`
prints the rows of an earlier --out again. A row whose run saw a spread over 20% or other
processes using the CPUs says NOISY instead of a ratio: rerun it on an idle machine.
The data benchmark, which has no second side, runs its three storage formats round-robin
(png, jpeg, raw, png, …) so that load that comes and goes lands on all three.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from bench_common import OTHERS_LIMIT, SPREAD_LIMIT, spread

HERE = os.path.dirname(os.path.abspath(__file__))
REMAT = ["none", "nothing_saveable", "dots_saveable", "save_attention", "save_qkv_attention"]
COMMANDS = {
    "forward": ["bench_forward.py", "--preset", "small", "--resolution", "512",
                "--text-len", "256"],
    "sampling": ["bench_sampling.py", "--preset", "small"],
    "train": ["bench_train.py", "--preset", "small"],
    "remat": ["bench_train.py", "--preset", "small", "--no-torch", "--micro-batch", "1", "4",
              "--repeats", "3", "--remat", *REMAT],
}
DATA_FORMATS = ("png", "jpeg", "raw")


def run(script_args: list[str], log: str) -> None:
    """One benchmark, its stderr (the human-readable report) kept beside its JSON."""
    command = [sys.executable, os.path.join(HERE, script_args[0]), *script_args[1:]]
    print("$", " ".join(["python", f"scripts/{script_args[0]}", *script_args[1:]]),
          file=sys.stderr, flush=True)
    with open(log, "w") as f:
        proc = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=f)
    if proc.returncode:
        sys.exit(f"{script_args[0]} failed (exit {proc.returncode}); see {log}")


def measure(names: list[str], out: str, repeats: int, quickstart: str | None) -> None:
    for name in names:
        if name in COMMANDS:
            run([*COMMANDS[name], "--json", os.path.join(out, f"{name}.json")],
                os.path.join(out, f"{name}.log"))
        elif name == "data":
            for i in range(repeats):
                for fmt in DATA_FORMATS:
                    run(["bench_data.py", "--image-format", fmt, "--batches", "20",
                         "--work-dir", os.path.join(out, "data_work"),
                         "--json-out", os.path.join(out, f"data_{fmt}_{i}.json")],
                        os.path.join(out, f"data_{fmt}_{i}.log"))
        elif name == "startup":
            run(["bench_startup.py", "--workdir", quickstart, "--repeats", str(repeats),
                 "--json", os.path.join(out, "startup.json")], os.path.join(out, "startup.log"))


def _load(path: str):
    with open(path) as f:
        return json.load(f)


def _side(s: dict, per: float | None = None, digits: int = 3) -> str:
    """'median (best) spread' of a side; `per`: items per call for a rate (also when it is
    1), None for seconds."""
    if per is not None:
        return (f"{per / s['median']:.{digits}g} ({per / s['min']:.{digits}g}), "
                f"spread {s['spread']:.0%}")
    return f"{s['median']:.{digits}g} ({s['min']:.{digits}g}), spread {s['spread']:.0%}"


def _head(title: str, header: str) -> list[str]:
    """A blank line, the benchmark's name, and a markdown table header."""
    return ["", f"`scripts/{title}.py`:", "", header,
            "|" + "---|" * (header.count("|") - 1)]


def _ratio(record: dict) -> str:
    return "NOISY: rerun" if record["ratio"] is None else f"{record['ratio']:.2f}×"


def _load_text(record: dict) -> str:
    load = record["load"]
    others = load.get("others_cpus")
    return (f"others {others:.2f} CPUs" if others is not None else "others ?") + \
        f", load {load['load_average_before'][0]:.1f}→{load['load_average_after'][0]:.1f}"


def forward_rows(res: dict) -> list[str]:
    def row(r):
        t = r["timing"]["sides"]
        return (f"| `{r['preset']}`, {r['resolution']} px, batch {r['batch']}, "
                f"{r['text_len']} text tokens, {r['dtype']}, {r['attention']} | "
                f"{_side(t['JAX'], r['batch'])} | {_side(t['PyTorch'], r['batch'])} "
                f"| {_ratio(r['timing'])} | {_load_text(r['timing'])} |")

    return _head("bench_forward", "| config | JAX img/s median (best), spread | "
                 "PyTorch img/s median (best), spread | JAX / PyTorch (medians) | "
                 "during the run |") + [row(r) for r in res["results"]]


def sampling_rows(r: dict) -> list[str]:
    t = r["timing"]["sides"]
    return _head("bench_sampling", "| config | PyTorch s median (best), spread | "
                 "JAX s median (best), spread | JAX first call s | PyTorch / JAX "
                 "(medians) | during the run |") + [
        f"| `{r['preset']}`, {r['resolution']} px, batch {r['batch']}, "
        f"{r['text_len']} text tokens, {r['steps']} steps, {r['dtype']} | "
        f"{_side(t['PyTorch'])} | {_side(t['JAX'])} | {r['jax_first_call_s']:.1f} | "
        f"{_ratio(r['timing'])} | {_load_text(r['timing'])} |"]


def train_rows(res: dict) -> list[str]:
    def row(r):
        ratio = "NOISY: rerun" if r["warnings"] else f"{r['jax_over_torch']:.2f}×"
        torch_side = _side(r["torch_step_s"]) if "torch_step_s" in r else "-"
        return (f"| `{r['preset']}`, {r['resolution']} px, {r['text_len']} text tokens, "
                f"{r['task']}, micro-batch {r['micro_batch']}, {r['dtype']} | "
                f"{_side(r['step_s'])} | {torch_side} | {ratio} | "
                f"{r['model_tflops']:.3f} | {_load_text(r)} |")

    return _head("bench_train", "| config | JAX s/step median (best), spread | "
                 "PyTorch s/step median (best), spread | JAX / PyTorch (medians) | "
                 "model TFLOP/s | during the run |") + [row(r) for r in res["results"]]


def remat_rows(res: dict) -> list[str]:
    by = {(r["remat"], r["micro_batch"]): r for r in res["results"]}
    micro = sorted({m for _, m in by})
    lines = _head("bench_train", "| remat policy | " + " | ".join(
        f"micro-batch {m}: samples/s median (best), spread | temporaries GiB"
        for m in micro) + " |")
    for remat in dict.fromkeys(p for p, _ in by):
        cells = []
        for m in micro:
            r = by[(remat, m)]
            noisy = " NOISY" if r["warnings"] else ""
            cells.append(f"{_side(r['step_s'], r['rows_per_step'])}{noisy} | "
                         f"{r['xla_temp_gib']:.2f}")
        lines.append(f"| `{remat}` | " + " | ".join(cells) + " |")
    return lines


def startup_rows(res: dict) -> list[str]:
    lines = _head("bench_startup", "| command | cold s median (best), spread | "
                  "warm s median (best), spread |")
    for name, r in res.items():
        cells = [f"{statistics.median(r[k]):.1f} ({min(r[k]):.1f}), spread "
                 f"{spread(r[k]):.0%}" for k in ("cold_s", "warm_s")]
        lines.append(f"| `{name}` | {cells[0]} | {cells[1]} |")
    return lines


def data_rows(out: str) -> list[str]:
    """One row per storage format over its runs (files data_FORMAT_I.json)."""
    lines = []
    for fmt in DATA_FORMATS:
        runs = [_load(os.path.join(out, f)) for f in sorted(os.listdir(out))
                if f.startswith(f"data_{fmt}_") and f.endswith(".json")]
        if runs:
            s = [r["samples_per_s"] for r in runs]
            i = [r["images_per_s"] for r in runs]
            busy = [r["load"]["others_cpus"] or 0.0 for r in runs]
            noisy = (" NOISY: rerun" if spread(s) > SPREAD_LIMIT
                     or max(busy) > OTHERS_LIMIT * runs[0]["load"]["cpus"] else "")
            lines.append(f"| {fmt} | {statistics.median(s):.1f} ({max(s):.1f}), spread "
                         f"{spread(s):.0%} ({len(s)} runs){noisy} | "
                         f"{statistics.median(i):.1f} |")
    return (_head("bench_data", "| storage | samples/s median (best), spread | "
                  "images/s median |") + lines) if lines else []


ROWS = {"forward.json": forward_rows, "sampling.json": sampling_rows,
        "train.json": train_rows, "remat.json": remat_rows, "startup.json": startup_rows}


def rows(out: str) -> list[str]:
    """The README's rows from the JSON files in `out`."""
    lines = []
    for name, make in ROWS.items():
        path = os.path.join(out, name)
        if os.path.exists(path):
            lines += make(_load(path))
    return lines + data_rows(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [*COMMANDS, "data", "startup"]
    p.add_argument("--out", required=True, help="folder for every JSON and log")
    p.add_argument("--only", nargs="+", choices=names, default=None,
                   help="these benchmarks (default: all; startup needs --quickstart)")
    p.add_argument("--quickstart", default=None,
                   help="a finished unialign-quickstart work dir, for the start-up rows")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of each data format and start-up repeats (3)")
    p.add_argument("--rows-only", action="store_true", help="print the rows of --out again")
    args = p.parse_args(argv)
    chosen = args.only or [n for n in names if n != "startup" or args.quickstart]
    if "startup" in chosen and not args.quickstart:
        p.error("startup needs --quickstart DIR (a finished unialign-quickstart work dir)")
    os.makedirs(args.out, exist_ok=True)
    if not args.rows_only:
        print(f"load average before: {os.getloadavg()}", file=sys.stderr)
        measure(chosen, args.out, args.repeats, args.quickstart)
        print(f"load average after: {os.getloadavg()}", file=sys.stderr)
    print("\n".join(rows(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
