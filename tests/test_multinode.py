"""Training on several machines: the settings, the adapter key, and two "machines" on this host
(two `accelerate launch` commands over loopback gloo, one process each) training the same weights
as one process with the same global batch."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.train_helpers import REPO, held_out_rows, make_spec, pipes_env, read_pipes_messages, train_env
from trainer.core import keys
from trainer.core.config import ConfigError, experiment_from_dict
from trainer.training.launch import MACHINE_RANK_ENV, training_command
from trainer.training.spec import TrainingSpec, TrainingSummary


def _experiment(**training):
    return experiment_from_dict({"name": "t", "training": training})


TWO_MACHINES = {"num_processes": 2, "num_machines": 2, "main_process_ip": "127.0.0.1"}


@pytest.mark.parametrize("training,error", [
    ({**TWO_MACHINES, "machine_rank": 2}, r"training\.machine_rank: 2 is not in \[0, training\.num_machines = 2\)"),
    ({**TWO_MACHINES, "machine_rank": -1}, r"training\.machine_rank: -1 is not in"),
    ({**TWO_MACHINES, "num_processes": 3}, r"training\.num_processes: 3 is the total over all machines"),
    ({**TWO_MACHINES, "num_processes": 1}, r"training\.num_processes: 1 is the total"),
    ({"num_machines": 0}, r"training\.num_machines: must be at least 1"),
    ({"num_processes": 2, "num_machines": 2}, r"training\.main_process_ip: required when"),
    ({**TWO_MACHINES, "main_process_port": 70000}, r"training\.main_process_port: 70000 is not a TCP port"),
])
def test_nonsense_machine_settings_name_the_key(training, error):
    with pytest.raises(ConfigError, match=error):
        _experiment(**training)


def test_machine_rank_from_the_environment_wins(monkeypatch):
    exp = _experiment(**TWO_MACHINES, machine_rank=0)
    monkeypatch.setenv(MACHINE_RANK_ENV, "1")
    command = training_command(exp, Path("spec.json"))
    assert command[command.index("--machine_rank") + 1] == "1"
    monkeypatch.setenv(MACHINE_RANK_ENV, "2")
    with pytest.raises(ConfigError, match=rf"{MACHINE_RANK_ENV}: 2 is not in \[0, training.num_machines = 2\)"):
        training_command(exp, Path("spec.json"))
    monkeypatch.setenv(MACHINE_RANK_ENV, "one")
    with pytest.raises(ConfigError, match=rf"{MACHINE_RANK_ENV}: 'one' is not an integer"):
        training_command(exp, Path("spec.json"))


def test_placement_does_not_enter_the_adapter_key():
    """The same global batch on other machines is the same adapter; another global batch is not."""
    def params(**training):
        return keys.adapter_params(_experiment(**training), {"builtin": "m"}, "tok")

    one_machine = params(num_processes=4)
    assert params(num_processes=4, num_machines=2, machine_rank=1, main_process_ip="10.0.0.1",
                  main_process_port=1234) == one_machine
    assert params(num_processes=2) != one_machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_listener(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"the machine of rank 0 is not listening on port {port}")


def _start(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    # Its own process group: a failed test stops the launcher's workers too.
    return subprocess.Popen(command, cwd=str(REPO), env=train_env(env), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _wait_all(runs: dict[Path, subprocess.Popen], timeout: float) -> None:
    """Until every run (by its log) has exited 0; the first failure fails the test with its log."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        codes = {log: proc.poll() for log, proc in runs.items()}
        for log, code in codes.items():
            if code:
                raise AssertionError(f"{log} exited {code}:\n{log.read_text()[-4000:]}")
        if all(code == 0 for code in codes.values()):
            return
        time.sleep(0.5)
    raise AssertionError(f"still running after {timeout} s: {[str(log) for log, p in runs.items() if p.poll() is None]}")


@pytest.mark.slow
def test_two_machines_equal_one_process(tmp_path, monkeypatch):
    """Machine ranks 0 and 1 (1 process each, batch 2) == 1 process, batch 4: same weights, and only
    rank 0 reports to Dagster and writes the output."""
    from safetensors.torch import load_file

    # equal sums need fp32: bf16's rounding depends on the batch's shape
    training = {"per_device_eval_batch_size": 2, "learning_rate": 1e-2, "lr_scheduler_type": "linear",
                "num_train_epochs": 1, "precision": "fp32"}
    single_dir, multi_dir = tmp_path / "one", tmp_path / "two"
    single_dir.mkdir()
    multi_dir.mkdir()
    make_spec(single_dir, rows=16, held_out=held_out_rows(4), training={**training, "per_device_train_batch_size": 4})
    two = {**training, "per_device_train_batch_size": 2, **TWO_MACHINES, "main_process_port": _free_port()}
    multi = make_spec(multi_dir, rows=16, held_out=held_out_rows(4), training=two)

    def command(directory: Path) -> list[str]:
        spec_path = directory / "spec.json"
        return training_command(TrainingSpec.load(spec_path).experiment, spec_path)

    # Each machine runs the command training_command gives it there: only SFTDAG_MACHINE_RANK differs.
    runs = {single_dir / "log.txt": _start(command(single_dir), single_dir / "log.txt", {})}
    messages = []
    try:
        for rank in (0, 1):
            monkeypatch.setenv(MACHINE_RANK_ENV, str(rank))
            env, path = pipes_env(multi_dir / f"pipes{rank}")
            messages.append(path)
            log = multi_dir / f"machine{rank}.log"
            runs[log] = _start(command(multi_dir), log, env)
            if rank == 0:
                # One host only: a client retrying a port of this host's ephemeral range can connect
                # to itself and hold the port rank 0 needs, so rank 1 starts once rank 0 listens.
                _wait_for_listener(two["main_process_port"], runs[log])
        _wait_all(runs, timeout=240)
    finally:
        for proc in runs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)

    summary = TrainingSummary.read(multi["output_dir"])
    assert summary.world_size == 2 and summary.global_step == 4  # 16 rows / (2 x 2)
    methods = [m["method"] for m in read_pipes_messages(messages[0])]
    assert methods.count("report_asset_materialization") == 1
    assert not messages[1].exists()  # rank 1 never opened Dagster Pipes

    one = TrainingSummary.read(single_dir / "out")
    w1 = load_file(str(single_dir / "out" / "adapter_model.safetensors"))
    w2 = load_file(str(Path(multi["output_dir"]) / "adapter_model.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-5, rtol=1e-4, msg=k)
    assert any(w1[k].abs().max() > 0 for k in w1 if "lora_B" in k)  # it trained
    assert one.tokens == summary.tokens and abs(one.train_loss - summary.train_loss) < 1e-4
