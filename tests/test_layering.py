"""The package's architecture, checked from its imports (module- and function-level alike).

The layering, written once (lowest first): a module may import its own package and any
lower layer; packages of one layer stay side by side (training never imports sampling),
except on the top floor, where apps and command lines may reuse each other.

    ground      unialign_jax.files, .configlib, .images, .text, .compilation_cache
                (no JAX / Orbax in files)
    core        unialign_jax.models, unialign_jax.diffusion
    placement   unialign_jax.checkpoints, .data, .parallel
    run         unialign_jax.runs (what a run is: its config, its models, its work dir)
    use         unialign_jax.training, unialign_jax.sampling
    top         unialign_jax.apps, every `cli` module, unialign_convert, unialign_configs

Inside a package, rooms are floors of their own (ROOMS, written the same way): in data/,
`format` (what builder and readers share) lies below `build` and `read`, which stay side
by side; the package's `cli` and `__init__` stand above its rooms.

No module takes part in an import circle (module- or function-level), and only runs/
reads a run's config.json by its keys (everyone else holds a `TrainConfig`).

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
    ("run", ("unialign_jax.runs",)),
    ("use", ("unialign_jax.training", "unialign_jax.sampling")),
    ("top", ("unialign_jax.apps", "unialign_convert", "unialign_configs")),
]
TOP = len(LAYERS) - 1
# Rooms inside a package, lowest floor first; rooms of one floor never import each other.
ROOMS = {
    "unialign_jax.data": [("format", ("format",)), ("build, read", ("build", "read"))],
}
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


def imports(path: str, module: str, is_package: bool, known: dict) -> set[str]:
    """Every project module `path` imports, at any depth of the file: `from X import a`
    imports the module X.a when there is one, else X (whose __init__ defines a)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {resolve(alias.name, known) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[:len(module.split(".")) - node.level + is_package]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            found |= {f"{name}.{alias.name}" if f"{name}.{alias.name}" in known
                      else resolve(name, known) for alias in node.names}
    return found - {None}


def resolve(name: str, known: dict) -> str | None:
    """The module `name` refers to (an imported attribute resolves to its module)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(known: dict) -> dict[str, set[str]]:
    """{module: the project modules it imports}, the facade left out (it imports by name)."""
    return {module: imports(path, module, path.endswith("__init__.py"), known) - {module, FACADE}
            for module, path in known.items() if module != FACADE}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of `graph`: each set of modules that reach each other, sorted."""
    def reachable(start):
        seen, todo = set(), [start]
        while todo:
            for target in graph.get(todo.pop(), ()):
                if target not in seen:
                    seen.add(target)
                    todo.append(target)
        return seen

    reach = {module: reachable(module) for module in graph}
    found = {frozenset({m, *(n for n in reach[m] if m in reach.get(n, ()))})
             for m in graph if m in reach[m]}
    return sorted(sorted(circle) for circle in found)


def test_every_import_runs_down_the_layers_or_within_its_package():
    known = modules()
    problems = []
    for module, targets in sorted(import_graph(known).items()):
        layer, package = group(module)
        for target in targets:
            t_layer, t_package = group(target)
            if t_package == package or t_layer < layer or (layer == t_layer == TOP):
                continue
            problems.append(f"{module} ({LAYERS[layer][0]}) imports {target} "
                            f"({LAYERS[t_layer][0]})")
    assert not problems, "imports against the layering:\n  " + "\n  ".join(problems)


def room(module: str) -> tuple[str, int, str] | None:
    """(package, floor, room) of a module of a package in ROOMS; floor len(floors) for the
    package's own modules outside its rooms (`cli`, `__init__`); None outside such packages."""
    for package, floors in ROOMS.items():
        if module == package or module.startswith(package + "."):
            first = module[len(package) + 1:].split(".")[0]
            for index, (_, rooms) in enumerate(floors):
                if first in rooms:
                    return package, index, first
            return package, len(floors), first or "__init__"
    return None


def room_problems(graph: dict[str, set[str]]) -> list[str]:
    """Imports between rooms of one package that do not run down its floors, and modules of
    such a package in no room (only `cli` and `__init__` stand above the rooms)."""
    problems = []
    for module, targets in sorted(graph.items()):
        here = room(module)
        if here is not None and here[1] == len(ROOMS[here[0]]) \
                and here[2] not in ("cli", "__init__"):
            problems.append(f"{module} is in no room of {here[0]}: add it to ROOMS")
        for target in sorted(targets):
            there = room(target)
            if here is None or there is None or here[0] != there[0] or here[2] == there[2] \
                    or there[1] < here[1] or here[1] == len(ROOMS[here[0]]):
                continue
            problems.append(f"{module} ({here[2]}) imports {target} ({there[2]})")
    return problems


def test_every_import_inside_a_package_runs_down_its_rooms():
    problems = room_problems(import_graph(modules()))
    assert not problems, "imports against the rooms:\n  " + "\n  ".join(problems)


def test_the_room_check_catches_planted_imports(tmp_path):
    """A planted data/: format importing read, build importing read (side by side), a module
    in no room, and the imports that are allowed (down to format, within a room, from the
    cli)."""
    files = {"format.a": "from unialign_jax.data.read import c\n",
             "build.b": "def f():\n    from unialign_jax.data.read.c import x\n"
                        "from unialign_jax.data.format import a\nfrom . import d\n",
             "build.d": "",
             "read.c": "import unialign_jax.data.format.a\nx = 1\n",
             "cli": "from unialign_jax.data.build import b\nfrom unialign_jax.data.read import c\n",
             "stray": ""}
    known = {}
    for name, text in files.items():
        (tmp_path / f"{name}.py").write_text(text)
        known[f"unialign_jax.data.{name}"] = str(tmp_path / f"{name}.py")
    assert room_problems(import_graph(known)) == [
        "unialign_jax.data.build.b (build) imports unialign_jax.data.read.c (read)",
        "unialign_jax.data.format.a (format) imports unialign_jax.data.read.c (read)",
        "unialign_jax.data.stray is in no room of unialign_jax.data: add it to ROOMS"]


def test_no_module_takes_part_in_an_import_circle():
    found = circles(import_graph(modules()))
    assert not found, "import circles:\n  " + "\n  ".join(" <-> ".join(c) for c in found)


def test_the_circle_check_catches_a_function_level_circle(tmp_path):
    """A planted pair, one side importing inside a function: a circle all the same."""
    (tmp_path / "a.py").write_text("def f():\n    from pkg import b\n    return b\n")
    (tmp_path / "b.py").write_text("from pkg.a import f\n")
    (tmp_path / "c.py").write_text("import pkg.a\n")
    known = {f"pkg.{n}": str(tmp_path / f"{n}.py") for n in "abc"}
    assert circles(import_graph(known)) == [["pkg.a", "pkg.b"]]


# What a run config holds at its top level (TrainConfig's sections, read from its source).
_RUN_CONFIG = os.path.join(REPO, "unialign_jax", "runs", "config.py")
# Calls that read JSON (and the reader of a run's config.json itself).
_JSON_READS = {"read_json", "read_json_or_none", "load", "loads", "read_run_config"}


def run_sections() -> set[str]:
    tree = ast.parse(open(_RUN_CONFIG, encoding="utf-8").read())
    train = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TrainConfig")
    return {s.target.id for s in train.body if isinstance(s, ast.AnnAssign)}


def run_config_key_reads(source: str) -> list[str]:
    """`line: code` of each read of a run config section by its key (`cfg["models"]`,
    `cfg.get("lora")`, at any depth) from JSON that may be a run's config.json: what a JSON
    read returns, directly or through a name, in a module that names config.json; in any
    other module, a JSON read whose arguments name a config."""
    tree = ast.parse(source)
    names_config_file = "config.json" in source or "RUN_CONFIG_FILE" in source

    def is_config_read(node) -> bool:
        if not isinstance(node, ast.Call):
            return False
        name = getattr(node.func, "attr", getattr(node.func, "id", None))
        return name in _JSON_READS and (names_config_file or name == "read_run_config"
                                        or "config" in ast.unparse(node).lower())

    bound = {t.id for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AnnAssign))
             and node.value is not None and is_config_read(node.value)
             for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
             if isinstance(t, ast.Name)}

    def key_read(node):
        """(key, what it is read from) of `x["key"]` / `x.get("key")`, else None."""
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) \
                and isinstance(node.slice, ast.Constant):
            return node.slice.value, node.value
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "get" \
                and node.args and isinstance(node.args[0], ast.Constant):
            return node.args[0].value, node.func.value
        return None

    def from_config(node) -> bool:
        while key_read(node) is not None:
            node = key_read(node)[1]
        return (isinstance(node, ast.Name) and node.id in bound) or is_config_read(node)

    sections = run_sections()
    hits = [node for node in ast.walk(tree) if key_read(node) is not None
            and key_read(node)[0] in sections and from_config(key_read(node)[1])]
    return [f"{node.lineno}: {ast.unparse(node)}"
            for node in sorted(hits, key=lambda n: (n.lineno, n.col_offset))]


def test_only_runs_reads_a_run_config_by_its_keys():
    """Everyone else reads a run as a `TrainConfig` (`runs.work_dir.read_run_config`)."""
    scripts = os.path.join(REPO, "scripts")
    paths = [*modules().values(), *(os.path.join(scripts, n) for n in os.listdir(scripts)
                                    if n.endswith(".py"))]
    problems = [f"{os.path.relpath(path, REPO)}:{hit}" for path in paths
                if not os.path.relpath(path, REPO).startswith(os.path.join("unialign_jax", "runs"))
                for hit in run_config_key_reads(open(path, encoding="utf-8").read())]
    assert not problems, "string-key reads of a run's config.json:\n  " + "\n  ".join(problems)


def test_the_run_config_check_catches_planted_reads():
    planted = (
        "import json, os\n"
        "from unialign_jax import files\n"
        "def seed(workdir):\n"
        "    config = files.read_json(os.path.join(workdir, 'config.json'))\n"
        "    return config['run']['seed'], config.get('lora')\n"
        "def dtype(path):\n"
        "    return json.loads(open(path).read())['compute']['dtype']\n"
        "def tasks(index):\n"
        "    return files.read_json(index)['components'], index['data']\n")
    assert [hit.split(":")[0] for hit in run_config_key_reads(planted)] == ["5", "5", "7"]
    typed = ("from unialign_jax import files\n"
             "def seed(workdir, TrainConfig):\n"
             "    path = workdir + '/config.json'\n"
             "    return TrainConfig.from_dict(files.read_json(path)).run.seed\n")
    assert run_config_key_reads(typed) == []


def test_the_ground_floor_file_module_needs_no_jax():
    source = open(os.path.join(REPO, "unialign_jax", "files.py")).read()
    assert not re.search(r"^\s*(import|from)\s+(jax|orbax|flax)", source, re.M)


@pytest.mark.parametrize("name, home", [
    ("NUM_TRAIN_TIMESTEPS", "unialign_jax/diffusion/flow.py"),
    ("INFERENCE_SHIFT", "unialign_jax/diffusion/flow.py"),
    ("SCHEDULE_EPS", "unialign_jax/diffusion/masked.py"),
    ("SAMPLER_FINAL_TIME", "unialign_jax/diffusion/masked.py"),
    ("NEG_INF", "unialign_jax/diffusion/masked.py"),
    ("FIELDS", "unialign_jax/data/read/batch_spec.py"),
    ("CONTRASTIVE_TEMPERATURE", "unialign_jax/diffusion/alignment_losses.py"),
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


def readme_layout() -> list[tuple[str, set[str]]]:
    """(floor, the packages it names) of each row of the README's "Layout" table, top first;
    `unialign_jax/{a,b}.py` names two modules, `convert/` the package installed from it."""
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| floor ")]
    folders = {folder + "/": root for root, folder in ROOTS.items()}
    out = []
    for row in rows:
        floor, named = row.split("|")[1].strip(), row.split("|")[2]
        packages = set()
        for path in re.findall(r"`([\w/{},.]+)`", named):
            if path in folders:
                packages.add(folders[path])
            elif path.startswith("unialign_jax/"):
                stem = path.removesuffix("/").removesuffix(".py").replace("/", ".")
                head, _, names = stem.partition("{")
                packages |= ({head + n for n in names.rstrip("}").split(",")} if names
                             else {stem})
        out.append((floor, packages))
    return out


def test_the_readme_layout_table_lists_the_floors_and_their_packages():
    assert readme_layout() == [(name, set(packages)) for name, packages in reversed(LAYERS)]
