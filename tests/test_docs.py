"""The front door stays true: README's and CONTRIBUTING's maps list every part of wsi_toolkit, and the README's
"two commands" section is two commands (issue 30)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _parts() -> list[str]:
    """Every module (``name.py``) and subpackage (``name/``) directly in wsi_toolkit."""
    pkg = ROOT / "wsi_toolkit"
    return sorted([f"{p.name}/" for p in pkg.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
                  + [p.name for p in pkg.glob("*.py") if p.name != "__init__.py"])


def _code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced code block."""
    return re.findall(r"^```(\w*)\n(.*?)^```$", text, flags=re.S | re.M)


def _layout_block(doc: str) -> str:
    text = (ROOT / doc).read_text(encoding="utf-8")
    blocks = [b for _, b in _code_blocks(text) if b.startswith("wsi_toolkit/")]
    assert len(blocks) == 1, f"{doc}: expected one layout block starting with wsi_toolkit/"
    return blocks[0]


@pytest.mark.parametrize("doc", ["README.md", "CONTRIBUTING.md"])
def test_layout_lists_every_part_of_the_package(doc):
    block = _layout_block(doc)
    listed = set(re.findall(r"(?<![\w.])([a-z_]+(?:\.py|/))", block))
    missing = [part for part in _parts() if part not in listed]
    assert not missing, f"{doc}'s layout block does not list {missing}"


def test_the_two_commands_are_two():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    commands = [line for lang, block in _code_blocks(section) if lang == "bash"
                for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
