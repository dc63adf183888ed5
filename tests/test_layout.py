"""The layout: five method files at the top, importing each other only downward, and one package of machinery below
them that never imports them."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHOD_FILES = {"reward", "rollout", "train", "infer", "eval"}
# What each method file may import: the files below it (reward <- rollout <- infer <- eval; train <- rollout).
MAY_IMPORT = {"reward": set(), "rollout": {"reward"}, "infer": {"rollout", "reward"},
              "eval": {"infer", "rollout", "reward"}, "train": {"rollout", "reward"}}


def imported_modules(path: Path) -> set:
    """Top-level module names a file imports, anywhere in it (inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_top_level_holds_only_the_method_files():
    assert {p.stem for p in ROOT.glob("*.py")} == METHOD_FILES


def test_the_package_never_imports_a_method_file():
    offenders = {p.name: sorted(imported_modules(p) & METHOD_FILES) for p in (ROOT / "nanowaltz").glob("*.py")}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_method_files_import_each_other_only_downward():
    for name in METHOD_FILES:
        upward = imported_modules(ROOT / f"{name}.py") & (METHOD_FILES - MAY_IMPORT[name] - {name})
        assert not upward, f"{name}.py imports {sorted(upward)}"


def test_the_rule_catches_an_offender(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from rollout import rollout\n    import eval as e\n")
    assert imported_modules(bad) & METHOD_FILES == {"rollout", "eval"}
