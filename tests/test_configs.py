"""Every config field is read by the code, and the code reads only declared fields.

A static check over the package's source (its AST), so it needs no training run:
  - a field of a config under configs/ whose name the code never reads (as an attribute,
    a string, or a keyword a sub-config is spread into) is dead configuration;
  - a read of `config.a.b...` (or of a sub-config passed around under a known name, e.g.
    `data_config["grid"]`) must name a field some config declares;
  - `.get(key, default)` on a config hides an undeclared field behind a default that can
    disagree with the config, so the code never calls it on one.
"""

import ast
import importlib
import pathlib

import ml_collections
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = sorted([*ROOT.glob("cspine_jax/**/*.py"), ROOT / "train.py", ROOT / "evaluate.py"])
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem != "__init__")

# Names under which the code holds a config or one of its sections -> that section's paths.
HOLDERS = {
    "config": [""],
    "stage": ["", "stage1", "stage2"],  # trainer.train_loop: the whole config or a stage's
    "data_config": ["data"],
    "model_config": ["model"],
    "cfg": ["model", "model.segmenter", "model.classifier"],
    "stacks_config": ["model.stacks"],
    "loss_cfg": ["loss"],
}
# ConfigDict's own methods end a chain of field reads.
METHODS = set(dir(ml_collections.ConfigDict))


def _paths(config: ml_collections.ConfigDict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in config.items():
        path = f"{prefix}{key}"
        out.add(path)
        if isinstance(value, ml_collections.ConfigDict):
            out |= _paths(value, path + ".")
    return out


def _chain(node: ast.AST) -> tuple[str, list[str]] | None:
    """`name.a["b"].c` -> ("name", ["a", "b", "c"]); None for anything else."""
    parts = []
    while True:
        if isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        elif (
            isinstance(node, ast.Subscript)
            and isinstance(node.slice, ast.Constant)
            and isinstance(node.slice.value, str)
        ):
            parts.append(node.slice.value)
            node = node.value
        elif isinstance(node, ast.Name):
            return node.id, parts[::-1]
        else:
            return None


def _source_reads():
    """(names read anywhere, [(file:line, holder, chain)] of reads through config holders,
    [file:line] of `.get` calls on config holders)."""
    names, chains, gets = set(), [], []
    for path in SOURCES:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            # Fields are read by name, or spread into keyword arguments
            # (`write_dataset(**data_config["phantom"])`) or iterated with a dict of terms.
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.add(node.value)
            elif isinstance(node, ast.arg | ast.keyword) and node.arg:
                names.add(node.arg)
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "get"
                and (c := _chain(node.func.value))
                and c[0] in HOLDERS
            ):
                gets.append(f"{path.name}:{node.lineno}")
            if (
                isinstance(node, ast.Attribute | ast.Subscript)
                and (c := _chain(node))
                and c[0] in HOLDERS
                and c[1]
            ):
                chains.append((f"{path.name}:{node.lineno}", *c))
    return names, chains, gets


@pytest.fixture(scope="module")
def declared() -> dict[str, set[str]]:
    return {
        name: _paths(importlib.import_module(f"configs.{name}").get_config()) for name in CONFIGS
    }


def test_every_declared_field_is_read(declared):
    names, _, _ = _source_reads()
    unread = sorted(
        {
            f"{config}: {path}"
            for config, paths in declared.items()
            for path in paths
            if path.rsplit(".", 1)[-1] not in names
        }
    )
    assert not unread, f"fields nothing reads: {unread}"


def test_every_read_is_of_a_declared_field(declared):
    _, chains, gets = _source_reads()
    every = set().union(*declared.values())
    undeclared = []
    for where, holder, parts in chains:
        fields = []
        for part in parts:
            if part in METHODS:
                break
            fields.append(part)
        if not fields:
            continue
        # A shorter chain is read by the same expression's longer one: check the whole chain.
        candidates = [f"{p}.{'.'.join(fields)}".lstrip(".") for p in HOLDERS[holder]]
        if not any(c in every for c in candidates):
            undeclared.append(f"{where}: {holder}.{'.'.join(fields)}")
    assert not gets, f".get(key, default) on a config: {gets}"
    assert not undeclared, f"reads of undeclared fields: {sorted(set(undeclared))}"


def test_the_check_sees_reads_and_declarations(declared):
    # The check means something: it finds the reads it must judge, and a dead field would
    # show up as unread.
    names, chains, _ = _source_reads()
    assert {"grid", "fracture_focus", "grad_accum"} <= names
    assert any(h == "data_config" and p[:1] == ["grid"] for _, h, p in chains)
    assert any(h == "config" and p[:2] == ["optim", "grad_accum"] for _, h, p in chains)
    assert "eval_every_nowhere" not in names
    assert "data.grid" in declared["default"] and "stage2.example" in declared["two_stage"]
