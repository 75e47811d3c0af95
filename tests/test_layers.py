"""The package layering of docs/DESIGN.md, checked on the source: data flows one way, so a package imports only
packages of lower layers (or its own), never a private name (``_x``) or private module of another package, and
nothing under ``tml`` imports ``recipes``, ``tests``, ``bench`` or ``data_prep``."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

# Lowest first; a package may import any package of an earlier layer. Modules at tml/ top level (errors.py,
# checksum.py, environment.py) are the base every package may use; cli.py sits on top with the tools.
LAYERS = [
    {"errors", "checksum", "environment"},
    {"audio", "vision", "text"},
    {"streams"},
    {"data", "model"},
    {"parallel"},
    {"train"},
    {"eval"},
    {"serve"},
    {"tools", "cli"},
]
OUTSIDE = ("recipes", "tests", "bench", "data_prep")


def layering_violations(root: Path) -> list[str]:
    """Every import in the package at ``root`` (a directory named like the top package) that breaks LAYERS, as
    'file: imports module (why)'."""
    top = root.name
    rank = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}
    out = []
    for f in sorted(root.rglob("*.py")):
        parts = f.relative_to(root).with_suffix("").parts
        pkg = parts[0]
        here = f.relative_to(root.parent)
        for node in ast.walk(ast.parse(f.read_text(), filename=str(f))):
            if isinstance(node, ast.ImportFrom):
                # a relative import names the same module an absolute one would: resolve it from this file's package
                base = [top, *parts[:-1]][: len(parts) + 1 - node.level] if node.level else []
                module = ".".join([*base, *([node.module] if node.module else [])])
                if module == top:  # from tml import model / from .. import model
                    imported = [(f"{top}.{a.name}", []) for a in node.names]
                else:
                    imported = [(module, [a.name for a in node.names])]
            elif isinstance(node, ast.Import):
                imported = [(a.name, []) for a in node.names]
            else:
                continue
            for module, names in imported:
                p = module.split(".")
                if p[0] in OUTSIDE:
                    out.append(f"{here}: imports {module} (outside the package)")
                if p[0] != top or len(p) < 2 or p[1] == pkg:
                    continue
                target = p[1]
                if target not in rank or pkg not in rank:
                    out.append(f"{here}: imports {module} ({pkg if pkg not in rank else target} has no layer)")
                elif rank[target] >= rank[pkg]:
                    out.append(f"{here}: imports {module} ({target} is not below {pkg})")
                hidden = [x for x in p[2:] if x.startswith("_") and x != "__init__"]
                hidden += [n for n in names if n.startswith("_")]
                if hidden:
                    out.append(f"{here}: imports {module} {hidden} (private to {target})")
    return out


def test_tml_imports_follow_the_layers():
    root = ROOT / "tml"
    assert layering_violations(root) == []
    # every package is placed, so a new one has to be put somewhere deliberately
    packages = {p.name for p in root.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    packages |= {p.stem for p in root.glob("*.py") if p.stem != "__init__"}
    assert packages <= set().union(*LAYERS)


def test_the_checker_finds_each_kind_of_break(tmp_path):
    """A scratch tree with one import of each forbidden kind, and the allowed ones, checked by hand."""
    root = tmp_path / "tml"
    for pkg in ("model", "train", "streams"):
        (root / pkg).mkdir(parents=True)
        (root / pkg / "__init__.py").write_text("")
    (root / "errors.py").write_text("")
    (root / "model" / "heads.py").write_text(
        "from tml.streams.batch import Batch\n"        # lower layer: fine
        "from tml.model.moe import MoE\n"              # own package: fine
        "from tml.errors import ConfigError\n"         # base: fine
        "import torch\n"                               # not ours: fine
        "from tml.train.loop import pretrain\n"        # higher layer
        "from tml.streams._pack import x\n"            # private module of another package
        "from tml.streams.batch import _helper\n"      # private name of another package
        "from recipes.pretrain import main\n"          # outside the package
        "from ..train import loop\n"                   # higher layer, relative
        "from . import moe\n")                         # own package, relative: fine
    (root / "streams" / "batch.py").write_text("import tml.model\nfrom tml import train\n")  # higher layers
    found = layering_violations(root)
    assert found == [
        "tml/model/heads.py: imports tml.train.loop (train is not below model)",
        "tml/model/heads.py: imports tml.streams._pack ['_pack'] (private to streams)",
        "tml/model/heads.py: imports tml.streams.batch ['_helper'] (private to streams)",
        "tml/model/heads.py: imports recipes.pretrain (outside the package)",
        "tml/model/heads.py: imports tml.train (train is not below model)",
        "tml/streams/batch.py: imports tml.model (model is not below streams)",
        "tml/streams/batch.py: imports tml.train (train is not below streams)",
    ]
