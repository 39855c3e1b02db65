"""Model families: the core modules reach the baseline only through `systems`."""

import ast
import pathlib

import jax
import ml_collections
import pytest
from flax import nnx

from configs import tiny, two_stage_tiny
from cspine_jax import systems

ROOT = pathlib.Path(__file__).resolve().parent.parent
CORE = ["trainer", "evaluation", "checkpoints", "systems", "metrics", "report"]


def _imports(path: pathlib.Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return modules


@pytest.mark.parametrize("name", CORE)
def test_core_modules_do_not_import_the_baseline(name):
    imported = _imports(ROOT / "cspine_jax" / f"{name}.py")
    assert imported  # the parse found the module's imports
    assert not {m for m in imported if m.startswith("cspine_jax.baseline")}, imported


@pytest.mark.parametrize(
    "get_config, params_key", [(tiny.get_config, None), (two_stage_tiny.get_config, "classifier")]
)
def test_each_family_builds_the_state_its_checkpoints_hold(get_config, params_key):
    config = get_config()
    system = systems.get(config)
    params = nnx.state(nnx.eval_shape(lambda: system.create_model(config, 0)))
    state = jax.eval_shape(lambda p: system.build_state(config, p), params)
    assert jax.tree.structure(state["params"]) == jax.tree.structure(params)
    # The optimizer state covers what the last stage trains: all of the single model, the
    # baseline's classifier only.
    trained = params if params_key is None else params[params_key]
    # AdamW keeps two moments per trained parameter (plus counters).
    opt_leaves = len(jax.tree.leaves(state["opt_state"]))
    assert opt_leaves >= 2 * len(jax.tree.leaves(trained))
    if params_key is not None:
        assert opt_leaves < 2 * len(jax.tree.leaves(params))


def test_unknown_family_names_the_choices():
    config = ml_collections.ConfigDict({"model": {"family": "three_stage"}})
    with pytest.raises(ValueError, match="single.*two_stage"):
        systems.get(config)
