"""What a careful user and a hostile environment do to a run dir, against the real trainer (1 CPU process,
tiny RMT): damaged checkpoints fall back to the newest verified one, nothing restarts silently, a second
run is refused, a refused start leaves the run's config alone, foreign weights are never exported, and
every failure is one line on stderr (no traceback) with the run contract's exit code."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from pipeline.train.checkpoint import read_latest, tag_for

pytestmark = [pytest.mark.slow]

NO_AUG = {"rand_augment": "", "reprob": 0.0, "mixup": 0.0, "cutmix": 0.0, "repeated_aug": 1}
# 1 process, batch 4: 16 steps an epoch; checkpoints at 4, 8, 12 and the epoch end (16)
RUN = {"data": NO_AUG, "train": {"epochs": 1, "global_batch": 4}, "checkpoint": {"every_steps": 4, "keep": 4}}


def one_line_error(proc, code: int) -> str:
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-3000:]
    return last


def end_step(run) -> int:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if m["kind"] == "end"][-1]["step"]


@pytest.fixture(scope="module")
def finished(trainer):
    """A finished 1-process run with complete checkpoints at steps 4, 8, 12 and 16."""
    config, run = trainer.config("faults_base", **RUN)
    proc = trainer.run(config, nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_latest(run / "checkpoints") == tag_for(16)
    return config, run


def copy_of(finished, tmp_path, name="run"):
    config, run = finished
    dst = tmp_path / name
    shutil.copytree(run, dst)
    (dst / "run.lock").unlink(missing_ok=True)
    return config, dst


DAMAGE = {
    "truncated_ema": lambda d: (d / "ema.pt").write_bytes((d / "ema.pt").read_bytes()[:1000]),
    "bytes_inside_model_states": lambda d: _overwrite(d / "mp_rank_00_model_states.pt"),
    "garbage_rank_state": lambda d: (d / "trainer_rank00000.pt").write_bytes(os.urandom(4096)),
    "garbage_meta": lambda d: (d / "meta.json").write_text("{not json"),
    "meta_deleted": lambda d: (d / "meta.json").unlink(),
}


def _overwrite(path):
    data = bytearray(path.read_bytes())
    mid = len(data) // 3
    data[mid:mid + 4096] = os.urandom(4096)  # same size: only the digest can tell
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_previous_verified_one(trainer, finished, tmp_path,
                                                                          damage):
    config, run = copy_of(finished, tmp_path)
    ckpt = run / "checkpoints"
    DAMAGE[damage](ckpt / tag_for(16))
    proc = trainer.run(config, nproc=1, overrides=[f"output_dir={run}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    out = proc.stdout + proc.stderr
    assert f"checkpoint {ckpt / tag_for(16)} is" in out and "set aside" in out, out[-3000:]
    assert f"resuming from the newest verified checkpoint {tag_for(12)}" in out
    assert f"resumed from {ckpt / tag_for(12)} at step 12" in out
    assert end_step(run) == 16 and read_latest(ckpt) == tag_for(16)
    assert (ckpt / f"{tag_for(16)}.damaged").is_dir()  # kept for inspection, never counted or deleted
    assert (ckpt / tag_for(8)).is_dir()  # the fallback did not prune the older good checkpoints


def test_deleted_newest_checkpoint_resumes_from_the_previous_one(trainer, finished, tmp_path):
    config, run = copy_of(finished, tmp_path)
    shutil.rmtree(run / "checkpoints" / tag_for(16))  # `latest` still names it
    proc = trainer.run(config, nproc=1, overrides=[f"output_dir={run}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "at step 12" in proc.stdout and end_step(run) == 16


def test_no_verified_checkpoint_stops_instead_of_restarting(trainer, finished, tmp_path):
    config, run = copy_of(finished, tmp_path)
    for tag in (4, 8, 12, 16):
        (run / "checkpoints" / tag_for(tag) / "meta.json").unlink()
    proc = trainer.run(config, nproc=1, overrides=[f"output_dir={run}"])
    err = one_line_error(proc, 2)
    assert "none is complete and verified" in err and "checkpoint.start_over" in err


def test_resume_false_refuses_existing_checkpoints_unless_told_what_to_do(trainer, finished, tmp_path):
    config, run = copy_of(finished, tmp_path)
    before = (run / "config.yaml").read_bytes()
    proc = trainer.run(config, nproc=1, overrides=[f"output_dir={run}", "checkpoint.resume=false"])
    assert "checkpoint.start_over=move" in one_line_error(proc, 2)
    assert (run / "config.yaml").read_bytes() == before
    proc = trainer.run(config, nproc=1, overrides=[f"output_dir={run}", "checkpoint.resume=false",
                                                   "checkpoint.start_over=move", "train.max_steps=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (aside,) = (run / "superseded").iterdir()
    assert read_latest(aside / "checkpoints") == tag_for(16)  # the old run is whole, beside the new one
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == [tag_for(2)]
    meta_new = json.loads((run / "checkpoints" / tag_for(2) / "meta.json").read_text())
    meta_old = json.loads((aside / "checkpoints" / tag_for(16) / "meta.json").read_text())
    assert meta_new["run_id"] != meta_old["run_id"]


def test_a_second_run_into_the_same_output_dir_is_refused(trainer, tmp_path):
    config, run = trainer.config("faults_lock", data=NO_AUG, train={"epochs": 50},
                                 checkpoint={"every_steps": 0, "keep": 1})
    first = trainer.start(config, nproc=1)
    try:
        deadline = time.time() + 120
        while not (run / "metrics.jsonl").is_file() and time.time() < deadline:
            time.sleep(0.5)
        assert (run / "metrics.jsonl").is_file(), "the first run did not start training within 120 s"
        second = trainer.run(config, nproc=1)
        err = one_line_error(second, 2)
        assert f"pid {first.pids[0]}" in err and socket.gethostname() in err and "in use" in err
    finally:
        first.kill()
    # the first run is dead now (SIGKILL): the same host sees its pid gone and takes the lock over
    again = trainer.run(config, nproc=1, overrides=["train.max_steps=1"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "took over the run lock" in again.stdout and "its process is gone" in again.stdout


def test_a_refused_start_leaves_the_config_of_the_run(trainer, finished, tmp_path):
    config, run = copy_of(finished, tmp_path)
    before = (run / "config.yaml").read_bytes()
    proc = trainer.run(config, nproc=1, overrides=[f"output_dir={run}", "model.num_classes=5"])
    assert "model.num_classes" in one_line_error(proc, 2)
    assert (run / "config.yaml").read_bytes() == before
    # each checkpoint carries its own config, so eval/export never read weights with the wrong one
    assert (run / "checkpoints" / tag_for(16) / "config.yaml").is_file()
    history = sorted(p.name for p in (run / "config_history").iterdir())
    assert history == ["000-fresh.yaml"]


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_foreign_and_broken_weights_are_never_exported(finished, tmp_path):
    config, run = finished
    foreign = tmp_path / "resnet_like.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(4, 8)}, foreign)
    random_st = tmp_path / "random.safetensors"
    random_st.write_bytes(os.urandom(2048))
    random_pth = tmp_path / "random.pth"
    random_pth.write_bytes(os.urandom(2048))
    for weights, expect in ((foreign, "do not fit"), (random_st, "not a valid safetensors"),
                            (random_pth, "not a PyTorch weights file")):
        out = tmp_path / f"{weights.stem}.out.safetensors"
        proc = _cli("export", str(weights), "--config", str(config), "--out", str(out))
        assert expect in one_line_error(proc, 2)
        assert not out.exists()
        proc = _cli("eval", "--checkpoint", str(weights), "--config", str(config))
        assert expect in one_line_error(proc, 2)


def test_verify_checkpoint_names_the_damaged_file(finished, tmp_path):
    _, run = copy_of(finished, tmp_path)
    proc = _cli("verify-checkpoint", str(run))
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(x)["ok"] for x in proc.stdout.splitlines()] == [True] * 4
    _overwrite(run / "checkpoints" / tag_for(16) / "ema.pt")
    proc = _cli("verify-checkpoint", str(run))
    assert proc.returncode == 1
    last = json.loads(proc.stdout.splitlines()[-1])
    assert last["problems"] == ["ema.pt is damaged (sha256 differs from the one written)"]


@pytest.mark.parametrize("override,key", [("optim.lr=-1", "optim.lr"), ("optim.weight_decay=-0.1",
                                                                           "optim.weight_decay")])
def test_bad_values_are_named_before_anything_is_written(trainer, tmp_path, override, key):
    config, run = trainer.config("faults_values", **RUN)
    proc = trainer.run(config, nproc=1, overrides=[override, f"output_dir={tmp_path / 'new'}"])
    assert f"'{key}'" in one_line_error(proc, 2)
    assert not (tmp_path / "new").exists()


def test_a_yaml_that_is_not_a_mapping_and_an_output_dir_that_is_a_file(trainer, tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    proc = subprocess.run(trainer.command(bad, ["train.epochs=2"]), capture_output=True, text=True,
                          timeout=120)
    assert "not a mapping" in one_line_error(proc, 2)
    config, _ = trainer.config("faults_file", **RUN)
    target = tmp_path / "a_file"
    target.write_text("x")
    proc = trainer.run(config, nproc=1, overrides=[f"output_dir={target}"])
    assert "is a file" in one_line_error(proc, 2)


def test_two_single_process_runs_on_one_machine_do_not_clash_on_a_port(trainer, monkeypatch):
    """29500 (torch's default port) held, as by a first run: a single process picks a free port itself."""
    busy = socket.socket()
    try:
        busy.bind(("127.0.0.1", 29500))
        busy.listen()
    except OSError:
        pass  # already held by something else on this machine: the same situation
    try:
        monkeypatch.delenv("MASTER_PORT", raising=False)
        config, run = trainer.config("faults_port", **RUN)
        proc = trainer.run(config, nproc=1, overrides=["train.max_steps=1"])
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        busy.close()


def test_disk_full_mid_save_is_one_line_and_keeps_the_last_checkpoint(trainer, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    config, probe = trainer.config("faults_disk_probe", **RUN)
    proc = trainer.run(config, nproc=1, overrides=["train.max_steps=4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    size = sum(p.stat().st_size for p in (probe / "checkpoints" / tag_for(4)).rglob("*") if p.is_file())
    mount = tmp_path / "small_disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.5) + 65536}", "tmpfs", str(mount)],
                   check=True)
    try:
        run = mount / "run"
        proc = trainer.run(config, nproc=1, overrides=[f"output_dir={run}"])
        err = one_line_error(proc, 2)
        assert "no space left" in err and str(run / "checkpoints") in err
        assert read_latest(run / "checkpoints") == tag_for(4)
        check = _cli("verify-checkpoint", str(run / "checkpoints" / tag_for(4)))
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_ctrl_c_saves_like_sigterm_and_twice_stops_at_once(trainer, tmp_path):
    config, run = trainer.config("faults_sigint", data=NO_AUG, train={"epochs": 20},
                                 checkpoint={"every_steps": 0, "keep": 2})
    ranks = trainer.start(config, nproc=1)
    proc = ranks.procs[0]
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").is_file() and time.time() < deadline:
        time.sleep(0.5)
    assert (run / "metrics.jsonl").is_file(), "the run did not start training within 120 s"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    tag = read_latest(run / "checkpoints")
    assert tag is not None
    first = len((run / "metrics.jsonl").read_text().splitlines())
    again = trainer.start(config, nproc=1)
    proc = again.procs[0]
    # the resumed run has trained a step, so its handler is in: a SIGINT before that is the parent's
    # business (a background job inherits SIGINT ignored, and CI's did: the run then trained to its end)
    deadline = time.time() + 120
    while len((run / "metrics.jsonl").read_text().splitlines()) <= first:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    # 130: the second Ctrl-C came during the save and ended the process at once; 75: the save had
    # finished and the process had exited before the second one; -SIGINT: it came while the
    # interpreter was shutting down after the save, when Python has restored the default handler
    assert proc.returncode in (75, 130, -signal.SIGINT), err[-3000:]
    if proc.returncode == 130:
        assert "stopping now without saving" in err
    assert "Traceback" not in err
    assert read_latest(run / "checkpoints") is not None  # `latest` names a complete checkpoint either way
    # the checkpoint `latest` names (a save cut short by the second Ctrl-C leaves a newer unfinished dir)
    check = _cli("verify-checkpoint", str(run / "checkpoints" / read_latest(run / "checkpoints")))
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_stop_requested_before_the_trainer_took_signals_is_not_lost(trainer, tmp_path, monkeypatch):
    """A USR1 that reached the SLURM batch shell while the trainer was still importing (its USR1 ignored)
    is left in the file $RMT_STOP_REQUEST names (launch/common.sh): both ranks read it once their
    handlers are in, train one step, save and exit 75. Without the file the same run trains on."""
    request = tmp_path / "stop-requested"
    request.touch()
    monkeypatch.setenv("RMT_STOP_REQUEST", str(request))
    config, run = trainer.config("faults_stop_request", **RUN)
    stopped = trainer.run(config)
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    assert "a stop was requested before the trainer could take signals" in stopped.stdout
    assert end_step(run) == 1 and read_latest(run / "checkpoints") == tag_for(1)
    request.unlink()  # the launcher's next start begins without one
    resumed = trainer.run(config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stop was requested" not in resumed.stdout, resumed.stdout[-2000:]
    assert end_step(run) == 16


def test_a_late_usr1_after_the_run_cannot_kill_the_process():
    """Python resets the handlers it set to the default action at exit, and USR1's default kills: once
    the run is over (StopFlag.release), a time-limit warning arriving during shutdown is ignored."""
    from pipeline.train.loop import StopFlag

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    try:
        StopFlag().install()
        StopFlag.release()
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGUSR1)  # ignored: this test goes on
    finally:  # pytest's own, whatever it inherited (a background job's ignored SIGINT included)
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_two_ranks_set_an_unfinished_newest_checkpoint_aside_and_resume(trainer, tmp_path):
    """A SIGKILL in the middle of a save leaves a step dir without meta.json. On the resume rank 0 sets it
    aside; every rank must walk the same list of checkpoints, or rank 1, listing after the rename, checks
    another one and the collectives never pair (a hang a CI run hit)."""
    config, run = trainer.config("faults_two_ranks", **RUN)
    assert trainer.run(config).returncode == 0
    ckpt = run / "checkpoints"
    (ckpt / tag_for(16) / "meta.json").unlink()  # what a kill before the save's last write leaves
    proc = trainer.run(config)  # a hang fails here, after 300 s
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"checkpoint {ckpt / tag_for(16)} is incomplete" in proc.stdout, proc.stdout[-3000:]
    assert f"resumed from {ckpt / tag_for(12)} at step 12" in proc.stdout
    assert end_step(run) == 16 and read_latest(ckpt) == tag_for(16)
