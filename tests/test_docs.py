"""The design page's map names only what exists: every dotted taskwheel name resolves, and
every path it gives is in the tree."""
import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DESIGN = (ROOT / "docs" / "design.md").read_text()


def _resolve(dotted: str) -> object:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


NAMES = sorted(set(re.findall(r"`(taskwheel(?:\.\w+)+)`", DESIGN)))
PATHS = sorted(set(re.findall(r"`((?:protos|core|services|tests|perf|docs)/[\w./-]*)`", DESIGN)))


def test_the_design_page_names_code_and_paths():
    assert len(NAMES) > 20 and len(PATHS) > 8


@pytest.mark.parametrize("name", NAMES)
def test_every_name_on_the_design_page_exists(name):
    _resolve(name)


@pytest.mark.parametrize("path", PATHS)
def test_every_path_on_the_design_page_exists(path):
    assert (ROOT / path).exists(), path
