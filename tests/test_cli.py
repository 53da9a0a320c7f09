"""The command line: output paths checked before any generation, typed errors as one line and
a non-zero exit, and atomic writes that respect what is at the path (mode, umask, file type)."""
import os
import stat

import pytest
import soundfile as sf
import torch

from magnet_engine import cli
from magnet_engine.audio import write_wav
from magnet_engine.demo import build_random_model
from magnet_engine.engine import checkpoint as ckpt
from magnet_engine.errors import InvalidInputError

FAST = ["--duration", "0.3", "--decoding-steps", "2", "1", "1", "1", "-q", "--device", "cpu"]
WAV = torch.zeros(1, 640)


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_writes_a_wav(tiny_dir, tmp_path, capsys):
    out = tmp_path / "new" / "out.wav"
    code, stdout, _ = run_cli(capsys, "generate", "warm piano", "--model", tiny_dir, "-o", out, *FAST)
    assert code == 0 and f"wrote {out}" in stdout
    assert sf.info(str(out)).frames == int(0.3 * 50) * 640


def make_fifo(path):
    os.mkfifo(path)
    return path


def make_symlink(path):
    target = path.parent / "target.wav"
    target.write_bytes(b"keep me")
    path.symlink_to(target)
    return path


def make_file_as_parent(path):
    (path.parent / "a_file").write_text("x")
    return path.parent / "a_file" / "out.wav"


@pytest.mark.parametrize("make, says", [
    (lambda p: (p.mkdir(), p)[1], "it is a directory"),
    (make_fifo, "it is a fifo"),
    (make_symlink, "it is a symbolic link"),
    (make_file_as_parent, "not a directory"),
])
def test_a_bad_output_path_fails_before_the_model_is_loaded(tiny_dir, tmp_path, capsys, monkeypatch, make, says):
    target = make(tmp_path / "out.wav")
    monkeypatch.setattr(cli, "_load", lambda *a, **k: pytest.fail("the model was loaded before the path was checked"))
    code, _, err = run_cli(capsys, "generate", "warm piano", "--model", tiny_dir, "-o", target, *FAST)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("magnet-engine: error: InvalidInputError: cannot write") and says in err.lower()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only directory")
def test_a_read_only_directory_fails_before_generating(tiny_dir, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    monkeypatch.setattr(cli, "_load", lambda *a, **k: pytest.fail("the model was loaded before the path was checked"))
    code, _, err = run_cli(capsys, "generate", "x", "--model", tiny_dir, "-o", locked / "sub" / "out.wav", *FAST)
    assert code == 2 and "is not writable" in err


def test_a_missing_model_is_one_line_and_exit_2(tmp_path, capsys):
    code, _, err = run_cli(capsys, "generate", "x", "--model", tmp_path / "nowhere", "-o", tmp_path / "o.wav")
    assert code == 2 and err.count("\n") == 1 and "ModelNotFoundError" in err
    assert not (tmp_path / "o.wav").exists()


def test_nan_audio_fails_and_writes_nothing(tiny_dir, tmp_path, capsys):
    broken = build_random_model(tmp_path / "nan", "tiny")
    codec = torch.load(broken / ckpt.CODEC_FILE, weights_only=True)
    name = next(k for k in codec["best_state"] if k.startswith("decoder.") and k.endswith("bias"))
    codec["best_state"][name] = torch.full_like(codec["best_state"][name], float("nan"))
    ckpt.atomic_save(codec, broken / ckpt.CODEC_FILE)
    out = tmp_path / "nan.wav"
    code, _, err = run_cli(capsys, "generate", "warm piano", "--model", broken, "-o", out, *FAST)
    assert code == 2 and "NumericalError" in err and err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.glob(".nan*"))


# ---------------------------------------------------------------- atomic writes
@pytest.mark.parametrize("write", [
    lambda path: write_wav(path, WAV, 32000),
    lambda path: ckpt.atomic_save({"x": torch.zeros(2)}, path),
], ids=["wav", "checkpoint"])
class TestAtomicWrites:
    def test_an_existing_file_keeps_its_mode(self, tmp_path, write):
        path = tmp_path / "f"
        path.write_bytes(b"old")
        path.chmod(0o644)
        write(path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o644 and path.read_bytes() != b"old"

    def test_a_new_file_honours_the_umask(self, tmp_path, write):
        old = os.umask(0o027)
        try:
            write(tmp_path / "new")
        finally:
            os.umask(old)
        assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o640

    def test_a_fifo_symlink_or_directory_is_never_replaced(self, tmp_path, write):
        fifo, link, folder = make_fifo(tmp_path / "fifo"), make_symlink(tmp_path / "link"), tmp_path / "dir"
        folder.mkdir()
        for path in (fifo, link, folder):
            with pytest.raises(InvalidInputError, match="cannot write"):
                write(path)
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and os.path.islink(link) and folder.is_dir()
        assert (tmp_path / "target.wav").read_bytes() == b"keep me"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "fifo", "link", "target.wav"]
