"""The package's architecture, checked from its imports (module- and function-level alike).

The layering, written once (lowest first): a module may import its own package and any
lower layer; packages of one layer stay side by side (training never imports sampling),
except on the top floor, where apps and command lines may reuse each other.

    ground      unialign_jax.files, .configlib, .images, .text, .compilation_cache
                (no JAX / Orbax in files)
    core        unialign_jax.models, unialign_jax.diffusion
    placement   unialign_jax.checkpoints, .data, .parallel
    use         unialign_jax.training, unialign_jax.sampling
    top         unialign_jax.apps, every `cli` module, unialign_convert, unialign_configs

Plus: every diffusion constant, the batch specification and the batch-axis product have one
definition; pyproject.toml lists every package.
"""

import ast
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Import name → folder of every installed package root.
ROOTS = {"unialign_jax": "unialign_jax", "unialign_convert": "convert",
         "unialign_configs": "configs"}
LAYERS = [
    ("ground", ("unialign_jax.files", "unialign_jax.configlib", "unialign_jax.images",
                "unialign_jax.text", "unialign_jax.compilation_cache")),
    ("core", ("unialign_jax.models", "unialign_jax.diffusion")),
    ("placement", ("unialign_jax.checkpoints", "unialign_jax.data", "unialign_jax.parallel")),
    ("use", ("unialign_jax.training", "unialign_jax.sampling")),
    ("top", ("unialign_jax.apps", "unialign_convert", "unialign_configs")),
]
TOP = len(LAYERS) - 1
# The package facade: it names its public loaders lazily (by string), imports nothing.
FACADE = "unialign_jax"


def modules():
    """{module name: source path} of every installed module."""
    out = {}
    for root, folder in ROOTS.items():
        base = os.path.join(REPO, folder)
        for dirpath, _, names in os.walk(base):
            for name in names:
                if name.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, name), base)[:-3]
                    parts = [p for p in rel.split(os.sep) if p != "__init__"]
                    out[".".join([root, *parts])] = os.path.join(dirpath, name)
    return out


def group(module: str) -> tuple[int, str]:
    """(layer index, package group) of a module; `cli` modules are on the top floor."""
    if module.rsplit(".", 1)[-1] == "cli":
        return TOP, module
    for index, (_, packages) in enumerate(LAYERS):
        for package in packages:
            if module == package or module.startswith(package + "."):
                return index, package
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS")


def imports(path: str, module: str, is_package: bool) -> set[str]:
    """Every project module `path` imports, at any depth of the file."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[:len(module.split(".")) - node.level + is_package]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            found.add(name)
            found |= {f"{name}.{alias.name}" for alias in node.names}
    return {n for n in found if n.split(".")[0] in ROOTS}


def resolve(name: str, known: dict) -> str | None:
    """The module `name` refers to (an imported attribute resolves to its module)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def test_every_import_runs_down_the_layers_or_within_its_package():
    known = modules()
    problems = []
    for module, path in sorted(known.items()):
        if module == FACADE:
            continue
        layer, package = group(module)
        for target in imports(path, module, path.endswith("__init__.py")):
            target = resolve(target, known)
            if target is None or target == FACADE:
                continue
            t_layer, t_package = group(target)
            if t_package == package or t_layer < layer or (layer == t_layer == TOP):
                continue
            problems.append(f"{module} ({LAYERS[layer][0]}) imports {target} "
                            f"({LAYERS[t_layer][0]})")
    assert not problems, "imports against the layering:\n  " + "\n  ".join(problems)


def test_the_ground_floor_file_module_needs_no_jax():
    source = open(os.path.join(REPO, "unialign_jax", "files.py")).read()
    assert not re.search(r"^\s*(import|from)\s+(jax|orbax|flax)", source, re.M)


@pytest.mark.parametrize("name, home", [
    ("NUM_TRAIN_TIMESTEPS", "unialign_jax/diffusion/flow.py"),
    ("INFERENCE_SHIFT", "unialign_jax/diffusion/flow.py"),
    ("SCHEDULE_EPS", "unialign_jax/diffusion/masked.py"),
    ("SAMPLER_FINAL_TIME", "unialign_jax/diffusion/masked.py"),
    ("NEG_INF", "unialign_jax/diffusion/masked.py"),
    ("FIELDS", "unialign_jax/data/batch.py"),
    ("CONTRASTIVE_TEMPERATURE", "unialign_jax/training/losses.py"),
    ("MAX_LENGTH", "unialign_jax/text/tokenizer.py"),
])
def test_each_constant_has_one_definition(name, home):
    defined = []
    for module, path in modules().items():
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            targets = (node.targets if isinstance(node, ast.Assign)
                       else [node.target] if isinstance(node, ast.AnnAssign) else [])
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                defined.append(os.path.relpath(path, REPO))
    assert defined == [home], defined


def _numbers(tree) -> set[float]:
    """Every numeric literal of a module, signed."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) \
                and isinstance(node.operand, ast.Constant):
            out.add(-node.operand.value)
        elif isinstance(node, ast.Constant) and isinstance(node.value, float):
            out.add(node.value)
    return out


def test_the_batch_axis_product_and_the_diffusion_epsilons_are_not_rewritten():
    """Only parallel/ reads mesh axis sizes; only diffusion/ writes the diffusion numbers."""
    problems = []
    for module, path in modules().items():
        rel = os.path.relpath(path, REPO)
        source = open(path, encoding="utf-8").read()
        code = "\n".join(line.split("#")[0] for line in source.splitlines())
        if not rel.startswith("unialign_jax/parallel/") and re.search(
                r"mesh\.shape\s*(\[|\.get\()", code):
            problems.append(f"{rel} reads mesh axis sizes (use parallel.batch_ways)")
        if not rel.startswith(("unialign_jax/diffusion/", "configs/")) and \
                _numbers(ast.parse(source)) & {1e-3, 1e-5, -1e6}:
            problems.append(f"{rel} writes a diffusion epsilon literally")
    assert not problems, problems


def test_pyproject_lists_every_package():
    listed = set(re.search(r"packages = \[(.*?)\]", open(os.path.join(REPO, "pyproject.toml"))
                           .read(), re.S).group(1).replace('"', "").replace("\n", "")
                 .replace(" ", "").strip(",").split(","))
    packages = {m for m, p in modules().items() if p.endswith("__init__.py")}
    assert listed == packages, (sorted(listed - packages), sorted(packages - listed))
