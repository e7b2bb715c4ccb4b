"""The long-running command lines under faults: `unialign-convert`, `unialign-sample` and
`unialign-semgen` killed (SIGKILL) at random points — mid-write included — and rerun give
exactly what an uninterrupted run gives (same parameters, byte-identical PNGs), with no
truncated file under an output name; a rerun of a finished command exits 0 and changes
nothing; other inputs or settings against an existing output are a clear error; a full
disk is a clear error and a rerun after freeing space completes.

UNIALIGN_FAULT_CLI_TRIALS sets the kills per command (CI: 2).
"""

import json
import os
import random
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

import fault_harness as fh
from fault_harness import small_disk, small_disks  # noqa: F401 — fixtures
from unialign_jax.checkpoints import registry
from unialign_jax.checkpoints.pipeline_folder import COMPONENT_DIRS, FORMAT, INDEX_FILE, SCHEDULER_FILE
from unialign_jax.files import write_json

RES = 64

pytestmark = pytest.mark.faults


# ---- unialign-convert ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    from test_convert_pipeline import build_sd3_folder

    root = tmp_path_factory.mktemp("sd3")
    build_sd3_folder(root)
    return root


def _convert_args(src, dst, *extra):
    return ["unialign_convert.cli", "pipeline", str(src), str(dst), *extra]


def _conversion(folder) -> dict:
    """Everything a converted folder holds: JSON and tokenizer files by content, Orbax
    parameters by value (their file names are random)."""
    import orbax.checkpoint as ocp

    out = {}
    for rel, data in fh.files_of(folder).items():
        if "/params/" not in f"/{rel}":
            out[rel] = data
    for component in ("transformer", "text_encoder", "vae"):
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(os.path.join(folder, component, "params"))
        out[component] = {jax.tree_util.keystr(p): np.asarray(x)
                          for p, x in jax.tree_util.tree_leaves_with_path(params)}
    return out


def _same_conversion(a, b) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a:
        if isinstance(a[key], dict):
            if a[key].keys() != b[key].keys() or not all(
                    np.array_equal(a[key][k], b[key][k]) for k in a[key]):
                return False
        elif a[key] != b[key]:
            return False
    return True


def _no_temporaries(parent) -> list[str]:
    return [n for n in os.listdir(parent) if ".partial-" in n or ".replaced-" in n]


def test_convert_resumes_after_sigkill_reruns_change_nothing_and_disk_full_is_clean(
        sd3_folder, tmp_path, small_disks):  # noqa: F811 — the fixture
    reference = tmp_path / "reference"
    proc, seconds = fh.timed(fh.command(_convert_args(sd3_folder, reference)))
    fh.ok(proc)
    expected = _conversion(reference)
    stamps = {p: os.stat(reference / p).st_mtime_ns for p in fh.files_of(reference)}
    rerun = fh.ok(fh.run(fh.command(_convert_args(sd3_folder, reference))))
    assert "already holds this conversion" in rerun.stdout
    assert {p: os.stat(reference / p).st_mtime_ns for p in fh.files_of(reference)} == stamps
    other = fh.run(fh.command(_convert_args(sd3_folder, reference, "--dtype", "bfloat16")))
    assert other.returncode == 2
    assert "holds a conversion of other inputs or options (differs in: options.dtype)" in \
        other.stdout

    rng, kills, made, published = random.Random(2), fh.cli_trials(2), 0, 0
    out = tmp_path / "out"
    for trial in range(2 * kills):
        if made == kills:
            break
        if trial % 2:
            proc = fh.run(fh.command(_convert_args(sd3_folder, out)),
                          kill_after=rng.uniform(1.0, seconds))
        else:
            proc = fh.run(fh.command(_convert_args(sd3_folder, out),
                                     kill_at=f"write:{rng.randint(1, 6)}"))
        if proc.returncode == -9:
            made += 1
        else:
            fh.ok(proc)  # a random time after it finished
        if os.path.exists(out):  # only ever whole: killed (if at all) after publishing it
            assert _same_conversion(_conversion(out), expected), "a partial DST is visible"
            published += 1
            shutil.rmtree(out)
    fh.ok(fh.run(fh.command(_convert_args(sd3_folder, out))))
    assert _same_conversion(_conversion(out), expected)
    assert _no_temporaries(tmp_path) == [], "killed runs' temporary folders are cleaned up"

    disk = small_disks(f"{2 * sum(len(d) for d in fh.files_of(reference).values())}")
    full = disk / "converted"
    fh.fill(disk, 200_000)
    proc = fh.run(fh.command(_convert_args(sd3_folder, full)))
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert f"no space left on device writing {full}" in proc.stdout
    assert not os.path.exists(full) and _no_temporaries(disk) == []
    os.remove(disk / "ballast")
    fh.ok(fh.run(fh.command(_convert_args(sd3_folder, full))))
    assert _same_conversion(_conversion(full), expected)
    fh.report("sigkill_convert", kills=made, identical=made, killed_after_publishing=published,
              rerun_unchanged=1, different_refused=1)
    fh.report("enospc_convert", clean_error=1, nothing_partial=1, rerun_completed=1)


# ---- unialign-sample and unialign-semgen ------------------------------------------------------

@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    """A tiny random pipeline saved as a converted pipeline folder."""
    from test_sampling_pipeline import tiny_components

    root = tmp_path_factory.mktemp("pipeline")
    parts = tiny_components(root / "tok")
    folder = root / "pipe"
    folder.mkdir()
    shutil.copytree(root / "tok", folder / COMPONENT_DIRS["tokenizer"])
    for kind, module in (("transformer", parts.transformer), ("t5", parts.t5),
                         ("vae", parts.vae)):
        registry.save_model(kind, module, str(folder / COMPONENT_DIRS[
            "text_encoder" if kind == "t5" else kind]))
    write_json(folder / SCHEDULER_FILE, parts.scheduler)
    write_json(folder / INDEX_FILE, {"format": FORMAT, "components": COMPONENT_DIRS,
                                     "scheduler": SCHEDULER_FILE,
                                     "vocab_size": len(parts.tokenizer),
                                     "mask_token_id": parts.mask_token_id})
    return folder


PROMPTS = ["a red cube", "a blue ball", "a green cone", "a cat", "a dog", "a tree"]


def _sample_args(pipe, prompts, out, *extra):
    return ["unialign_jax.sampling.cli", "t2i", "--ckpt", str(pipe), "--prompts-file",
            str(prompts), "--height", str(RES), "--width", str(RES), "--steps", "2",
            "--batch-size", "2", "--no-progress", "--out", str(out), *extra]


def _outputs(out) -> dict:
    return {n: data for n, data in fh.files_of(out).items()}


def _kill_and_rerun(args_for, expected, tmp_path, seconds, kills, rng, first):
    """Chains of up to 3 SIGKILLs — halfway through writing one of the files still to come,
    or at a random time — each chain on a fresh output folder and finished by a plain
    rerun. After every kill each visible output must be whole and equal to the
    uninterrupted run's; at the end everything must be. The first kill is at `first`
    (point, PNG): the write of that PNG, the last of its task, so that the rerun redoes
    it alone: only at the uninterrupted run's batch shape do its bytes come out the same.
    Returns the kills made."""
    pngs = sorted(n for n in expected if n.endswith(".png"))
    made = attempts = chain = 0
    while made < kills and attempts < 3 * kills:
        chain += 1
        out = tmp_path / f"out{chain}"
        for _ in range(3):
            missing = [n for n in pngs if not (out / n).exists()]
            if made == kills or not missing:
                break
            attempts += 1
            if attempts == 1:
                proc = fh.run(fh.command(args_for(out), kill_at=first[0]))
            elif attempts % 2:
                proc = fh.run(fh.command(args_for(out),
                                         kill_at=f"write:{rng.randint(1, len(missing))}"))
            else:
                proc = fh.run(fh.command(args_for(out)), kill_after=rng.uniform(2.0, seconds))
            if proc.returncode == 0:  # a random time after it finished
                break
            assert proc.returncode == -9, proc.stdout[-3000:]
            made += 1
            if attempts == 1:
                before = pngs[pngs.index(first[1]) - 1]
                assert (out / before).exists() and not (out / first[1]).exists(), first
            for name, data in _outputs(out).items():
                if name.endswith(".png"):
                    Image.open(os.path.join(out, name)).load()  # whole: it decodes
                    assert data == expected[name], f"{name} differs from the uninterrupted run"
        fh.ok(fh.run(fh.command(args_for(out))))
        assert _outputs(out) == expected, "the finished rerun differs"
    return made


def test_sample_resumes_after_sigkill_into_identical_pngs(
        pipeline_folder, tmp_path, small_disk):  # noqa: F811 — a fixture
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    reference = tmp_path / "reference"
    proc, seconds = fh.timed(fh.command(_sample_args(pipeline_folder, prompts, reference)))
    assert "6 written, 0 already done" in fh.ok(proc).stdout
    expected = _outputs(reference)
    rerun = fh.ok(fh.run(fh.command(_sample_args(pipeline_folder, prompts, reference))))
    assert "0 written, 6 already done" in rerun.stdout
    assert _outputs(reference) == expected

    # write 11: 00005.png (each item writes its PNG, then its sidecar)
    killed = _kill_and_rerun(lambda out: _sample_args(pipeline_folder, prompts, out),
                             expected, tmp_path, seconds, fh.cli_trials(2), random.Random(3),
                             first=("write:11", "00005.png"))

    full = small_disk / "samples"
    fh.fill(small_disk, 3 * max(len(d) for n, d in expected.items() if n.endswith(".png")))
    proc = fh.run(fh.command(_sample_args(pipeline_folder, prompts, full)))
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert f"no space left on device writing {full}" in proc.stdout
    for name, data in _outputs(full).items():
        assert data == expected[name], f"{name} is partial"
    os.remove(small_disk / "ballast")
    fh.ok(fh.run(fh.command(_sample_args(pipeline_folder, prompts, full))))
    assert _outputs(full) == expected
    fh.report("sigkill_sample", kills=killed, byte_identical=killed, rerun_unchanged=1)
    fh.report("enospc_sample", clean_error=1, nothing_partial=1, rerun_completed=1)


def _bench(root):
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(3):
        path = root / "images" / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (56, 80, 3), dtype=np.uint8)).save(path)
        rows.append({"image_id": i, "image_path": f"/somewhere/else/{i}.png",
                     "t2i_long": f"a long prompt {i}", "t2i_complex": f"complex {i}",
                     "edit_multi": f"make it blue {i}", "edit_complex": f"edit {i}"})
    (root / "semgen_bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _semgen_args(pipe, bench, out, *extra):
    return ["unialign_jax.apps.semgen", "--bench", str(bench), "--ckpt", str(pipe),
            "--out", str(out), "--tasks", "t2i_long", "edit_multi", "--resolution", str(RES),
            "--steps", "2", "--batch-size", "2", "--no-progress", *extra]


def test_semgen_resumes_after_sigkill_and_refuses_other_settings(pipeline_folder, tmp_path):
    bench = _bench(tmp_path / "bench")
    reference = tmp_path / "reference"
    proc, seconds = fh.timed(fh.command(_semgen_args(pipeline_folder, bench, reference)))
    fh.ok(proc)
    expected = _outputs(reference)
    assert len([n for n in expected if n.endswith(".png")]) == 9  # 3 t2i + 3 edits + sources
    fh.ok(fh.run(fh.command(_semgen_args(pipeline_folder, bench, reference))))
    assert _outputs(reference) == expected
    other = fh.run(fh.command(_semgen_args(pipeline_folder, bench, reference, "--steps", "3")))
    assert other.returncode == 2 and "made with other settings (differs in: steps)" in \
        other.stdout

    # write 4: t2i_long/2.png (after settings.json, 0.png and 1.png)
    killed = _kill_and_rerun(lambda out: _semgen_args(pipeline_folder, bench, out), expected,
                             tmp_path, seconds, fh.cli_trials(2), random.Random(4),
                             first=("write:4", "fullset/t2i_long/2.png"))
    fh.report("sigkill_semgen", kills=killed, byte_identical=killed, rerun_unchanged=1,
              different_refused=1)
