"""The notebooks are stored as a real top-to-bottom run left them: every code cell executed once, in
order, without errors, with small PNG outputs and no widget state (see the README's conventions)."""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
MAX_PNG_BYTES = 200_000


def test_there_are_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS] == [f"{i:02d}" for i in range(len(NOTEBOOKS))]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_outputs_come_from_one_clean_run(path):
    nb = json.loads(path.read_text())
    assert "widgets" not in nb["metadata"], "widget state stored: strip metadata['widgets']"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    counts = [c["execution_count"] for c in code]
    assert counts == list(range(1, len(code) + 1)), "not one top-to-bottom run: re-execute it"
    for i, cell in enumerate(code):
        for out in cell["outputs"]:
            assert out["output_type"] != "error", f"code cell {i} stored an error"
            png = out.get("data", {}).get("image/png", "")
            assert len(png) * 3 // 4 <= MAX_PNG_BYTES, f"code cell {i}: a PNG over 200 kB"
