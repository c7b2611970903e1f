"""The house rules of the code's layout, read from the source with ``ast``.

Data flows one way, intent -> plan -> apply -> reality: ``intent/`` (the model, the
store and the operator's tool) imports no agent; an agent imports ``intent/``,
``agents/system/`` and what the agents share, never another agent, so each stays
free to change alone; and no agent reaches into the operator's tool
(``intent.cli``). Every import counts, at any depth, including those made only for
type checking.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> Iterator[tuple[int, str]]:
    """(line, module) for every module ``path`` imports; ``from a import b`` yields
    ``a.b`` as well, since ``b`` may be a module; relative imports are resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package.pop()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            yield node.lineno, module
            for alias in node.names:
                yield node.lineno, f"{module}.{alias.name}"


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def sources(root: Path, package: str) -> list[Path]:
    return sorted(p for p in (root / package).rglob("*.py") if "__pycache__" not in p.parts)


def agent_packages(root: Path) -> list[str]:
    """Every agent: a package under agents/ with an ``agent.py``."""
    return sorted(
        f"agents.{p.parent.name}" for p in (root / "agents").glob("*/agent.py") if p.is_file()
    )


def violations(root: Path) -> list[str]:
    found = []
    for path in sources(root, "intent"):
        for line, module in imports_of(path, root):
            if within(module, "agents"):
                found.append(f"{path.relative_to(root)}:{line}: intent/ imports {module}")
    agents = agent_packages(root)
    for path in sources(root, "agents"):
        own = module_name(path, root)
        if within(own, "agents.kickstart"):
            continue  # the bootstrap builds the agents' bundle with pp pack's build
        mine = [a for a in agents if within(own, a)]
        for line, module in imports_of(path, root):
            where = f"{path.relative_to(root)}:{line}"
            if within(module, "intent.cli"):
                found.append(f"{where}: an agent imports the operator's tool ({module})")
            for other in agents:
                if mine and other not in mine and within(module, other):
                    found.append(f"{where}: {mine[0]} imports another agent ({module})")
    return sorted(set(found))


def test_the_repository_keeps_the_layout_rules() -> None:
    # Not vacuous: the walk sees the agents and the operator's tool it checks.
    assert agent_packages(REPO) == [
        "agents.elb_registrar",
        "agents.iptables",
        "agents.preparer",
        "agents.setlive",
    ]
    assert REPO / "intent" / "cli" / "commands.py" in sources(REPO, "intent")
    assert violations(REPO) == []


def write(root: Path, name: str, text: str = "") -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def house(tmp_path: Path) -> Path:
    """A small tree that keeps the rules, for the checks to be broken in."""
    for name in ["intent/__init__.py", "intent/model.py", "intent/cli/__init__.py"]:
        write(tmp_path, name)
    for agent in ["alpha", "beta"]:
        write(tmp_path, f"agents/{agent}/__init__.py")
        write(tmp_path, f"agents/{agent}/agent.py", "from intent import model\n")
    write(tmp_path, "agents/__init__.py")
    write(tmp_path, "agents/health.py")
    write(tmp_path, "agents/system/__init__.py")
    write(tmp_path, "agents/system/fs.py")
    write(tmp_path, "agents/kickstart/__init__.py")
    write(tmp_path, "agents/kickstart/bundle.py", "from intent.cli import pack\n")
    write(tmp_path, "agents/alpha/plan.py", "from agents import health\nfrom ..system import fs\n")
    return tmp_path


def test_a_tree_that_keeps_the_rules_passes(house: Path) -> None:
    assert violations(house) == []


@pytest.mark.parametrize(
    ("name", "text", "complaint"),
    [
        ("intent/model.py", "import agents.health\n", "intent/ imports agents.health"),
        ("intent/cli/x.py", "from agents.system import fs\n", "intent/ imports agents.system"),
        ("intent/cli/x.py", "def f():\n    from agents import health\n", "intent/ imports"),
        ("agents/alpha/apply.py", "from agents.beta import agent\n", "imports another agent"),
        ("agents/alpha/apply.py", "from agents import beta\n", "imports another agent"),
        ("agents/alpha/apply.py", "from ..beta.agent import x\n", "imports another agent"),
        ("agents/alpha/apply.py", "import agents.beta.plan as p\n", "imports another agent"),
        ("agents/alpha/apply.py", "from intent.cli import render\n", "the operator's tool"),
        ("agents/health.py", "from intent.cli.pack import build\n", "the operator's tool"),
    ],
)
def test_each_broken_rule_is_named(house: Path, name: str, text: str, complaint: str) -> None:
    write(house, name, text)
    found = violations(house)
    assert len(found) >= 1
    assert all(name in line for line in found)
    assert any(complaint in line for line in found)
