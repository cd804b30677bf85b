"""`dpdistill datasets`: nothing cut mid-word at any terminal width, and a user's own set (imagefolder, npz)
is never reported present because the shared data root happens to hold folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpdistill.cli import main


@pytest.fixture()
def datasets(monkeypatch, capsys):
    def run(data_root: Path, columns: int) -> str:
        monkeypatch.setenv("DPDISTILL_DATA", str(data_root))
        monkeypatch.setenv("COLUMNS", str(columns))  # rich sizes its console from it
        main(["datasets"])
        return capsys.readouterr().out

    return run


@pytest.fixture()
def data_root(tmp_path):
    (tmp_path / "MNIST").mkdir()  # a parent of datasets, not an image folder
    return tmp_path


@pytest.mark.parametrize("columns", [50, 80, 100, 140])
def test_datasets_fits_the_terminal_without_cutting_words(datasets, data_root, columns):
    out = datasets(data_root, columns)
    assert "…" not in out  # the old table cut paths with an ellipsis (and its own [:60] slice mid-word)
    assert max(len(line) for line in out.splitlines()) <= columns
    if columns < 100:  # one line per dataset: a folded path reads whole once the wrapping is removed
        flat = "".join(out.split())
        assert "MNIST/raw/train-images-idx3-ubyte" in flat and "svhn/test_32x32.mat" in flat


def test_imagefolder_is_not_present_under_a_shared_data_root(datasets, data_root):
    rows = {line.split("│")[1].strip(): line for line in datasets(data_root, 140).splitlines()
            if line.count("│") > 3}
    for user_set in ("imagefolder", "npz"):
        cells = [c.strip() for c in rows[user_set].split("│")]
        assert cells[4] != "yes" and "data.root" in cells[5], rows[user_set]
    assert [c.strip() for c in rows["digits"].split("│")][4] == "yes"
    assert [c.strip() for c in rows["mnist"].split("│")][4] == "no"
