"""The command line: output paths checked before any generation, typed errors as one line and
a non-zero exit, and atomic writes that respect what is at the path (mode, umask, file type)."""
import contextlib
import os
import stat
import threading
import time

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


# ------------------------------------------------------------------ inputs: regular files only
@contextlib.contextmanager
def fifo_unblocked(path):
    """A writer that opens and closes `path` (a FIFO) whenever a reader waits on it, so a
    command that wrongly reads the FIFO sees an empty file instead of blocking the test."""
    stop = threading.Event()

    def writer():
        while not stop.is_set():
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:    # ENXIO: no reader yet
                pass
            time.sleep(0.05)
    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        stop.set()
        thread.join()


def not_a_file(kind, tmp_path):
    if kind == "fifo":
        return make_fifo(tmp_path / "in.wav")
    if kind == "directory":
        (tmp_path / "in.wav").mkdir()
        return tmp_path / "in.wav"
    return "/dev/zero"


@pytest.mark.parametrize("kind, says", [("fifo", "it is a fifo"), ("directory", "it is a directory"),
                                        ("device", "it is a device")])
def test_edit_refuses_an_input_that_is_not_a_regular_file_before_loading(tmp_path, capsys, monkeypatch, kind, says):
    source = not_a_file(kind, tmp_path)
    monkeypatch.setattr(cli, "_load", lambda *a, **k: pytest.fail("the model was loaded before the input was checked"))
    with fifo_unblocked(source) if kind == "fifo" else contextlib.nullcontext():
        code, _, err = run_cli(capsys, "edit", source, "--region", "0.1:0.2", "-o", tmp_path / "out.wav")
    assert code == 2 and err.count("\n") == 1 and says in err.lower(), err


def test_generate_refuses_a_prompt_that_is_a_fifo_before_loading(tmp_path, capsys, monkeypatch):
    fifo = make_fifo(tmp_path / "prompt.wav")
    monkeypatch.setattr(cli, "_load", lambda *a, **k: pytest.fail("the model was loaded before the prompt was checked"))
    with fifo_unblocked(fifo):
        code, _, err = run_cli(capsys, "generate", "x", "--prompt", fifo, "-o", tmp_path / "out.wav")
    assert code == 2 and "it is a fifo" in err.lower(), err


@pytest.fixture
def speech_inputs(tmp_path, monkeypatch):
    """A speech edit's regular inputs, and a speech model that must never be loaded."""
    import magnet_engine.playdiffusion as pd

    monkeypatch.setattr(pd, "PlayDiffusion", lambda *a, **k: pytest.fail("the model was loaded before the paths "
                                                                          "were checked"))
    audio = tmp_path / "speech.wav"
    sf.write(audio, torch.zeros(16000).numpy(), 16000)
    times = tmp_path / "times.json"
    times.write_text('[{"word": "hi", "start": 0.1, "end": 0.3}]')
    return audio, times


def speech_edit(capsys, audio, times, out):
    return run_cli(capsys, "speech", "edit", audio, "--from", "hi", "--to", "ho", "--word-times", times, "-o", out)


@pytest.mark.parametrize("kind, says", [("fifo", "it is a fifo"), ("directory", "it is a directory"),
                                        ("device", "it is a device")])
def test_speech_word_times_must_be_a_regular_file(speech_inputs, tmp_path, capsys, kind, says):
    audio, _ = speech_inputs
    times = not_a_file(kind, tmp_path)
    with fifo_unblocked(times) if kind == "fifo" else contextlib.nullcontext():
        code, _, err = speech_edit(capsys, audio, times, tmp_path / "out.wav")
    assert code == 2 and err.count("\n") == 1 and says in err.lower() and "--word-times" in err, err


def test_speech_word_times_over_the_size_cap_are_refused(speech_inputs, tmp_path, capsys):
    audio, times = speech_inputs
    times.write_text("[" + " " * (2 << 20) + "]")
    code, _, err = speech_edit(capsys, audio, times, tmp_path / "out.wav")
    assert code == 2 and "the limit is 1048576" in err, err


@pytest.mark.parametrize("kind, says", [("fifo", "it is a fifo"), ("directory", "it is a directory")])
def test_speech_audio_that_is_not_a_regular_file_is_named_for_what_it_is(speech_inputs, tmp_path, capsys, kind, says):
    _, times = speech_inputs
    audio = not_a_file(kind, tmp_path)
    with fifo_unblocked(audio) if kind == "fifo" else contextlib.nullcontext():
        code, _, err = speech_edit(capsys, audio, times, tmp_path / "out.wav")
    assert code == 2 and says in err.lower() and "not found" not in err, err


def test_speech_edit_checks_its_output_before_loading_the_model(speech_inputs, tmp_path, capsys):
    audio, times = speech_inputs
    (tmp_path / "dir").mkdir()
    code, _, err = speech_edit(capsys, audio, times, tmp_path / "dir")
    assert code == 2 and err.count("\n") == 1 and "it is a directory" in err, err
