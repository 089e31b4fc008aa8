"""The codebase's own rules, checked on its source: no import cycle (function-level imports
included), no overlong function, dvc.yaml true to the declared step inputs, and a registered
model that ships inference code only."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import yaml

from transferops.config import STEP_INPUTS, FinetuneConfig
from transferops.registry.register import INFERENCE_REQUIREMENTS, SHIPPED_MODULES, requirements

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "transferops"
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """transferops modules `path` imports, at any depth of the file (functions included)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.add(sub if sub in modules else base)
    return (found & modules) - {name}


def import_graph() -> dict[str, set[str]]:
    """Module -> the transferops modules it imports (function-level imports included)."""
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    return {m: _imports(p, set(files)) for m, p in files.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return [*path[path.index(n) :], n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_even_through_function_level_imports():
    graph = import_graph()
    assert "transferops.model.inputs" in graph["transferops.model.predict"]  # sees imports
    assert _cycle(graph) is None


# The house, bottom to top: a module imports only from its own layer or below.
LAYERS = (
    "errors",
    "config",
    "runtime",
    "model",
    "data",
    "sources",
    "finetune",
    "search",
    "evaluation",
    "adapt",
    "registry",
    "pipeline",
    "cli",
)
# The one deliberate exception: the mlflow source kind reads a registered model through the
# registry's client (resolve an alias, download, verify the weights).
UPWARD_ALLOWED = {("transferops.sources.mlflow", "transferops.registry.client")}


def _layer(module: str) -> int | None:
    part = module.split(".")[1] if "." in module else None
    return LAYERS.index(part) if part in LAYERS else None  # the package, __main__: no layer


def test_each_layer_imports_only_from_below():
    graph = import_graph()
    assert set(LAYERS[2:-1]) <= {m.split(".")[1] for m in graph if m.count(".") >= 1}
    upward = {
        (m, n)
        for m, imported in graph.items()
        for n in imported
        if _layer(m) is not None and _layer(n) is not None and _layer(n) > _layer(m)
    }
    assert upward == UPWARD_ALLOWED, sorted(upward - UPWARD_ALLOWED)
    # the rules the package docstrings state, through every path (function-level included)
    for base, above in (("model", LAYERS[4:]), ("runtime", LAYERS[3:])):
        for m in (m for m in graph if m.startswith(f"transferops.{base}")):
            seen, todo = set(), [m]
            while todo:
                x = todo.pop()
                if x not in seen:
                    seen.add(x)
                    todo += graph[x]
            bad = {x for x in seen if _layer(x) is not None and LAYERS[_layer(x)] in above}
            assert not bad, f"{m} reaches {sorted(bad)}"


def test_top_level_is_the_doors_common_ground():
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert len(top) <= 8, top
    packages = sorted(p.name for p in PKG.iterdir() if (p / "__init__.py").exists())
    assert set(LAYERS[2:-1]) <= set(packages)
    for pkg in packages:  # each package's rule is written where a reader lands first
        doc = ast.get_docstring(ast.parse((PKG / pkg / "__init__.py").read_text()))
        assert doc and len(doc) > 80, pkg


def test_no_function_is_longer_than_a_screen():
    long = []
    for p in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{p.relative_to(ROOT)}:{node.name} ({n} lines)")
    assert not long


# ---------------------------------------------------------- dvc.yaml


def _stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("step", sorted(STEP_INPUTS))
def test_dvc_stage_lists_exactly_the_declared_inputs(step):
    stage = _stages()[step]
    declared = STEP_INPUTS[step]
    assert stage["params"] == list(declared.params)
    deps = stage.get("deps", [])
    for key in declared.paths:
        assert f"${{{key}}}" in deps, f"dvc.yaml stage {step} does not depend on ${{{key}}}"


def test_promote_declares_every_rule_the_gate_reads():
    # a gate setting missing from STEP_INPUTS: changing it would not rerun promote
    tree = ast.parse((PKG / "registry" / "promote.py").read_text())
    gate = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "gate")
    read = {
        f"registry.{n.attr}"
        for n in ast.walk(gate)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "rule"
    }
    assert read and read <= set(STEP_INPUTS["promote"].params)


def test_every_param_a_stage_lists_is_in_params_yaml():
    # `dvc repro` refuses a stage whose listed param params.yaml lacks ("missing from
    # 'params.yaml'"), even when the config has a default for it
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, stage in _stages().items():
        for key in stage.get("params", []):
            node = params
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"{name}: {key} not in params.yaml"
                node = node[part]


def test_train_step_reads_every_trajectory_param():
    keys = set(STEP_INPUTS["train"].params)
    assert {f"finetune.{k}" for k in FinetuneConfig.trajectory_fields()} <= keys
    assert not {f"finetune.{k}" for k in FinetuneConfig.OUTPUT_FIELDS} & keys


# ------------------------------------------------- the registered model's code


def test_shipped_code_is_the_model_package_closed_under_imports():
    files = {_module_name(PKG / rel) for rel in SHIPPED_MODULES}
    assert {m for m in import_graph() if m.startswith("transferops.model")} <= files
    graph = import_graph()
    for m in files:
        missing = {n for n in graph[m] if n not in files and n != "transferops"}
        assert not missing, f"{m} imports {missing}, which the registered model does not ship"
    assert {_layer(m) for m in files} <= {LAYERS.index(x) for x in ("errors", "runtime", "model")}


@pytest.mark.parametrize(
    ("family", "package"),
    [
        ("efficientnet_lite", "efficientnet-lite-pytorch"),
        ("hf_text", "transformers"),
        ("resnet", "torchvision"),
    ],
)
def test_requirements_pin_what_inference_imports(family, package):
    reqs = [r.split("==")[0] for r in requirements({"source": {"family": family}})]
    assert reqs == [*INFERENCE_REQUIREMENTS, package]
    assert not {"pyyaml", "rich", "pydantic", "optuna"} & set(reqs)


def test_spawned_workers_get_the_folder_holding_the_package_first():
    """Dask's spawned workers import with the client's sys.path: the folder that holds the
    transferops package goes first (a path one level too deep made every package of ours a
    top-level name in the workers, and a local cluster started no trial)."""
    from transferops.runtime.cluster import _package_first_on_path

    with _package_first_on_path():
        first = Path(sys.path[0])
    assert (first / "transferops" / "__init__.py").exists(), first
    assert first.resolve() == PKG.parent.resolve()
