"""What the PyTorch-vs-JAX benchmarks share: presets, arguments, the torch model, and the one
way every benchmark times its two sides.

Why the timing looks like this: the README's CPU ratios were published twice from runs in
which the PyTorch side was 4–15× slower than on an idle machine. Torch's OpenMP team
spin-waits at the barrier of each of the thousands of small parallel regions of an eager
step; when other jobs hold the cores, every barrier waits for a descheduled thread, and
the eager step slows several times more than XLA's work-stealing pool does (measured: under
a load average of 12 on 2 cores, a torch forward on 2 threads took 3.3× as long as on 1
thread; with OMP_WAIT_POLICY=PASSIVE the gap closed). A busy machine therefore does not add
noise evenly: it favours one side. So:

- each side runs in its own process (`Worker`), pinned to the same `threads` CPUs (XLA:CPU
  sizes its pool by the CPUs a process may use; torch gets `torch.set_num_threads`), so that
  no thread pool of one framework is alive, spinning or holding memory in the other's process;
- the sides are timed interleaved, A, B, A, B …, after one warm-up call each
  (`interleaved`), so that load that comes and goes lands on both;
- each side is summarised by its minimum, median and spread = (max − min) / median
  (`summary`), and the CPU time that other processes (and the hypervisor: steal time) took
  during the timing is read from /proc/stat (`CpuWatch`);
- when a spread exceeds `SPREAD_LIMIT` or others used more than `OTHERS_LIMIT` of the CPUs,
  a loud warning is printed and the headline `ratio` of the JSON is null (`compare`): such
  a run does not measure the code.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

PRESETS = {
    # name: (layers, heads, head_dim, joint_attention_dim)
    "tiny": (2, 2, 32, 64),
    "small": (4, 4, 64, 512),
    "sd3-medium": (24, 24, 64, 4096),
}
POOLED_DIM = 2048
SPREAD_LIMIT = 0.20  # (max - min) / median of one side
OTHERS_LIMIT = 0.10  # share of the CPUs other processes may use during the timing
# settings of the environment that change what the figures mean
ENV_KEYS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS",
            "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "XLA_FLAGS",
            "JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES", "TMPDIR")


def add_timing_arguments(p: argparse.ArgumentParser, repeats: int, iters: int) -> None:
    p.add_argument("--repeats", type=int, default=repeats,
                   help=f"timed samples per side, taken interleaved A, B, A, B … ({repeats})")
    p.add_argument("--iters", type=int, default=iters,
                   help=f"calls per timed sample ({iters})")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="CPUs (and threads) for each framework (default: all this process "
                        "may use)")
    p.add_argument("--json", default=None, help="also write the results here")


def add_common_arguments(p: argparse.ArgumentParser, default_batch: int, repeats: int,
                         iters: int) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--batch", type=int, default=default_batch)
    p.add_argument("--text-len", type=int, default=77, help="context tokens (256 in the release)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute and weight dtype of both models")
    add_timing_arguments(p, repeats, iters)


def attention_choices() -> tuple[str, ...]:
    """The attention implementations (imported here, not at the top of a script: a worker
    re-imports its script, and the PyTorch one should not import JAX)."""
    from unialign_jax.models.attention import IMPLEMENTATIONS

    return IMPLEMENTATIONS


# ---- timing -------------------------------------------------------------------------------

def interleaved(sides: dict[str, Callable[[], Any]], repeats: int, iters: int = 1,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, dict]:
    """Seconds per call of each side: one untimed warm-up call each (compilation, caches),
    then `repeats` rounds in which every side, in the given order, is timed over `iters`
    calls. Returns {name: {"warmup_s": first call, "times": [s per call, one per round]}}."""
    out = {}
    for name, call in sides.items():
        start = clock()
        call()
        out[name] = {"warmup_s": clock() - start, "times": []}
    for _ in range(repeats):
        for name, call in sides.items():
            start = clock()
            for _ in range(iters):
                call()
            out[name]["times"].append((clock() - start) / iters)
    return out


def spread(times: list[float]) -> float:
    """(max - min) / median: 0.2 means the slowest sample took 20% of the median longer
    than the fastest."""
    return (max(times) - min(times)) / statistics.median(times)


def summary(times: list[float]) -> dict:
    return {"min": min(times), "median": statistics.median(times), "max": max(times),
            "spread": spread(times), "n": len(times), "times": list(times)}


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) clock ticks of the whole machine since boot; None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def _tree_jiffies(root: int) -> int:
    """User + system ticks of `root` and every process below it (all their threads): this
    benchmark, its workers and their helpers (e.g. data-loading processes)."""
    parent, ticks = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
            pid = int(entry)
            parent[pid], ticks[pid] = int(fields[1]), int(fields[11]) + int(fields[12])
    children = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += ticks.get(pid, 0)
        todo += children.get(pid, [])
    return total


class CpuWatch:
    """How much CPU the processes outside this one's tree took between `start` and `stop`,
    in CPUs (1.0 = one core busy all the time), with the load averages around it. (A process
    of the tree that ends in between takes its ticks with it: they count as others'.)"""

    def start(self) -> "CpuWatch":
        self._load_before = os.getloadavg()
        self._machine = _cpu_jiffies()
        self._ours = _tree_jiffies(os.getpid())
        self._wall = time.monotonic()
        return self

    def stop(self) -> dict:
        cpus = os.cpu_count()
        out = {"cpus": cpus, "load_average_before": list(self._load_before),
               "load_average_after": list(os.getloadavg()), "others_cpus": None,
               "seconds": time.monotonic() - self._wall}
        machine = _cpu_jiffies()
        if machine is None or self._machine is None:
            return out
        ours = _tree_jiffies(os.getpid()) - self._ours
        busy, total = machine[0] - self._machine[0], machine[1] - self._machine[1]
        if total > 0:  # ticks are per CPU: total ≈ wall × cpus × CLK_TCK
            out["others_cpus"] = max(0.0, (busy - ours) / total * cpus)
        return out


def compare(timings: dict[str, dict], load: dict, label: str,
            ratio_of: tuple[str, str] | None = None) -> dict:
    """The record of one timing, printed to stderr: every side's min / median / spread, and
    with `ratio_of` = (numerator, denominator) the ratio of their medians as `ratio` — null,
    with the reasons in `warnings`, when a side's spread or the others' load says the run
    measured the machine."""
    sides = {name: {**summary(t["times"]), "warmup_s": t["warmup_s"]}
             for name, t in timings.items()}
    warnings = [f"{name}: spread {s['spread']:.0%} > {SPREAD_LIMIT:.0%} "
                f"(min {s['min']:.4g} s, max {s['max']:.4g} s)"
                for name, s in sides.items() if s["spread"] > SPREAD_LIMIT]
    others = load.get("others_cpus")
    if others is not None and others > OTHERS_LIMIT * load["cpus"]:
        warnings.append(f"other processes used {others:.2f} of the {load['cpus']} CPUs "
                        f"while this ran (limit {OTHERS_LIMIT:.0%}); load average "
                        f"{load['load_average_before'][0]:.2f} before, "
                        f"{load['load_average_after'][0]:.2f} after")
    lines = [f"{label}:"] + [
        f"  {name:10s} min {s['min']:.4g} s, median {s['median']:.4g} s, spread "
        f"{s['spread']:.0%} ({s['n']} samples; first call {s['warmup_s']:.3g} s)"
        for name, s in sides.items()]
    others_text = "unknown" if others is None else f"{others:.2f}"
    lines.append(f"  other processes: {others_text} of {load['cpus']} CPUs")
    record = {"warnings": warnings, "sides": sides, "load": load}
    if ratio_of:
        numerator, denominator = ratio_of
        ratio = sides[numerator]["median"] / sides[denominator]["median"]
        minima = sides[numerator]["min"] / sides[denominator]["min"]
        record.update(ratio=None if warnings else ratio,
                      ratio_is=f"{numerator} median / {denominator} median")
        if not warnings:
            record["ratio_of_minima"] = minima
            lines.append(f"  {numerator} / {denominator}: {ratio:.2f}× (medians), "
                         f"{minima:.2f}× (minima)")
    if warnings:
        bar = "!" * 78
        lines += [bar, "  NOISY MACHINE: this run does not measure the code"
                  + (". No ratio." if ratio_of else "."), *(f"  - {w}" for w in warnings)]
        if ratio_of:
            lines.append(f"  (would-be {numerator} / {denominator}: medians {ratio:.2f}×, "
                         f"minima {minima:.2f}×)")
        lines += ["  Rerun on an idle machine.", bar]
    print("\n".join(lines), file=sys.stderr, flush=True)
    return record


# ---- one side per process -----------------------------------------------------------------

def pin_threads(threads: int) -> None:
    """Limit this process to `threads` CPUs before a framework starts its pool: XLA:CPU sizes
    its pool by the CPUs a process may use (it has no thread-count flag), torch is told by
    `torch.set_num_threads(threads)` in its builder."""
    allowed = sorted(os.sched_getaffinity(0))
    if threads > len(allowed):
        raise ValueError(f"--threads {threads}: only {len(allowed)} CPUs available")
    if threads < len(allowed):
        os.sched_setaffinity(0, allowed[:threads])


def thread_report() -> dict:
    """The threads and BLAS this process actually runs with, for the JSON record. Counts
    XLA:CPU's pool threads by name (0: JAX, if imported, never started its CPU backend here)
    rather than asking JAX, which would start it."""
    info = {"cpus_allowed": len(os.sched_getaffinity(0))}
    try:
        names = [open(f"/proc/self/task/{t}/comm").read().strip()
                 for t in os.listdir("/proc/self/task")]
        info["xla_cpu_pool_threads"] = sum(n.startswith("tf_XLAEigen") for n in names)
    except OSError:
        pass
    if "torch" in sys.modules:
        import torch

        config = torch.__config__.show().replace(",", "\n").split()
        blas = [x.split("=", 1)[1] for x in config if x.startswith("BLAS_INFO=")]
        info["torch"] = {"intra_op_threads": torch.get_num_threads(),
                         "interop_threads": torch.get_num_interop_threads(),
                         "blas": blas[0] if blas else None,
                         "mkldnn": torch.backends.mkldnn.is_available(),
                         "parallel": torch.__config__.parallel_info().splitlines()[-1]}
    return info


def _serve(conn, threads: int, build: Callable, args: tuple) -> None:
    """A worker's loop: build the side, then run the methods the parent asks for."""
    try:
        pin_threads(threads)
        methods = build(*args)
        conn.send(("ok", None))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        conn.send(("error", traceback.format_exc()))
        return
    methods["threads"] = thread_report
    while True:
        name, call_args = conn.recv()
        if name is None:
            return
        try:
            conn.send(("ok", methods[name](*call_args)))
        except BaseException:  # noqa: BLE001
            conn.send(("error", traceback.format_exc()))


class Worker:
    """One side of a comparison in its own (spawned) process: `build(*args)`, a function at
    the top of a benchmark script, runs there and returns {method name: function};
    `run(name, *args)` calls one and returns its result. The parent times the calls, so a
    pipe round trip (well under a millisecond) is inside every sample: use --iters to make
    samples of very short calls long enough."""

    def __init__(self, name: str, threads: int, build: Callable, *args):
        self.name = name
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, threads, build, args),
                                   name=f"bench-{name}", daemon=True)
        self.process.start()
        child.close()
        self._reply()

    def run(self, method: str, *args):
        self._conn.send((method, args))
        return self._reply()

    def caller(self, method: str, *args) -> Callable[[], Any]:
        return lambda: self.run(method, *args)

    def report(self) -> dict:
        """Its threads, BLAS and device (every side's build returns a "device" method)."""
        return {**self.run("threads"), "device": self.run("device")}

    def _reply(self):
        try:
            status, value = self._conn.recv()
        except EOFError:
            self.process.join(5)
            raise RuntimeError(f"the {self.name} worker died (exit code "
                               f"{self.process.exitcode})") from None
        if status == "error":
            raise RuntimeError(f"the {self.name} worker failed:\n{value}")
        return value

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self._conn.send((None, ()))
            except OSError:
                pass
            self.process.join(30)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- the models ---------------------------------------------------------------------------

def random_sd3(args, max_resolution: int, folder: str):
    """A random diffusers `SD3Transformer2DModel` of the preset, saved to `folder`/src for our
    converter. Returns (model on the benchmark device and dtype, device, torch dtype). Put
    TMPDIR on a RAM disk for big ones."""
    import diffusers
    import torch

    torch.set_num_threads(args.threads)
    layers, heads, head_dim, joint = PRESETS[args.preset]
    config = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=layers,
                  attention_head_dim=head_dim, num_attention_heads=heads,
                  joint_attention_dim=joint, caption_projection_dim=heads * head_dim,
                  pooled_projection_dim=POOLED_DIM, out_channels=16,
                  pos_embed_max_size=max(192, max_resolution // 16))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(**config).eval()
    model.save_pretrained(os.path.join(folder, "src"))
    return model.to(device, tdtype), device, tdtype


def load_converted(folder: str, args, attention="auto"):
    """Our model converted from the torch one saved by `random_sd3`."""
    import jax.numpy as jnp

    import unialign_jax
    from unialign_convert.transformer import convert_transformer

    src, dst = os.path.join(folder, "src"), os.path.join(folder, "dst")
    if not os.path.exists(dst):
        convert_transformer(src, dst, dtype=args.dtype)
    return unialign_jax.load_transformer(dst, dtype=jnp.dtype(args.dtype),
                                         attention=attention)


def work_folder() -> tempfile.TemporaryDirectory:
    """Where the torch worker saves the model for the JAX worker to convert."""
    return tempfile.TemporaryDirectory(prefix="bench_")


# ---- the record ---------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(workers: dict[str, dict] | None = None) -> dict:
    """Everything that produced the figures: machine, versions, the command line, the
    settings that change thread pools or BLAS kernels, and the threads each side ran with
    (`workers`: {side: `Worker.report()`})."""
    import numpy

    blas = numpy.show_config(mode="dicts")["Build Dependencies"]["blas"]
    return {"machine": {"cpu": _cpu_model(), "cpus": os.cpu_count(),
                        "cpus_allowed": len(os.sched_getaffinity(0)),
                        "platform": platform.platform(), "python": platform.python_version()},
            "versions": {n: _version(n) for n in ("jax", "jaxlib", "flax", "torch",
                                                  "diffusers", "transformers", "numpy")},
            "numpy_blas": f"{blas.get('name')} {blas.get('version')}",
            "environment": {k: os.environ.get(k) for k in ENV_KEYS},
            "command": [sys.executable, *sys.argv], "sides": workers or {}}


def print_setup(env: dict) -> None:
    """One paragraph on stderr with what the figures depend on."""
    set_vars = {k: v for k, v in env["environment"].items() if v is not None}
    print(f"machine: {env['machine']['cpu']}, {env['machine']['cpus_allowed']} of "
          f"{env['machine']['cpus']} CPUs; numpy BLAS {env['numpy_blas']}; "
          f"environment {set_vars or 'clean'}", file=sys.stderr)
    for side, report in env["sides"].items():
        print(f"{side} process: {report}", file=sys.stderr)


def write_json(path: str | None, result: dict) -> None:
    from unialign_jax import files

    print(files.dumps(result))
    if path:
        files.write_json(path, result)
