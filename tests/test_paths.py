"""lorafit.paths: the cache folder and folders written whole or not at all."""

import pytest

from lorafit.paths import cache_dir, write_folder


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"


def test_a_written_folder_replaces_the_old_one_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out" / "model"
    write_folder(target, lambda d: (d / "a.txt").write_text("one"))
    write_folder(target, lambda d: (d / "b.txt").write_text("two"))
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [p.name for p in target.parent.iterdir()] == ["model"]


def test_a_file_at_the_target_is_replaced_too(tmp_path):
    target = tmp_path / "merged"
    target.write_text("an old file")
    write_folder(target, lambda d: (d / "config.json").write_text("{}"))
    assert (target / "config.json").read_text() == "{}"


def test_a_failing_write_leaves_the_target_as_it_was(tmp_path):
    target = tmp_path / "ckpt"
    write_folder(target, lambda d: (d / "state").write_text("good"))

    def half(d):
        (d / "state").write_text("half")
        raise KeyboardInterrupt  # what an interrupted save looks like

    with pytest.raises(KeyboardInterrupt):
        write_folder(target, half)
    assert (target / "state").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
