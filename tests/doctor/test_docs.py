"""docs/troubleshooting.md lists every message the doctor prints; docs/launcher.md has Preflight."""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULES = ["config_checks", "versions", "environment", "memory", "nvme"]
BUILDERS = {"failed", "warned", "skipped", "passed"}
DETAIL_PARTS = {"detail", "what", "where", "room", "speed", "acts"}  # local names the details are built from


def doctor_section() -> str:
    text = (REPO / "docs" / "troubleshooting.md").read_text()
    start = text.index("\n## Doctor\n")
    return text[start:text.index("\n## ", start + 1)]


def fragments(module: str) -> list[str]:
    """The fixed text pieces (>= 12 characters) of every detail the module's checks build."""
    tree = ast.parse((REPO / "hf_zero" / "doctor" / f"{module}.py").read_text())
    texts = []  # expressions that end up in a detail
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in BUILDERS:
            texts.extend(node.args[1:2])
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "append" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "problems":
            texts.extend(node.args)
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id in DETAIL_PARTS for t in targets):
                texts.append(node.value)
    out = []
    for text in texts:
        for part in ast.walk(text):
            if isinstance(part, ast.Constant) and isinstance(part.value, str):
                out.extend(p.strip() for p in re.split(r"[{}]", part.value) if len(p.strip()) >= 12)
    return out


@pytest.mark.parametrize("module", MODULES)
def test_every_message_is_documented(module):
    section = doctor_section()
    missing = [f for f in fragments(module) if f not in section]
    assert missing == [], f"add these {module} messages to docs/troubleshooting.md ## Doctor"


def test_every_check_name_is_documented():
    from hf_zero.doctor import config_checks, environment, memory, nvme

    section = doctor_section()
    names = [config_checks.CONFIG, config_checks.WORLD_SIZE, config_checks.SAVES, environment.GPUS, environment.MASTER_ADDR,
             environment.MASTER_PORT, environment.LAUNCHER_ENV, memory.MODEL, memory.GPU_MEMORY,
             memory.HOST_MEMORY, memory.PINNED, nvme.NVME, "version"]
    assert [n for n in names if f"| {n}" not in section] == []


def test_launcher_doc_has_preflight():
    text = (REPO / "docs" / "launcher.md").read_text()
    assert "\n## Preflight\n" in text and "--skip_doctor" in text
