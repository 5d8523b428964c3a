"""Rewrite docs/configuration.md's reference table from src/fedhead/config.py (run after changing an option)."""

from pathlib import Path

from fedhead.config import config_reference

readme = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
text = readme.read_text()
start, end = "<!-- config-reference:start -->\n", "\n<!-- config-reference:end -->"
head, rest = text.split(start)
_, tail = rest.split(end)
readme.write_text(head + start + config_reference() + end + tail)
