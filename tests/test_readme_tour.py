"""The README's short tour stays true: every module and name its equation table points to exists,
and the DAG it draws is the one workflow/pipeline.py declares (its transitive reduction)."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow"))
import pipeline  # noqa: E402

README = (REPO / "README.md").read_text()


def _after(marker: str) -> str:
    assert marker in README, marker
    return README.split(marker, 1)[1]


def equation_table() -> list[tuple[str, str]]:
    """(Eq. cell, where cell) of each row of the tour's equation table."""
    rows = []
    for line in _after("**Where each equation lives**").splitlines()[2:]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] not in ("Eq.", "---"):
            rows.append((cells[0], cells[2]))
    return rows


def test_every_name_the_equation_table_points_to_exists_and_every_equation_has_a_row():
    numbers, checked = set(), 0
    for eq, where in equation_table():
        if eq != "—":
            first, _, last = eq.partition("-")
            numbers |= set(range(int(first), int(last or first) + 1))
        for part in where.split(";"):
            path, _, names = part.partition(":")
            module = importlib.import_module(path.strip().strip("`").removesuffix(".py").replace("/", "."))
            for name in re.findall(r"`(\w+)`", names):
                assert hasattr(module, name), f"README: {module.__name__} has no {name}"
                checked += 1
    assert numbers == set(range(1, 13)) and checked >= 20


def readme_dag() -> set[tuple[str, str]]:
    """The solid edges (-->) of the tour's DAG drawing, by node id."""
    block = _after("**The DAG.**").split("```mermaid", 1)[1].split("```", 1)[0]
    edges = set()
    for line in block.splitlines():
        nodes = [re.match(r"\s*(\w+)", n)[1] for n in line.split("-->")] if "-->" in line else []
        edges |= set(zip(nodes, nodes[1:], strict=False))
    return edges


def pipeline_dag(dataset: str = "demo") -> set[tuple[str, str]]:
    """Stage -> stage where one reads what the other writes, transitively reduced."""
    params, resources = pipeline.load(REPO / "params.yaml", REPO / pipeline.RESOURCES)
    stages = pipeline.stages(params, resources, [dataset])
    edges = {(a.rule, b.rule) for a in stages for b in stages if set(a.output_paths) & set(b.input_paths)}

    def reaches(a: str, b: str, skip: tuple[str, str]) -> bool:
        todo, seen = [a], set()
        while todo:
            node = todo.pop()
            for x, y in edges - {skip}:
                if x == node and y not in seen:
                    if y == b:
                        return True
                    seen.add(y)
                    todo.append(y)
        return False

    return {e for e in edges if not reaches(*e, skip=e)}


def test_the_readme_draws_the_dag_the_pipeline_declares():
    assert readme_dag() == pipeline_dag()
