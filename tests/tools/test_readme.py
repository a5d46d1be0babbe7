"""README.md tells the truth about what attnzoo registers."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import model_table  # noqa: E402


def test_readme_model_table_matches_the_registry():
    assert model_table.readme_table(model_table.README.read_text()) == model_table.table(), (
        "README.md's model table is stale: run `python tools/model_table.py --write`")


def test_every_family_registers_models():
    families = model_table.attnzoo_models()
    assert {"davit", "maxvit", "halonet"} <= families.keys()
    assert all(families.values())
