"""README.md tells the truth about what attnzoo registers."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import model_table  # noqa: E402


def test_readme_model_table_matches_the_registry():
    assert model_table.readme_table(model_table.README.read_text()) == model_table.table(), (
        "README.md's model table is stale: run `python tools/model_table.py --write`")


def test_every_family_registers_models():
    families = model_table.attnzoo_models()
    assert {"davit", "maxvit", "halonet"} <= families.keys()
    assert all(families.values())


def test_write_replaces_the_table_atomically(tmp_path, monkeypatch):
    """--write replaces only the table; a write that fails leaves README.md as it was (and no temporary file)."""
    readme = tmp_path / "README.md"
    old = f"intro\n{model_table.START}\n| old |\n{model_table.END}\nrest\n"
    readme.write_text(old)
    monkeypatch.setattr(model_table, "README", readme)
    monkeypatch.setattr(model_table, "table", lambda: "| new |")

    def crash(*args):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as faults:
        faults.setattr("os.replace", crash)
        with pytest.raises(OSError, match="No space left"):
            model_table.main(["--write"])
    assert readme.read_text() == old and sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]
    assert model_table.main(["--write"]) == 0
    assert readme.read_text() == old.replace("| old |", "| new |")
