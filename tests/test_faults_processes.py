"""Every process a run starts dies with it: shard workers and the multiprocessing resource tracker
of a SIGKILLed parent, a process started through the entry point whose parent is SIGKILLed; SIGTERM
stops any `sftdag` command (`ui` started in the background included) with its children; two
samplers of one output never write it together."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.time() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            out = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"{what}: the process exited ({proc.returncode}): {out[-3000:]}")
        assert time.time() < deadline, what
        time.sleep(0.1)


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


# A killed parent's children get their death signal at once; they would otherwise sleep 300 s. The
# grace is for a loaded machine (a run beside other work once saw children outlive a 5 s wait).
KILLED_PARENT_GRACE = 30


def assert_all_end(procs: list[psutil.Process], timeout: float) -> None:
    try:
        wait_for(lambda: not alive(procs), timeout, "processes left running")
    except AssertionError:
        left = [(p.pid, p.cmdline()) for p in alive(procs)]
        for p in alive(procs):
            p.kill()
        raise AssertionError(f"still running {timeout}s on: {left}") from None


# Shards that take long to build, in 2 spawned workers; each worker leaves a marker once busy.
SHARD_SCRIPT = """
import functools, os, sys, time
from pathlib import Path
from trainer.core.store import Store
from trainer.data.parallel import ShardBuilder

def slow(markers, out_dir):
    Path(markers, str(os.getpid())).touch()
    time.sleep(300)
    return {}

if __name__ == "__main__":
    tasks = [(f"k{i}", functools.partial(slow, sys.argv[2])) for i in range(4)]
    ShardBuilder(Store(sys.argv[1]), num_proc=2, progress=False).build("raw", tasks, "slow shards")
"""


def test_shard_workers_and_the_resource_tracker_die_with_a_killed_parent(tmp_path):
    script, markers = tmp_path / "shards.py", tmp_path / "markers"
    script.write_text(SHARD_SCRIPT)
    markers.mkdir()
    parent = subprocess.Popen([sys.executable, str(script), str(tmp_path / "store"), str(markers)], env=ENV,
                              stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(list(markers.iterdir())) == 2, 120, "the workers did not start", parent)
        children = psutil.Process(parent.pid).children(recursive=True)
        assert {int(m.name) for m in markers.iterdir()} <= {c.pid for c in children}
        assert any("resource_tracker" in " ".join(c.cmdline()) for c in children), [c.cmdline() for c in children]
        parent.kill()
        parent.wait()
        assert_all_end(children, KILLED_PARENT_GRACE)
    finally:
        parent.kill()
        parent.wait()
        parent.stderr.close()


# argv: how to start the child ("entry" or "exec"), the file to write the child's pid to. The child
# touches `ready` once it runs its work: its death signal is set by then (a busy machine can take
# seconds to get there).
LAUNCHER = """
import subprocess, sys, time
child = {
    "entry": [sys.executable, "-c", "import time; from trainer.core.entry_point import run_entry_point; "
              "run_entry_point(['spec.json'], 'test', lambda spec: (open('ready', 'w').close(), time.sleep(300)))"],
    # a launcher that is not ours, started through the entry point's exec
    "exec": [sys.executable, "-m", "trainer.core.entry_point", sys.executable, "-c",
             "import time; open('ready', 'w').close(); time.sleep(300)"],
}[sys.argv[1]]
proc = subprocess.Popen(child)
open(sys.argv[2], "w").write(str(proc.pid))
time.sleep(300)
"""


@pytest.mark.parametrize("how", ["entry", "exec"])
def test_a_process_started_through_the_entry_point_dies_with_its_killed_parent(tmp_path, how):
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", LAUNCHER, how, str(pid_file)], env=ENV, cwd=tmp_path)
    try:
        wait_for(lambda: pid_file.exists() and pid_file.read_text(), 30, "the child did not start")
        child = psutil.Process(int(pid_file.read_text()))
        wait_for(lambda: (tmp_path / "ready").exists(), 120, "the child did not get to its work", parent)
        assert alive([child])
        parent.kill()
        parent.wait()
        assert_all_end([child], KILLED_PARENT_GRACE)
    finally:
        parent.kill()
        parent.wait()


def test_a_process_whose_launcher_died_before_it_started_exits_at_once(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    code = "from trainer.core.entry_point import run_entry_point; run_entry_point(['s'], 't', lambda s: 'ran')"
    done = subprocess.run([sys.executable, "-c", code], env={**ENV, "SFTDAG_PARENT_PID": str(gone.pid)}, timeout=60)
    assert done.returncode == 128 + signal.SIGTERM
    done = subprocess.run([sys.executable, "-c", code], env={**ENV, "SFTDAG_PARENT_PID": str(os.getpid())}, timeout=60)
    assert done.returncode == 0


def start_in_background(args: list[str], cwd: Path, env: dict, log: Path) -> psutil.Process:
    """`sftdag ARGS &` in a script: a background job of a non-interactive shell, SIGINT ignored."""
    return start_command_in_background([sys.executable, "-m", "pipelines.cli", *args], cwd, env, log)


def start_command_in_background(argv: list[str], cwd: Path, env: dict, log: Path) -> psutil.Process:
    command = " ".join("'" + a.replace("'", "'\\''") + "'" for a in argv)
    shell = subprocess.run(["bash", "-c", f"{command} >'{log}' 2>&1 & echo $!"], cwd=cwd, env=env,
                           capture_output=True, text=True, timeout=30, check=True)
    return psutil.Process(int(shell.stdout))


def test_sftdag_ui_started_in_the_background_stops_with_its_children_on_sigterm(tmp_path):
    import socket

    from .test_cli import write_experiment
    from .ui_server import free_port

    experiment, port, log = write_experiment(tmp_path), free_port(), tmp_path / "ui.log"
    env = {**ENV, "DAGSTER_HOME": str(tmp_path / "dagster_home")}
    sftdag = start_in_background(["ui", "--port", str(port), str(experiment)], tmp_path, env, log)
    try:
        def answers() -> bool:
            assert alive([sftdag]), log.read_text()[-3000:]
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_for(answers, 180, "the UI did not answer")
        time.sleep(3)  # the daemon and code server started too
        family = [sftdag, *sftdag.children(recursive=True)]
        assert len(family) >= 3, [p.cmdline() for p in family]
        sftdag.send_signal(signal.SIGTERM)
        assert_all_end(family, 10)
    finally:
        for p in alive([sftdag, *sftdag.children(recursive=True)] if alive([sftdag]) else []):
            p.kill()


@pytest.mark.parametrize("background", [False, True])
def test_sigterm_stops_sftdag_prepare_waiting_on_a_lock(tmp_path, instance, background):
    import dagster as dg
    from filelock import FileLock

    from trainer.core.config import load_experiment
    from trainer.data.prepare import DataPipeline

    from .test_cli import write_experiment

    experiment = write_experiment(tmp_path)
    raw_key = DataPipeline(load_experiment(experiment), progress=False).raw_key("train")
    lock = tmp_path / "store" / "raw" / f".{raw_key}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    args, log = ["prepare", str(experiment)], tmp_path / "prepare.log"
    with FileLock(str(lock)):  # a concurrent build of the raw stage: the run waits in progress
        if background:
            sftdag, popen = start_in_background(args, tmp_path, dict(os.environ), log), None
        else:
            popen = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=tmp_path,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            sftdag = psutil.Process(popen.pid)
        try:
            started = dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])
            wait_for(lambda: instance.get_run_records(filters=started) or not alive([sftdag]), 120,
                     "the run did not start")
            assert alive([sftdag]), log.read_text() if background else popen.stderr.read()
            time.sleep(1)
            family = [sftdag, *sftdag.children(recursive=True)]
            sftdag.send_signal(signal.SIGTERM)
            assert_all_end(family, 10)
            if popen is not None:
                assert popen.wait() != 0
                assert "sftdag: " in popen.stderr.read().strip().splitlines()[-1]
        finally:
            for p in alive([sftdag]):
                p.kill()
            if popen is not None:
                popen.wait()
                popen.stderr.close()


# `sftdag prepare` whose work is replaced (argv: marker file, case): "after": a Dagster run ends,
# then slow work (Dagster leaves SIGTERM as SIGINT was: ignored); "child": a run's Pipes child
# ignores the SIGINT Dagster forwards, and Dagster waits 20 s for it.
DRIVER = """
import sys, time
from pathlib import Path
import dagster as dg
import pipelines.cli as cli

marker = Path(sys.argv[1])

def after_a_run(args):
    @dg.asset
    def quick():
        return 1
    dg.materialize([quick], instance=dg.DagsterInstance.ephemeral())
    marker.touch()
    time.sleep(120)
    return {}

def slow_child(args):
    @dg.asset
    def slow(context, pipes: dg.PipesSubprocessClient):
        marker.touch()
        child = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(120)"
        return pipes.run(command=[sys.executable, "-c", child], context=context).get_materialize_result()
    dg.materialize([slow], instance=dg.DagsterInstance.ephemeral(), resources={"pipes": dg.PipesSubprocessClient()})
    return {}

cli.cmd_prepare = {"after": after_a_run, "child": slow_child}[sys.argv[2]]
cli.main(["prepare", "unused.yaml"])
"""


@pytest.mark.parametrize("case", ["after", "child"])
def test_sigterm_stops_a_background_sftdag_command_and_its_children_within_10s(tmp_path, case):
    marker, log = tmp_path / "marker", tmp_path / "driver.log"
    sftdag = start_command_in_background([sys.executable, "-c", DRIVER, str(marker), case], tmp_path, ENV, log)
    try:
        wait_for(lambda: marker.exists() or not alive([sftdag]), 120, "the driver did not get there")
        assert alive([sftdag]), log.read_text()[-3000:]
        time.sleep(2)
        family = [sftdag, *sftdag.children(recursive=True)]
        assert len(family) == (2 if case == "child" else 1), [p.cmdline() for p in family]
        sftdag.send_signal(signal.SIGTERM)
        assert_all_end(family, 10)
    finally:
        for p in alive([sftdag]):
            p.kill()


# argv: output dir, tokenizer dir, seconds to sleep per shard. Prints the manifest's sample count.
SAMPLER = """
import json, sys, time
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from tests.train_helpers import make_tokenizer
import trainer.training.generate as generate

delay = float(sys.argv[3])
sample = generate.sample
def slow_sample(*args, **kwargs):
    time.sleep(delay)
    return sample(*args, **kwargs)
generate.sample = slow_sample

tok = AutoTokenizer.from_pretrained(sys.argv[2])
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)).eval()
prompts = [{"prompt_id": f"p{i}", "prompt": t} for i, t in enumerate(["<s> alpha", "<s> one two", "<s> x", "<s> gamma"])]
settings = generate.SamplingSettings(samples_per_prompt=2, temperature=0.9, max_new_tokens=5, seed=3, batch_size=2)
manifest = generate.generate_to_shards(sys.argv[1], model, tok, prompts, settings, ["<|im_end|>"], round_index=1,
                                       generator_version="g", prompts_per_shard=1)
print(json.dumps(manifest))
"""


def start_sampler(out: Path, tok: Path, delay: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SAMPLER, str(out), str(tok), str(delay)], env=ENV, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(proc: subprocess.Popen) -> tuple[dict, str]:
    import json

    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1]), err


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    """(tokenizer dir, (manifest, samples) of one sampler alone)."""
    from tests.train_helpers import make_tokenizer
    from trainer.training.generate import read_samples

    root = tmp_path_factory.mktemp("sampling")
    tok = make_tokenizer(root / "tok")
    manifest, _ = finished(start_sampler(root / "alone", tok, 0))
    return tok, (manifest, read_samples(root / "alone"))


def test_a_second_sampler_of_one_output_waits_for_the_first_and_gets_the_same(tmp_path, sampled):
    from trainer.training.generate import read_samples

    tok, (alone, samples) = sampled
    out = tmp_path / "samples" / "key"
    first = start_sampler(out, tok, 1.5)
    wait_for(lambda: (out / "plan.json").exists(), 120, "the first sampler did not start", first)
    second = start_sampler(out, tok, 0)
    (first_manifest, _), (second_manifest, second_log) = finished(first), finished(second)
    assert "another sampler is writing it; waiting for it" in second_log
    assert first_manifest == second_manifest == alone
    assert read_samples(out).equals(samples)
    assert not list(out.glob(".*.partial")) and not list(out.glob("*.lock"))


def test_the_lock_of_a_killed_sampler_is_free_and_its_work_resumed(tmp_path, sampled):
    from trainer.training.generate import read_samples

    tok, (alone, samples) = sampled
    out = tmp_path / "samples" / "key"
    first = start_sampler(out, tok, 1.5)
    try:
        wait_for(lambda: (out / "samples-00000.arrow").exists(), 120, "the first sampler wrote nothing", first)
    finally:
        first.kill()
        first.communicate()
    assert not (out / "manifest.json").exists()
    second = start_sampler(out, tok, 0)
    manifest, log = finished(second)
    assert "waiting" not in log and manifest == alone
    assert read_samples(out).equals(samples)
