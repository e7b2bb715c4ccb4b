"""The fault-injection suite's figures (README "Reliability"): runs tests/test_faults_*.py
as a full local run — N SIGKILLs of training and of `unialign-data build`, M of each model
command line, every checkpoint-damage kind end to end, 2 and 4 JAX processes — and prints
what the tests counted, from the JSON lines they append to UNIALIGN_FAULT_REPORT.

    python scripts/fault_report.py                          # 40 / 3 kills: ~22 min, 2 cores
    python scripts/fault_report.py --trials 8 --cli-trials 2
    python scripts/fault_report.py --from faults.jsonl      # the figures of an earlier run

Exits with pytest's status: every figure printed comes from a test that passed only if
each of its trials asserted the equality or the error message it counts.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WRITERS = {"enospc_checkpoint": "checkpoint save", "enospc_build": "shard build",
           "enospc_convert": "conversion", "enospc_sample": "sampling batch"}
COMMANDS = {"sigkill_build": "unialign-data build", "sigkill_convert": "unialign-convert",
            "sigkill_sample": "unialign-sample", "sigkill_semgen": "unialign-semgen"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=40,
                   help="SIGKILLs of training and of the shard build (default %(default)s)")
    p.add_argument("--cli-trials", type=int, default=3,
                   help="SIGKILLs of convert, sample and semgen each (default %(default)s)")
    p.add_argument("--report", default=os.path.join(tempfile.gettempdir(),
                                                    "unialign_fault_report.jsonl"),
                   help="where the tests write their figures (default %(default)s)")
    p.add_argument("--from", dest="source", default=None, metavar="JSONL",
                   help="print the figures of an earlier run instead of running the suite")
    return p.parse_args(argv)


def run_suite(args) -> int:
    if os.path.exists(args.report):
        os.remove(args.report)
    environ = dict(os.environ, UNIALIGN_FAULT_TRIALS=str(args.trials),
                   UNIALIGN_FAULT_CLI_TRIALS=str(args.cli_trials),
                   UNIALIGN_FAULT_REPORT=os.path.abspath(args.report))
    start = time.monotonic()
    code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            *sorted(glob.glob(os.path.join(REPO, "tests", "test_faults_*.py")))],
                           cwd=REPO, env=environ)
    print(f"\nfault suite: exit {code} after {(time.monotonic() - start) / 60:.1f} min "
          f"({os.cpu_count()} CPUs)\n")
    return code


def lines(rows: list[dict]) -> list[str]:
    """README sentences, one per kind of fault."""
    by = {}
    for row in rows:
        by.setdefault(row["test"], []).append(row)
    out = []
    for r in by.get("sigkill_training", []):
        late = r["by_point"].get("finished first", 0)  # random times after the run ended
        points = ", ".join(f"{k} {v}" for k, v in sorted(r["by_point"].items())
                           if k != "finished first")
        out.append(f"SIGKILL at {r['kills']} points of training ({points}): "
                   f"{r['resumed_bit_identical']}/{r['kills']} resumed bit-identically "
                   f"(parameters, optimizer, EMA, PRNG, data position, metrics); "
                   f"{r['left_an_uncommitted_save']} left an uncommitted save and "
                   f"{r['left_a_half_deleted_old_step']} a half-deleted old step, neither "
                   "ever taken for a checkpoint"
                   + (f" ({late} random-time kills came after the run had finished and "
                      "are not counted)" if late else ""))
    for r in by.get("damage_detected", []):
        out.append(f"{r['kinds']} kinds of checkpoint damage: {r['detected']}/{r['kinds']} "
                   "detected")
    for r in by.get("damage_fallback", []):
        out.append(f"... end to end: {r['resumed_from_newest_intact']}/{r['kinds']} fell back "
                   "to the newest intact checkpoint with a warning naming the damage and "
                   "finished bit-identically")
    for r in by.get("nonfinite", []):
        out.append(f"NaN injected in {r['injected_steps']} steps: {r['skipped_and_counted']}/"
                   f"{r['injected_steps']} skipped and counted, parameters, optimizer and EMA "
                   f"unchanged ({r['params_optimizer_ema_unchanged']} checked), the run "
                   f"stopped after {r['stopped_after_consecutive']} in a row")
    enospc = [(WRITERS[t], r) for t in WRITERS for r in by.get(t, [])]
    if enospc:
        clean = sum(all(v == 1 for k, v in r.items() if k != "test") for _, r in enospc)
        out.append(f"ENOSPC in {len(enospc)} writers ({', '.join(w for w, _ in enospc)}): "
                   f"{clean}/{len(enospc)} clean errors, nothing partial, reruns completed")
    for r in by.get("damaged_shard", []) + by.get("damaged_shard_in_training", []):
        where = r.get("kind", "flipped bits, in training")
        out.append(f"damaged shard ({where}): {r['corrupt_records']} corrupt records, named in "
                   f"the error; with data.skip_corrupt {r['skipped_and_counted']}/"
                   f"{r['corrupt_records']} skipped and counted")
    for r in by.get("data_workers", []):
        out.append("data worker SIGKILLed: error, no hang; data worker stopped: timeout error")
    for test, name in COMMANDS.items():
        for r in by.get(test, []):
            same = r.get("byte_identical", r.get("identical"))
            points = ", ".join(f"{k} {v}" for k, v in sorted(r.get("by_point", {}).items()))
            out.append(f"SIGKILL of {name} at {r['kills']} points"
                       + (f" ({points})" if points else "") + f": {same}/{r['kills']} "
                       "reruns identical to an uninterrupted run; a rerun after completion "
                       "changed nothing" + ("; other settings refused"
                                            if r.get("different_refused",
                                                     r.get("different_settings_refused"))
                                            else ""))
    for r in by.get("multihost", []):
        out.append(f"{r['processes']} JAX processes ({r['killed']} SIGKILLed): the others "
                   f"exited with an error {r['others_exited_after_s']} s later; restarted, "
                   f"{r['resumed_bit_identical']}/1 resumed bit-identically; largest "
                   f"parameter difference to 1 process "
                   f"{r['max_param_difference_to_one_process']:.1e}")
    known = {"sigkill_training", "damage_detected", "damage_fallback", "nonfinite",
             "damaged_shard", "damaged_shard_in_training", "data_workers", "multihost",
             *WRITERS, *COMMANDS}
    out += [json.dumps(r) for t, rs in by.items() if t not in known for r in rs]
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    code = 0 if args.source else run_suite(args)
    path = args.source or args.report
    if not os.path.exists(path):
        print(f"no figures in {path}", file=sys.stderr)
        return code or 1
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for line in lines(rows):
        print(f"- {line}")
    return code


if __name__ == "__main__":
    sys.exit(main())
