"""Training data from someone else: rows of the wrong width are refused with file:line, image paths that leave the
image root are refused unless allowed, and an unreadable image is reported once, not once per epoch (issue 17,
finding 7)."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from fromage_gill.cli import main
from fromage_gill.training.data import DataError, read_records
from fromage_gill.training.loop import TrainConfig, train
from fromage_gill.training.synthetic import make_shapes


@pytest.fixture
def table(tmp_path):
    """A CC3M-style TSV whose images live under tmp/a/b/c (its folder, the default image root)."""
    data = make_shapes(tmp_path / "a" / "b" / "c", 4, fmt="tsv")
    return data


@pytest.mark.parametrize(
    ("row", "cells"), [("a caption with no image column", 1), ("a red circle\timages/00000.png\textra", 3)]
)
def test_a_row_of_the_wrong_width_is_refused_with_its_line(table, row, cells):
    lines = table.read_text().splitlines()
    lines.insert(3, row)  # the 4th line of the file
    table.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{table.name}:4: {cells} cell\(s\), but the header has 2"):
        read_records(table)


def test_a_txt_list_with_three_cells_on_a_line_is_refused(tmp_path):
    data = make_shapes(tmp_path, 2, fmt="tsv")
    txt = tmp_path / "list.txt"
    txt.write_text("a red circle\timages/00000.png\n" + "a caption\twith a tab\timages/00001.png\n")
    with pytest.raises(DataError, match=r"list.txt:2: 3 TAB-separated cells"):
        read_records(txt)
    assert data.is_file()


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".txt"])
def test_a_caption_over_the_csv_field_limit_names_file_and_line(tmp_path, suffix):
    data = make_shapes(tmp_path, 3, fmt="tsv")
    lines = data.read_text().splitlines()
    sep = "," if suffix == ".csv" else "\t"
    long = "a red circle " * 11_000  # 143,000 characters: over csv's 131,072
    rows = [line.replace("\t", sep) for line in lines]
    rows.insert(2, f"{long}{sep}images/00001.png")  # the 3rd line
    table = tmp_path / f"long{suffix}"
    table.write_text("\n".join(rows[1:] if suffix == ".txt" else rows) + "\n")
    line = 2 if suffix == ".txt" else 3
    if suffix == ".txt":  # a .txt list is read line by line: the caption is long but read, not an error
        assert any(len(r.caption) > 131_072 for r in read_records(table).items)
        return
    with pytest.raises(DataError, match=rf"--data .*long\{suffix}:{line}: field larger than field limit .*shorten it"):
        read_records(table)


@pytest.mark.parametrize("suffix", [".tsv", ".txt"])
def test_a_table_that_is_not_utf8_names_the_file_line_and_the_fix(tmp_path, suffix, capsys):
    data = make_shapes(tmp_path, 3, fmt="tsv")
    lines = data.read_text().splitlines()
    lines[2] = lines[2].replace("a ", "a café ", 1)
    table = tmp_path / f"latin1{suffix}"
    table.write_bytes(("\n".join(lines[1:] if suffix == ".txt" else lines) + "\n").encode("latin-1"))
    line = 2 if suffix == ".txt" else 3
    with pytest.raises(DataError, match=rf"latin1\{suffix}:{line}: is not UTF-8 text .*byte 0xe9.*iconv -f latin1"):
        read_records(table)
    argv = ["train", "--model", "tiny-fromage", "--data", str(table), "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 2
    assert f"{table}:{line}: is not UTF-8 text" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def outside_refs(tmp_path) -> list[str]:
    """Three ways out of tmp/a/b/c: ../ segments, an absolute path, a symlink inside the root that points out."""
    secret = tmp_path / "secret.png"
    secret.write_bytes((tmp_path / "a" / "b" / "c" / "images" / "00000.png").read_bytes())
    link = tmp_path / "a" / "b" / "c" / "images" / "link.png"
    os.symlink(secret, link)
    return ["../../../secret.png", str(secret), "images/link.png"]


@pytest.mark.parametrize("which", [0, 1, 2])
def test_image_paths_outside_the_root_are_refused_unless_allowed(table, tmp_path, which):
    ref = outside_refs(tmp_path)[which]
    with open(table, "a") as f:
        f.write(f"a stolen file\t{ref}\n")
    with pytest.raises(
        DataError, match=r"1 image path\(s\) resolve outside the image root.*--allow-images-outside-root"
    ):
        read_records(table)
    recs = read_records(table, allow_outside_root=True)
    assert len(recs) == 5 and recs.items[-1].caption == "a stolen file"


def test_an_explicit_image_root_is_the_one_paths_must_stay_inside(table):
    images = table.parent / "images"
    table.write_text("caption\timage\na red circle\t00000.png\n")
    assert len(read_records(table, image_root=images)) == 1
    table.write_text("caption\timage\na red circle\t00000.png\nthe table itself\t../captions.tsv\n")
    with pytest.raises(DataError, match="outside the image root"):
        read_records(table, image_root=images)


def test_the_cli_refuses_and_the_flag_allows(table, tmp_path, capsys):
    with open(table, "a") as f:
        f.write(f"a stolen file\t{outside_refs(tmp_path)[1]}\n")
    argv = ["precompute", "--model", "tiny-fromage", "--data", str(table), "--out", str(tmp_path / "pre")]
    assert main([*argv, "--no-progress", "--device", "cpu", "--dtype", "fp32"]) == 2
    assert "--allow-images-outside-root" in capsys.readouterr().err
    argv = [*argv, "--no-progress", "--device", "cpu", "--dtype", "fp32", "--allow-images-outside-root"]
    assert main(argv) == 0


def test_an_unreadable_image_is_counted_and_logged_once_across_epochs(tmp_path, caplog):
    torch.set_num_threads(1)
    data = make_shapes(tmp_path / "d", 8, fmt="tsv")
    for i in range(2, 8):
        (tmp_path / "d" / "images" / f"{i:05d}.png").write_bytes(b"broken")
    kw = dict(model="tiny-fromage", batch_size=2, val_fraction=0.0, progress=False, tensorboard=False)
    with caplog.at_level(logging.WARNING, logger="fromage_gill.training.loop"):
        res = train(TrainConfig(data=str(data), out=str(tmp_path / "run"), max_steps=12, **kw))  # 3 epochs of 4
    assert res.step == 12 and res.skipped == 6
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped ")]
    assert len(logged) == 6 and len(set(logged)) == 6
