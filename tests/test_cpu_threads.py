"""cpu_threads.py: the OpenMP wait defaults fill in only what the user left unset, and reach OpenMP before torch."""
import ast

import pytest

import cpu_threads
from conftest import PROJECT_ROOT


def test_defaults_fill_in_only_what_is_unset():
    environ = {"PATH": "/bin"}
    assert cpu_threads.apply(environ) == {"GOMP_SPINCOUNT": "10000", "KMP_BLOCKTIME": "1"}
    assert environ == {"PATH": "/bin", "GOMP_SPINCOUNT": "10000", "KMP_BLOCKTIME": "1"}
    assert cpu_threads.apply(environ) == {}  # a second import changes nothing

    mine = {"GOMP_SPINCOUNT": "0"}
    assert cpu_threads.apply(mine) == {"KMP_BLOCKTIME": "1"} and mine["GOMP_SPINCOUNT"] == "0"


@pytest.mark.parametrize("policy", ["PASSIVE", "ACTIVE", "passive"])
def test_a_chosen_wait_policy_is_left_alone(policy):
    # In libgomp GOMP_SPINCOUNT overrides the policy's spin count, so with a policy set we must not add it.
    environ = {"OMP_WAIT_POLICY": policy}
    assert cpu_threads.apply(environ) == {} and environ == {"OMP_WAIT_POLICY": policy}


@pytest.mark.parametrize("entry_point", ["train.py", "infer.py", "eval.py"])
def test_entry_points_import_it_before_anything_else(entry_point):
    """OpenMP reads its settings when torch is loaded: the first import of each entry point must be cpu_threads
    (any other project module may import torch)."""
    tree = ast.parse((PROJECT_ROOT / entry_point).read_text())
    imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert isinstance(imports[0], ast.Import) and [a.name for a in imports[0].names] == ["cpu_threads"]
