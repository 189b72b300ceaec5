"""The entry point of a process the orchestrator starts (`python -m … SPEC.json`): one spec file
in, its log through Dagster Pipes when launched through it (closed with the exception, if any).

Every such process dies with the process that started it (`die_with_parent`): a SIGKILLed
`sftdag` (or the OOM killer) must not leave a training run holding the GPU. A launcher that is
not ours (`accelerate launch`) gets it by being started through `python -m trainer.core.entry_point
COMMAND…`, which sets it and execs COMMAND (the setting survives exec); its ranks, started by it,
set it themselves through their entry point, so they die with it, and it dies with us.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable

# The pid of the sftdag process that launched this run (set by the CLI): a process whose parent
# died before it could ask for the death signal finds that pid gone and exits.
PARENT_PID_ENV = "SFTDAG_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def die_with_parent(parent_pid: int | None = None, sig: int = signal.SIGTERM) -> bool:
    """Linux: have the kernel send `sig` to this process when its parent ends (prctl
    PR_SET_PDEATHSIG), and exit at once if the parent already ended: `parent_pid` (default:
    $SFTDAG_PARENT_PID, the sftdag process that launched the run) is not our parent and is gone.
    (Being a child of pid 1 proves nothing: a container's shell is pid 1.) Returns whether the
    signal is set (False elsewhere). Note: the kernel sends it when the parent *thread* that
    started us ends; our launchers start processes from their main thread."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if parent_pid is None:
        value = os.environ.get(PARENT_PID_ENV, "")
        parent_pid = int(value) if value.isdigit() else None
    parent = os.getppid()
    if parent_pid is not None and parent != parent_pid and not _alive(parent_pid):
        os._exit(128 + int(sig))  # as if the signal had come: nothing of ours ran yet
    return True


def run_entry_point(argv: list[str] | None, module: str, run: Callable[[Path], str]) -> int:
    """`run(spec_path)` does the work and returns the line to report; 2 on a usage error."""
    die_with_parent()
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(f"usage: python -m {module} SPEC.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    pipes = nullcontext()
    if os.environ.get("DAGSTER_PIPES_CONTEXT"):
        from dagster_pipes import open_dagster_pipes

        pipes = open_dagster_pipes()
    with pipes as reporter, failure_recorded(Path(argv[0])):
        message = run(Path(argv[0]))
        if reporter is not None:
            reporter.log.info(message)
    return 0


def failure_file(spec_path: Path) -> Path:
    """Where a process leaves the one line that says why it failed (beside its spec)."""
    return spec_path.with_name(spec_path.name + ".failed")


@contextmanager
def failure_recorded(spec_path: Path):
    """Around a process's work: the reason it failed, one line, in `failure_file(spec_path)`, so the
    launcher can make it the user's last line (Pipes only says "failed with code 1")."""
    failure_file(spec_path).unlink(missing_ok=True)
    try:
        yield
    except Exception as e:
        # this project's own errors carry a user's message; anything else is named by its class
        text = " ".join(str(e).split())
        line = text if isinstance(e, (ValueError, OSError)) and text else f"{type(e).__name__}: {text}"
        try:
            failure_file(spec_path).write_text(line + "\n")
        except OSError:
            pass
        raise


_stopping_installed = False


def stop_on_signals(grace: float = 7.0) -> None:
    """Main thread, at start: SIGTERM (and SIGINT, unless it was ignored: a script's background job)
    raises KeyboardInterrupt in the main thread; if the process is still there `grace` seconds
    later (a child that ignores its SIGINT: Dagster Pipes waits 20 s for it), its children get
    SIGTERM, then SIGKILL, and it exits. Dagster maps SIGTERM to its SIGINT handler during a run and
    back to this one after; the signal wakeup fd sees the signal whichever handler runs."""
    global _stopping_installed
    if _stopping_installed or threading.current_thread() is not threading.main_thread():
        return
    _stopping_installed = True
    sigint_ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN

    def on_signal(signo, frame):
        if signo == signal.SIGINT and sigint_ignored:
            return
        raise KeyboardInterrupt(signal.Signals(signo).name)

    # Not left ignored: Dagster's restore would then leave SIGTERM ignored after a run.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    stops = {signal.SIGTERM} | (set() if sigint_ignored else {signal.SIGINT})

    def watch() -> None:
        while not stops & set(os.read(read_end, 64)):
            pass
        time.sleep(grace)
        end_children()
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="sftdag-stop", daemon=True).start()


def end_children(wait: float = 1.5) -> None:
    """SIGTERM to every descendant of this process, then SIGKILL to those still there after `wait` s."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - a dependency; without it children rely on their death signal
        return
    children = psutil.Process().children(recursive=True)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for child in children:
            try:
                child.send_signal(sig)
            except psutil.Error:
                pass
        _, children = psutil.wait_procs(children, timeout=wait)
        if not children:
            return


def dying_with_parent(command: list[str]) -> list[str]:
    """`command`, started so that it dies with the process that starts it (for launchers that are
    not ours: `accelerate launch`)."""
    return [sys.executable, "-m", "trainer.core.entry_point", *command]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m trainer.core.entry_point COMMAND [ARG…]  (COMMAND, dying with this "
              "process's parent)", file=sys.stderr)
        return 2
    die_with_parent()
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
