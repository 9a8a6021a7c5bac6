"""Output folders never cost a user a file: what hf_prune did not write is never deleted, its own earlier output is
replaced only with overwrite, the source model and the working directory are never written, every refusal comes
before anything is loaded or written, and a push uploads only files inside the folder."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch
import transformers as T
from conftest import make_model

from hf_prune import InputCompensatedModel, InputCompensationConfig, MagnitudeConfig, Pruner, SPPConfig
from hf_prune.artifacts.hub import push_folder
from hf_prune.atomic import OUTPUT_MANIFEST, atomic_output_dir, remove_dead_saves
from hf_prune.cli import main
from hf_prune.errors import OutputDirError, PushFolderError
from hf_prune.methods.spp import attach_masks, save_model


def _tree(folder) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones included) with the sha256 of its bytes."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            full = os.path.join(root, name)
            out[os.path.relpath(full, folder)] = hashlib.sha256(open(full, "rb").read()).hexdigest()
    return out


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, snap) -> None:
    now = model.state_dict()
    assert now.keys() == snap.keys() and all(torch.equal(now[k], v) for k, v in snap.items())


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("hf-prune: error: ") and len(err.strip().splitlines()) == 1, err
    return err


@pytest.fixture()
def no_load(monkeypatch):
    """Fails the test if the CLI loads the model: every refusal here must come before that."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was refused")

    monkeypatch.setattr(Pruner, "from_pretrained", refuse)


@pytest.fixture()
def pruned(tokenizer):
    pruner = Pruner(make_model("llama", vocab=len(tokenizer)), tokenizer)
    pruner.prune(MagnitudeConfig(), progress=False)
    return pruner


def _prune_args(model_dir, out, *extra) -> list[str]:
    return ["prune", str(model_dir), "--method", "magnitude", "--output", str(out), "--no-checkpoint", "--no-progress",
            *extra]


# ------------------------------------------------------------------------------------------------ the user's files


def test_cli_refuses_a_folder_holding_a_users_file_before_loading(model_dir, tmp_path, capsys, no_load):
    out = tmp_path / "d"
    out.mkdir()
    (out / "thesis.txt").write_text("four years of work")
    for extra in ((), ("--overwrite",)):  # overwrite replaces only hf_prune's own output
        assert main(_prune_args(model_dir, out, *extra)) == 2
        err = _one_line_error(capsys)
        assert "holds files hf_prune did not write (thesis.txt)" in err and "choose a new or empty output folder" in err
        assert os.listdir(out) == ["thesis.txt"] and (out / "thesis.txt").read_text() == "four years of work"


def test_a_checkpoint_dir_inside_the_output_is_refused_before_loading(model_dir, tmp_path, capsys, no_load):
    out = tmp_path / "out"
    args = ["prune", str(model_dir), "--method", "wanda", "--output", str(out), "--no-progress",
            "--checkpoint-dir", str(out / "ckpt")]
    assert main(args) == 2
    assert "lies inside --output" in _one_line_error(capsys)
    assert not out.exists()


def test_api_refuses_a_folder_holding_a_users_file_and_leaves_the_model(pruned, tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "keep_me.txt").write_text("mine")
    snap = _snapshot(pruned.model)
    for overwrite in (False, True):
        with pytest.raises(OutputDirError, match=r"holds files hf_prune did not write \(keep_me.txt\)"):
            pruned.save_pretrained(out, overwrite=overwrite)
    assert os.listdir(out) == ["keep_me.txt"] and (out / "keep_me.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["d"]  # no staged folder left beside it
    _assert_unchanged(pruned.model, snap)


def test_a_file_added_to_hf_prunes_output_makes_it_the_users(pruned, tmp_path):
    out = tmp_path / "out"
    pruned.save_pretrained(out)
    (out / "notes.txt").write_text("my notes")
    with pytest.raises(OutputDirError, match=r"did not write \(notes.txt\)"):
        pruned.save_pretrained(out, overwrite=True)
    assert (out / "notes.txt").read_text() == "my notes" and (out / "model.safetensors").is_file()


def test_a_file_added_while_the_folder_is_staged_stops_the_swap(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        open(os.path.join(tmp, "weights.bin"), "w").close()
    with pytest.raises(OutputDirError, match=r"did not write \(notes.txt\)"):
        with atomic_output_dir(out, overwrite=True) as tmp:
            assert os.path.basename(tmp).startswith(f".out.partial-{os.getpid()}-")  # its owner can be told
            open(os.path.join(tmp, "weights.bin"), "w").close()
            (out / "notes.txt").write_text("written meanwhile")
    assert sorted(os.listdir(out)) == sorted([OUTPUT_MANIFEST, "notes.txt", "weights.bin"])
    assert sorted(os.listdir(tmp_path)) == ["out"]


# ------------------------------------------------------------------------------------------------ never replaced


def test_output_equal_to_the_source_model_folder_is_refused(model_dir, tmp_path, capsys):
    before = _tree(model_dir)
    for out, words in ((model_dir, "is the source model's folder"), (tmp_path, "a folder holding the source model")):
        for extra in ((), ("--overwrite",)):
            assert main(_prune_args(model_dir, out, *extra)) == 2
            err = _one_line_error(capsys)
            assert words in err and "would replace the model being pruned" in err
    assert _tree(model_dir) == before  # the dense weights untouched
    model = T.LlamaForCausalLM.from_pretrained(model_dir)  # the API refuses it too, knowing the model's origin
    pruner = Pruner(model)
    pruner.prune(MagnitudeConfig(), progress=False)
    with pytest.raises(OutputDirError, match="is the source model's folder"):
        pruner.save_pretrained(model_dir, overwrite=True)
    assert _tree(model_dir) == before


def test_output_dot_in_a_project_is_refused_and_the_project_survives(model_dir, tmp_path, monkeypatch, capsys,
                                                                    no_load):
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)
    (project / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (project / "train.py").write_text("print('hi')\n")
    before = _tree(project)
    monkeypatch.chdir(project)
    for out, words in ((".", "is the current working directory"), ("..", "a folder holding the working directory"),
                       (str(project), "is the current working directory")):
        for extra in ((), ("--overwrite",)):
            assert main(_prune_args(model_dir, out, *extra)) == 2
            assert words in _one_line_error(capsys)
    assert _tree(project) == before


# ------------------------------------------------------------------------------------------------ overwrite


def test_second_run_into_the_same_output_needs_overwrite(model_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(_prune_args(model_dir, out)) == 0
    assert "saved to" in capsys.readouterr().out
    first = _tree(out)
    assert OUTPUT_MANIFEST in first and "model.safetensors" in first
    assert main(_prune_args(model_dir, out)) == 2
    err = _one_line_error(capsys)
    assert "holds a previous hf_prune output (README.md, config.json" in err and "--overwrite" in err
    assert _tree(out) == first  # the first result is still there, byte for byte
    assert main(_prune_args(model_dir, out, "--overwrite", "--sparsity", "0.25")) == 0
    assert "saved to" in capsys.readouterr().out
    assert set(_tree(out)) == set(first) and _tree(out) != first
    assert sorted(os.listdir(tmp_path)) == ["pruned", "tiny-llama"]  # no staged or old copy left beside it
    assert T.LlamaForCausalLM.from_pretrained(out) is not None


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_folder_permissions_follow_the_umask_like_save_pretrained(pruned, tmp_path, mask):
    old = os.umask(mask)
    try:
        pruned.save_pretrained(tmp_path / "ours")
        pruned.model.save_pretrained(tmp_path / "stock")
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(tmp_path / "ours").st_mode)
    assert mode == 0o777 & ~mask == stat.S_IMODE(os.stat(tmp_path / "stock").st_mode)


# ------------------------------------------------------------------------------------------------ read-only parent


@contextlib.contextmanager
def _unwritable(folder, monkeypatch):
    """``folder`` made unwritable for this process, root included: an immutable folder (chattr +i) refuses root
    too; where that cannot be set, ``os.access`` says the folder is not writable."""
    folder = str(folder)
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        try:
            yield
        finally:
            os.chmod(folder, 0o755)
        return
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", folder], capture_output=True).returncode == 0:
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", folder], check=True)
        return
    real = os.access

    def access(path, mode, *args, **kwargs):
        if os.path.realpath(path) == os.path.realpath(folder) and mode & os.W_OK:
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    yield


def test_existing_output_in_a_read_only_parent_is_refused_up_front(model_dir, pruned, tmp_path, monkeypatch,
                                                                   capsys, no_load):
    parent = tmp_path / "shared"
    out = parent / "out"
    out.mkdir(parents=True)  # exists and is empty: writable itself, but the swap needs to write its parent
    snap = _snapshot(pruned.model)
    with _unwritable(parent, monkeypatch):
        assert not os.access(parent, os.W_OK)
        assert main(_prune_args(model_dir, out)) == 2
        err = _one_line_error(capsys)
        assert f"no write permission on {str(parent)!r}" in err
        with pytest.raises(OutputDirError, match="no write permission on"):
            pruned.save_pretrained(out)
    assert os.listdir(parent) == ["out"] and os.listdir(out) == []
    _assert_unchanged(pruned.model, snap)


# ------------------------------------------------------------------------------------------------ dead saves


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_staged_folders_of_a_killed_save_are_removed_by_the_next_one(pruned, tmp_path):
    dead, live = _dead_pid(), os.getpid()
    stale = tmp_path / f".out.partial-{dead}-0badc0de"
    kept = tmp_path / f".out.partial-{live}-feedf00d"
    other = tmp_path / f".other.partial-{dead}-0badc0de"  # another output's: not ours to touch
    for folder in (stale, kept, other):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    pruned.save_pretrained(tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == sorted([kept.name, other.name, "out"])
    old = tmp_path / f".out.old-{dead}-0badc0de"  # a killed swap's previous output: kept while the output is absent
    old.mkdir()
    assert remove_dead_saves(tmp_path / "absent-name") == []
    assert remove_dead_saves(tmp_path / "out") == [str(old)] and not old.exists()


# ------------------------------------------------------------------------------------------------ every saver


def _savers(tokenizer, source):
    """(name, save(folder, overwrite=...)) for every artifact that writes a folder, each of a model loaded from
    the local folder ``source``."""
    def model():
        return T.LlamaForCausalLM.from_pretrained(source)

    def pruner():
        p = Pruner(model(), tokenizer)
        p.prune(MagnitudeConfig(), progress=False)
        return p.save_pretrained

    def path():
        m = model()
        masks = attach_masks(m, SPPConfig(share_across_heads=False))
        solution = masks.solution_path(m)
        masks.remove(m)
        return solution.save_pretrained

    def pool():
        return InputCompensatedModel(model(), InputCompensationConfig(pool_size=4, loss="task")).save_pretrained

    return {"pruner": pruner, "save_model": lambda: lambda folder, **kw: save_model(model(), folder, **kw),
            "solution_path": path, "ic_pool": pool}


@pytest.mark.parametrize("saver", ["pruner", "save_model", "solution_path", "ic_pool"])
def test_every_saver_follows_the_same_rules(saver, model_dir, tmp_path, tokenizer):
    save = _savers(tokenizer, str(model_dir))[saver]()
    users = tmp_path / "users"
    users.mkdir()
    (users / "thesis.txt").write_text("mine")
    with pytest.raises(OutputDirError, match=r"did not write \(thesis.txt\)"):
        save(users, overwrite=True)
    assert os.listdir(users) == ["thesis.txt"]
    source = _tree(model_dir)
    with pytest.raises(OutputDirError, match="source model's folder"):
        save(model_dir, overwrite=True)
    assert _tree(model_dir) == source
    out = tmp_path / "out"
    save(out)
    first = _tree(out)
    with pytest.raises(OutputDirError, match="holds a previous hf_prune output"):
        save(out)
    assert _tree(out) == first
    save(out, overwrite=True)
    assert set(_tree(out)) == set(first)
    assert sorted(os.listdir(tmp_path)) == ["out", "tiny-llama", "users"]


# ------------------------------------------------------------------------------------------------ push


@pytest.fixture()
def saved(pruned, tmp_path):
    return pruned.save_pretrained(tmp_path / "saved")


def test_push_refuses_a_link_out_of_the_folder_and_uploads_nothing(saved, tmp_path, fake_hub, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    os.symlink(secret, os.path.join(saved, "notes.txt"))
    assert main(["push", saved, "me/leak"]) == 2
    err = _one_line_error(capsys)
    assert "notes.txt is a symbolic link to" in err and "outside the folder" in err
    with pytest.raises(PushFolderError, match="notes.txt is a symbolic link"):
        push_folder(saved, "me/leak")
    os.remove(os.path.join(saved, "notes.txt"))
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "key").write_text("TOPSECRET")
    os.symlink(tmp_path / "elsewhere", os.path.join(saved, "extra"))  # a linked folder out of it, too
    with pytest.raises(PushFolderError, match="extra is a symbolic link"):
        push_folder(saved, "me/leak")
    assert fake_hub.repos == {} and fake_hub.requests == []  # refused before the Hub was asked anything


def test_push_uploads_regular_files_and_links_inside_the_folder(saved, fake_hub):
    os.symlink("config.json", os.path.join(saved, "alias.json"))
    push_folder(saved, "me/tiny")
    files = fake_hub.repos["me/tiny"].files
    assert files["alias.json"] == files["config.json"] == open(os.path.join(saved, "config.json"), "rb").read()
    assert OUTPUT_MANIFEST not in files and "model.safetensors" in files
