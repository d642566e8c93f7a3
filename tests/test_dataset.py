"""helpers.wsi.dataset: the dataset contract (slides, masks, labels.csv layouts, patients)."""

import numpy as np
import pytest
from conftest import write_png, write_tiff_mask

from helpers.core.errors import InputError
from helpers.wsi.dataset import Case, describe_cases, list_cases, read_labels
from helpers.wsi.slides import SlideWarning


def _folder(tmp_path, names=("a", "b", "c")):
    img = np.full((300, 300, 3), 240, np.uint8)
    for n in names:
        write_png(tmp_path / f"{n}.png", img)
    return tmp_path


def test_list_cases_layout(tmp_path):
    a = np.full((300, 300, 3), 240, np.uint8)
    write_png(tmp_path / "b.png", a)
    write_png(tmp_path / "a.jpg", a)
    write_png(tmp_path / "a_whole.png", np.zeros((300, 300), np.uint8))
    write_tiff_mask(tmp_path / "b_viable.tif", np.zeros((300, 300), np.uint8))
    (tmp_path / "notes.txt").write_text("not a slide")
    (tmp_path / ".hidden.png").write_bytes(b"")
    (tmp_path / "labels.csv").write_text("case_id,label\na,tumor\nb,normal\nzzz,1\n")
    with pytest.warns(SlideWarning, match="1 rows name no slide.*zzz"):
        cases = list_cases(tmp_path)
    assert [c.case_id for c in cases] == ["a", "b"]
    a_, b_ = cases
    assert a_.whole == tmp_path / "a_whole.png" and a_.viable is None and a_.label == 1
    assert b_.whole is None and b_.viable == tmp_path / "b_viable.tif" and b_.label == 0
    assert b_.mask_path("viable") == b_.viable
    with pytest.raises(InputError, match="tumor"):
        b_.mask_path("tumor")


@pytest.mark.parametrize(
    "header,rows,patients",
    [
        ("slide_id,label,patient_id", ["a,1,P1", "b,0,P1", "c,,P2"], {"a": "P1", "b": "P1", "c": "P2"}),
        ("slide_id,label,case_id", ["a,1,P1", "b,0,P1", "c,,P2"], {"a": "P1", "b": "P1", "c": "P2"}),
        ("case_id,label", ["a,1", "b,0", "c,"], {}),
        ("case_id,label,patient_id", ["a,tumour,P9", "b,normal,", "c,,P9"], {"a": "P9", "c": "P9"}),
    ],
)
def test_the_accepted_label_layouts(tmp_path, header, rows, patients):
    _folder(tmp_path)
    (tmp_path / "labels.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    cases = list_cases(tmp_path)
    assert [c.label for c in cases] == [1, 0, None]  # an empty label is unknown, not 0
    assert {c.case_id: c.patient_id for c in cases if c.patient_id} == patients
    assert [c.patient for c in cases] == [patients.get(i, i) for i in "abc"]


def test_a_labels_file_that_names_no_slide_is_an_error(tmp_path):
    _folder(tmp_path)
    (tmp_path / "labels.csv").write_text("slide_id,label,case_id\nP1,1,x\nP2,0,y\n")
    with pytest.raises(InputError, match="names no slide.*P1.*slide file names"):
        list_cases(tmp_path)


def test_bad_label_files(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("case,label\nx,1\n")
    with pytest.raises(InputError, match="slide column and a label column.*slide_id,label,patient_id"):
        read_labels(p)
    p.write_text("slide_id,label\nx,1\ny,maybe\n")
    with pytest.raises(InputError, match="line 3.*maybe"):
        read_labels(p)
    p.write_text("slide_id,label\nx,1\nx,0\n")
    with pytest.raises(InputError, match="line 3.*'x' is listed twice"):
        read_labels(p)
    p.write_text("\ufeffslide_id , label\nx,1\n")  # a BOM and spaces (spreadsheet export)
    assert read_labels(p).labels == {"x": 1}


def test_slides_without_masks_or_labels_are_unlabelled(tmp_path):
    _folder(tmp_path)
    cases = list_cases(tmp_path)
    assert all(c.label is None and c.whole is None and c.viable is None for c in cases)
    d = describe_cases(cases, tmp_path)
    assert d["slides"] == 3 and d["no mask"] == 3 and d["labelled"] == 0 and d["patients"] == 3


def test_two_files_with_one_slide_id_are_refused(tmp_path):
    _folder(tmp_path, ["a"])
    write_png(tmp_path / "a.jpg", np.full((30, 30, 3), 200, np.uint8))
    with pytest.raises(InputError, match="share the slide id 'a'.*a.jpg.*a.png"):
        list_cases(tmp_path)


def test_slides_in_subfolders_are_found_with_the_masks_beside_them(tmp_path):
    img = np.full((300, 300, 3), 240, np.uint8)
    (tmp_path / "batch_1").mkdir()
    (tmp_path / "batch_2" / "rescans").mkdir(parents=True)
    (tmp_path / ".trash").mkdir()
    write_png(tmp_path / "top.png", img)
    write_png(tmp_path / "batch_1" / "s1.png", img)
    write_png(tmp_path / "batch_1" / "s1_whole.png", np.zeros((300, 300), np.uint8))
    write_png(tmp_path / "batch_2" / "rescans" / "s2.png", img)
    write_tiff_mask(tmp_path / "batch_2" / "rescans" / "s2_viable.tif", np.zeros((300, 300), np.uint8))
    write_png(tmp_path / "batch_2" / "s2_whole.png", np.zeros((300, 300), np.uint8))  # not beside s2
    write_png(tmp_path / ".trash" / "old.png", img)  # hidden folders are left out
    (tmp_path / "labels.csv").write_text("slide_id,label\ns1,1\ns2,0\ntop,1\n")
    cases = {c.case_id: c for c in list_cases(tmp_path)}
    assert sorted(cases) == ["s1", "s2", "top"]
    assert cases["s1"].whole == tmp_path / "batch_1" / "s1_whole.png" and cases["s1"].label == 1
    assert cases["s2"].viable == tmp_path / "batch_2" / "rescans" / "s2_viable.tif"
    assert cases["s2"].whole is None and cases["s2"].label == 0
    folders = describe_cases(list(cases.values()), tmp_path)["folders"]
    assert folders == {".": 1, "batch_1": 1, "batch_2/rescans": 1}


def test_one_slide_id_in_two_subfolders_is_one_error_naming_both_paths(tmp_path):
    img = np.full((60, 60, 3), 240, np.uint8)
    for sub in ("batch_1", "batch_2"):
        (tmp_path / sub).mkdir()
        write_png(tmp_path / sub / "s7.png", img)
    with pytest.raises(InputError) as ei:
        list_cases(tmp_path)
    msg = str(ei.value)
    assert "'s7'" in msg and "batch_1/s7.png" in msg and "batch_2/s7.png" in msg and "\n" not in msg


def test_a_folder_without_slides_says_subfolders_were_searched(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="nor in its subfolders"):
        list_cases(tmp_path)


def test_case_defaults():
    c = Case("x", "x.svs")
    assert c.whole is None and c.viable is None and c.label is None and c.patient == "x"
