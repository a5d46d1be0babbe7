"""The README's model table, generated from timm's registry after `import attnzoo`.

    python tools/model_table.py            # print the table
    python tools/model_table.py --write    # replace the table in README.md

tests/tools/test_readme.py fails when README.md and the registry disagree.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import timm

import attnzoo  # noqa: F401  (registers the models)
from attnzoo.cli import tool_main
from attnzoo.common import atomic_write

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- models:start -->", "<!-- models:end -->"


def attnzoo_models() -> dict[str, list[str]]:
    """Registered attnzoo model names, by family (the backbone module's name)."""
    families: dict[str, list[str]] = {}
    for name in timm.list_models():
        module = timm.models.model_entrypoint(name).__module__
        if module.startswith("attnzoo.backbones."):
            families.setdefault(module.rsplit(".", 1)[1], []).append(name)
    return families


def weights_source(name: str) -> str:
    tags = timm.list_pretrained(f"{name}.*")
    if not tags:
        return "none published"
    cfg = timm.models.get_pretrained_cfg(tags[0])
    return f"`{cfg.hf_hub_id}`" if cfg.hf_hub_id else cfg.url


def table() -> str:
    lines = ["| family | model | pretrained tags | default weights |", "|---|---|---|---|"]
    for family, names in sorted(attnzoo_models().items()):
        for name in names:
            tags = ", ".join(f"`{t.split('.', 1)[1]}`" for t in timm.list_pretrained(f"{name}.*")) or "–"
            lines.append(f"| {family} | `{name}` | {tags} | {weights_source(name)} |")
    return "\n".join(lines)


def readme_table(text: str) -> str:
    match = re.search(re.escape(START) + r"\n(.*?)\n" + re.escape(END), text, re.S)
    if match is None:
        raise SystemExit(f"README.md has no {START} ... {END} section")
    return match.group(1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help="replace the table in README.md")
    args = p.parse_args(argv)
    if not args.write:
        print(table())
        return 0
    text = README.read_text()
    atomic_write(README, text.replace(readme_table(text), table()))  # a failed write leaves README.md whole
    print(f"updated {README}")
    return 0


if __name__ == "__main__":
    sys.exit(tool_main("model_table.py", main))
