"""Expanding PATH arguments: files, folders, globs, zips; what is reported, what is refused."""
from __future__ import annotations

import zipfile

import pytest

from hematoscope.bundle.prediction import SkippedFile
from hematoscope.data.sources import ArchiveReader, ImageSource, expand_paths


def _names(items):
    return [i.name if isinstance(i, ImageSource) else ("SKIP", i.source, i.reason) for i in items]


def test_folder_is_recursive_sorted_and_ignores_non_images(messy_folder):
    items = expand_paths([messy_folder])
    names = [i.name for i in items]
    assert all(isinstance(i, ImageSource) for i in items)
    assert names == sorted(names) and len(names) == 9  # 6 good + 3 bad with image extensions
    assert not any(n.endswith("notes.txt") for n in names)
    assert str(messy_folder / "b" / "deep" / "cell_5.jpg") in names


def test_files_passed_over_in_folders_and_zips_are_listed_for_the_user(messy_folder, tmp_path):
    """A lab's folder with notes or images under an unknown extension is told what was left out;
    hidden and system files, and zips' resource forks, are not worth a word."""
    from hematoscope.data.sources import left_out_summary

    (messy_folder / "b" / "cell_9.heic").write_bytes(b"an image this reader does not take")
    (messy_folder / ".DS_Store").write_bytes(b"x")
    (messy_folder / ".git").mkdir()
    (messy_folder / ".git" / "HEAD").write_text("ref")
    (messy_folder / "Thumbs.db").write_bytes(b"x")
    archive = tmp_path / "more.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("c/cell.png", b"x")
        zf.writestr("c/count.csv", "a,b")
        zf.writestr("c/", "")
        zf.writestr("__MACOSX/c/._cell.png", b"x")
    left_out: list[str] = []
    items = expand_paths([messy_folder, archive], left_out=left_out)
    assert len(items) == 10  # the 9 images of the folder and the zip's one: nothing else changed
    assert left_out == [str(messy_folder / "b" / "cell_9.heic"), str(messy_folder / "notes.txt"),
                        f"{archive}!c/count.csv"]
    summary = left_out_summary(left_out)
    assert summary.startswith("3 files in the folders or zips were left out") and ".heic 1" in summary
    assert ".jpg" in summary  # says which extensions are read
    assert expand_paths([messy_folder]) == items[:9]  # without the list, the same items


def test_named_files_are_attempted_and_missing_ones_reported(messy_folder, tmp_path):
    notes = messy_folder / "notes.txt"
    items = expand_paths([notes, tmp_path / "nope.jpg", str(tmp_path / "*.png")])
    assert items[0] == ImageSource(str(notes), notes)  # named: the decoder will say why it fails
    assert items[1] == SkippedFile(str(tmp_path / "nope.jpg"), "file not found")
    assert items[2] == SkippedFile(str(tmp_path / "*.png"), "no file matches this pattern")


def test_glob_takes_images_and_recurses_into_matched_folders(messy_folder):
    items = expand_paths([str(messy_folder / "**" / "cell_*.jpg")])
    assert [i.path.name for i in items] == [f"cell_{i}.jpg" for i in range(6)]
    items = expand_paths([str(messy_folder / "*")])  # matches folders a, b and notes.txt
    assert len(items) == 9 and all(isinstance(i, ImageSource) for i in items)


def test_zip_members_are_named_inside_the_archive(messy_zip):
    items = expand_paths([messy_zip])
    names = [i.name for i in items]
    assert names[0] == f"{messy_zip}!a/cell_0.jpg"
    assert len(names) == 9 and not any("__MACOSX" in n or "notes" in n for n in names)
    reader = ArchiveReader()
    try:
        assert reader.read(items[0])[:2] == b"\xff\xd8"  # a JPEG
    finally:
        reader.close()


@pytest.mark.parametrize("evil", ["../evil.jpg", "/abs/evil.jpg", "a/../../evil.jpg"])
def test_zip_with_path_traversal_is_reported_and_not_read(tmp_path, evil):
    path = tmp_path / "evil.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("good.jpg", b"x")
        zf.writestr(zipfile.ZipInfo(evil), b"payload")
    [item] = expand_paths([path])  # not even good.jpg is taken from a hostile archive
    assert isinstance(item, SkippedFile) and item.source == str(path)
    assert item.reason.startswith("unsafe zip, not read") and "path traversal" in item.reason


def test_corrupt_zip_is_reported_not_fatal(tmp_path):
    bad = tmp_path / "broken.zip"
    bad.write_bytes(b"PK\x03\x04 this is no zip")
    [item] = expand_paths([bad])
    assert isinstance(item, SkippedFile) and item.source == str(bad)
    assert item.reason.startswith("not a readable zip file")


def test_folder_links_broken_links_and_names_that_are_not_text(tmp_path):
    """What a lab's share holds besides images is named with its reason, never dropped silently:
    a linked folder is read (once, even when it links back up), a broken link or a link loop and
    a file name of undecodable bytes are skipped with why, and every other image is classified."""
    import os

    from hematoscope.data.readers import DatasetError, read_dataset
    from hematoscope.samples import sample_paths

    cells = sample_paths()[:3]
    lab = tmp_path / "lab"
    (lab / "a").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    for i, cell in enumerate(cells[:2]):
        (lab / "a" / f"cell_{i}.jpg").write_bytes(cell.read_bytes())
    (tmp_path / "elsewhere" / "cell_x.jpg").write_bytes(cells[2].read_bytes())
    (lab / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (lab / "a" / "up").symlink_to(lab, target_is_directory=True)  # back up the tree
    (lab / "a" / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    (lab / "a" / "loop1.jpg").symlink_to(lab / "a" / "loop2.jpg")
    (lab / "a" / "loop2.jpg").symlink_to(lab / "a" / "loop1.jpg")
    odd = os.path.join(os.fsencode(lab / "a"), b"bad\xff\xfe.jpg")
    with open(odd, "wb") as f:
        f.write(cells[0].read_bytes())

    items = expand_paths([lab])
    read = [i.name for i in items if isinstance(i, ImageSource)]
    skipped = {i.source.rsplit("/", 1)[-1]: i.reason for i in items if isinstance(i, SkippedFile)}
    assert sorted(n.rsplit("/", 1)[-1] for n in read) == ["cell_0.jpg", "cell_1.jpg", "cell_x.jpg"]
    assert "broken link" in skipped["gone.jpg"] and "broken link" in skipped["loop1.jpg"]
    assert "not valid UTF-8" in skipped["bad\\xff\\xfe.jpg"]
    assert "already read" in skipped["up"]
    # a dataset reader cannot list such a name: a clear error naming it, not a codec traceback
    (lab / "b").mkdir()
    with open(os.path.join(os.fsencode(lab / "b"), b"bad\xff.jpg"), "wb") as f:
        f.write(cells[0].read_bytes())
    with pytest.raises(DatasetError, match=r"bad\\xff\.jpg: rename"):
        read_dataset(lab, reader="folder")


def test_an_image_named_twice_is_read_once_with_a_warning(messy_folder, messy_zip, tmp_path):
    """A folder, a glob over it and a link to one of its files: each image once, or a lab's
    differential counts some cells twice."""
    once = expand_paths([messy_folder, messy_zip])
    first = next(i for i in once if isinstance(i, ImageSource))
    (tmp_path / "link.png").symlink_to(first.path)
    with pytest.warns(UserWarning, match="named more than once"):
        again = expand_paths([messy_folder, str(messy_folder / "**" / "*"), messy_zip, messy_zip,
                              tmp_path / "link.png"])
    assert [i.name for i in again] == [i.name for i in once]
