"""Every TPU program compiles with the TPU compiler, carries the Mosaic splash kernel, and
splits its work over the chips: the tiny config's train step and the pipeline's samplers
on a v5e:2x2 topology, on this CPU host (libtpu, from the `test` extra, compiles for
abstract TPU devices; nothing runs).

"No replicated compute" is checked with the compiler's own count: on a 4-chip mesh each
chip gets the per-chip batch that a 1-chip compile gets, so its FLOPs must match the 1-chip
program's; work repeated on every chip (a kernel the partitioner could not split, run
whole on each chip) would multiply them. The programs are lowered by scripts/tpu_plan.py,
the same code that plans the full-size recipe.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import pytest

pytest.importorskip("libtpu", reason="libtpu is not installed (pip install -e '.[tpu]'); "
                                     "TPU programs cannot be compiled here")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPOLOGY = "v5e:2x2"
ONE_CHIP = "v5e:1x1"
# The compiler counts the FSDP optimizer update and a few per-chip scalars differently on
# 1 and 4 chips; repeated model work would differ by whole multiples.
FLOPS_RTOL = 0.10
TINY = ["--config", "tiny", "models.transformer.vocab_size=64"]


@functools.lru_cache(maxsize=None)
def tpu_plan():
    spec = importlib.util.spec_from_file_location(
        "tpu_plan", os.path.join(REPO, "scripts", "tpu_plan.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=None)
def plan(topology: str, mesh: str, program: str, task: str = "t2i") -> dict:
    """One row of scripts/tpu_plan.py: per chip, 2 training rows (one micro-batch) or 1
    sampled image per chip."""
    plan_module = tpu_plan()
    chips = int(mesh.replace(",", " ").split()[0]) * int(mesh.split(",")[1])
    if program == "train":
        args = ["--micro-batch-per-device", "2", f"run.batch_size={2 * chips}", "--task", task]
    else:
        args = ["--batch-size", str(chips), "--steps", "2"]
    parsed = plan_module.parse_args(["--topology", topology, "--mesh", mesh, "--program",
                                     program, *args, *TINY])
    return plan_module.Planner(parsed).run(None, parsed.micro_batch_per_device)


def check(row: dict) -> None:
    assert row["attention"] == "splash"
    assert row["mosaic_kernels"] > 0, "the splash kernel is missing from the compiled HLO"
    assert row["fits"]


def check_split(program: str, task: str = "t2i") -> None:
    four, one = plan(TOPOLOGY, "1,4,1", program, task), plan(ONE_CHIP, "1,1,1", program, task)
    check(four)
    check(one)
    ratio = four["compiler_tflops_per_chip"] / one["compiler_tflops_per_chip"]
    assert abs(ratio - 1) <= FLOPS_RTOL, (
        f"{program} {task}: a chip of 4 does {ratio:.2f}x the work of a single chip with the "
        "same per-chip batch: some work is repeated on every chip")
    assert four["collectives"], "a 4-chip program without collectives is not split"


def test_train_step_compiles_split_over_four_chips():
    check_split("train", "t2i")


def test_edit_train_step_compiles_with_data_and_tensor_axes():
    """data × tensor: rows split 2 ways, heads 2 ways (splash under shard_map on both); an
    editing batch (condition tokens in the image pass)."""
    row = plan(TOPOLOGY, "2,1,2", "train", "edit")
    check(row)
    assert row["mesh"] == "2x1x2" and row["task"] == "edit"


def test_t2i_sampler_compiles_on_four_chips():
    check(plan(TOPOLOGY, "1,4,1", "sample-t2i"))


@pytest.mark.parametrize("program", ["sample-edit", "caption"])
def test_samplers_compile_split_over_four_chips(program):
    check_split(program)


def test_libtpu_is_silent_and_not_probed_on_a_host_without_tpu():
    """With libtpu importable, a CPU process that imports the package starts as without it:
    nothing on stderr, and JAX's TPU backend fails at once without loading libtpu."""
    import glob
    import subprocess
    import sys

    from jax._src import hardware_utils

    if not glob.glob("/sys/bus/pci/devices/*") or \
            hardware_utils.num_available_tpu_chips_and_device_id()[0]:
        pytest.skip("this host has TPU chips, or its PCI bus cannot be seen")
    env = {k: v for k, v in os.environ.items()
           if k != "JAX_PLATFORMS" and not k.startswith("TPU_")}
    code = ("import unialign_jax, jax; from jax._src import xla_bridge; jax.devices(); "
            "print(xla_bridge._backend_errors.get('tpu', '').startswith('no TPU chip'), "
            "xla_bridge._jax.pjrt_plugin_loaded('tpu'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=300, check=True)
    assert out.stdout.split() == ["True", "False"], "JAX loaded libtpu to look for a TPU"
    assert out.stderr == "", out.stderr


# A JAX release without the chip count, or whose backend registry takes other arguments.
MOVED_IN_JAX = {
    "chip count gone": "from jax._src import hardware_utils as h\n"
                       "del h.num_available_tpu_chips_and_device_id\n",
    "registry changed": "from jax._src import xla_bridge as x\n"
                        "def changed(name, factory, *, priority=0): raise TypeError('changed')\n"
                        "x.register_backend_factory = changed\n",
}


@pytest.mark.parametrize("moved", sorted(MOVED_IN_JAX))
def test_the_package_imports_when_a_jax_release_moves_what_keeps_libtpu_away(moved):
    """Keeping libtpu away uses two names private to JAX; when either is gone or changed,
    the package still imports (JAX then discovers its backends as it does alone)."""
    import subprocess
    import sys

    code = MOVED_IN_JAX[moved] + "import unialign_jax\nprint(unialign_jax.__name__)\n"
    env = {k: v for k, v in os.environ.items()
           if k != "JAX_PLATFORMS" and not k.startswith("TPU_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["unialign_jax"]


def test_topology_compiles_keep_out_of_the_persistent_compilation_cache(tmp_path):
    """A plan compiles for abstract chips: an executable it cached could never be loaded
    (there is no TPU client; JAX warns and compiles again). So in a process whose CLI
    switched the persistent cache on and already used it (as a test worker has, after an
    in-process CLI test), two plans of the same program neither write to the cache nor
    try to read from it, and leave it working: a CPU program before and one after the
    plans are written, nothing else."""
    import subprocess
    import sys

    code = f"""
import importlib.util, os, warnings
import jax
from unialign_jax import compilation_cache
compilation_cache.enable({str(tmp_path / "cache")!r})
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.jit(lambda x: x + 1)(1.0)
spec = importlib.util.spec_from_file_location("tpu_plan", {os.path.join(REPO, "scripts", "tpu_plan.py")!r})
plan = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plan)
args = plan.parse_args({["--topology", ONE_CHIP, "--mesh", "1,1,1", "--program", "sample-t2i",
                         "--batch-size", "1", "--steps", "2", *TINY]!r})
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(2):
        plan.Planner(args).run(None, args.micro_batch_per_device)
jax.jit(lambda x: x * 3)(1.0)
print("WARNINGS", sum("compilation cache" in str(w.message) for w in caught))
print("ENTRIES", sorted(name.split("-")[0] for name in os.listdir({str(tmp_path / "cache")!r})))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=900, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    found = dict(line.split(" ", 1) for line in out.stdout.splitlines()
                 if line.split(" ", 1)[0] in ("WARNINGS", "ENTRIES"))
    assert found == {"WARNINGS": "0", "ENTRIES": "['jit__lambda', 'jit__lambda']"}, out.stdout
