"""The README documents every app setting the code reads, and keeps the quick start the CI relies on."""

from pathlib import Path

from core.config import SETTINGS

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_app_setting_is_in_the_readme() -> None:
    missing = [s.name for s in SETTINGS if f"`{s.name}`" not in README and s.name not in README]
    assert not missing, f"README.md's settings table lacks: {missing}"


def test_quick_start_commands() -> None:
    assert "make run" in README and "make test" in README


def test_linked_docs_exist() -> None:
    import re

    root = Path(__file__).resolve().parents[2]
    for link in re.findall(r"\]\((docs/[^)#]+)", README):
        assert (root / link).exists(), link
