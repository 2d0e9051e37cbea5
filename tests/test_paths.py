"""lorafit.paths: the cache folder and folders written whole or not at all."""

import os

import pytest

from lorafit.paths import cache_dir, clean_leftovers, remove_folder, temporary_file, umask, write_folder


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


@pytest.mark.parametrize("mask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_written_files_and_folders_get_the_umasks_permissions(tmp_path, mask, file_mode, folder_mode):
    """mkstemp / mkdtemp make private 0600 / 0700 entries; what lorafit writes follows the umask instead."""
    old = os.umask(mask)
    try:
        assert umask() == mask
        def write(folder):
            (folder / "config.json").write_text("{}")
            (folder / "model.safetensors").write_bytes(b"")
            (folder / "model.safetensors").chmod(0o600)  # what safetensors' save_file leaves

        folder = write_folder(tmp_path / "merged", write)
        with temporary_file(tmp_path / "model.gguf") as tmp:
            tmp.write_bytes(b"GGUF")
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == folder_mode
    assert (folder / "config.json").stat().st_mode & 0o777 == file_mode
    assert (folder / "model.safetensors").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "model.gguf").stat().st_mode & 0o777 == file_mode


def test_a_temporary_file_is_renamed_when_complete_and_removed_when_not(tmp_path):
    target = tmp_path / "adapter_model.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), temporary_file(target) as tmp:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_a_removed_folder_is_renamed_away_first_and_leftovers_are_cleaned(tmp_path):
    (tmp_path / "step-2" / "adapter").mkdir(parents=True)
    remove_folder(tmp_path / "step-2")
    assert list(tmp_path.iterdir()) == []
    for name in (".step-4.deleting-x", ".step-6.tmp-y"):  # what an interrupted delete or write leaves
        (tmp_path / name).mkdir()
    (tmp_path / ".adapter_model.safetensors.z.tmp").write_bytes(b"")
    (tmp_path / ".keep").write_text("a user's file")
    assert len(clean_leftovers(tmp_path)) == 3
    assert [p.name for p in tmp_path.iterdir()] == [".keep"]
