"""The serve child's process lifecycle: signals (drain, abort a startup, force an exit), the parent's death, and
exits that take the embedded Ray with them. Used by cluster.serve_cmd; imports nothing from cluster."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import NoReturn

PARENT_PID_ENV = "EXPERTMESH_SERVE_PARENT_PID"
PARENT_GONE_GRACE_S = 20.0  # once the parent is gone, the normal drain and stop get this long, then a hard exit
FORCE_EXIT_RAY_S = 3.0  # the hard exit after PARENT_GONE_GRACE_S first tries ray.shutdown() for this long
EXIT_GRACE_S = 10.0  # the child's interpreter exit (atexit hooks, leftover threads), once serve() returned
WATCHDOG_INTERVAL_S = 0.5
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# The signal the kernel sends the child when its parent dies. Not SIGTERM: it comes once per exiting thread of
# the parent (each reparents the child to the next), and a second SIGTERM means "exit now".
PARENT_DEATH_SIGNAL = signal.SIGHUP


def say(line: str) -> None:
    """A line on stderr that takes no lock and never raises: for signal handlers, and for a child whose
    terminal or pipe is gone."""
    try:
        os.write(2, (line + "\n").encode())
    except OSError:
        pass


def kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid` but us. The serve child leads its own session, and every process
    of its embedded Ray stays in it: GCS, raylet, its agents (which outlive a SIGKILLed raylet) and the workers
    (which have their own process group). Without /proc, the session leader's process group only."""
    me = os.getpid()
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        pids = []
    if not pids:
        if sid != me:
            try:
                os.killpg(sid, signal.SIGKILL)
            except OSError:
                pass
        return
    for pid in pids:
        try:
            if pid != me and os.getsid(pid) == sid:
                os.kill(pid, signal.SIGKILL)
        except OSError:  # gone meanwhile, or not ours to ask about
            pass


def _set_parent_death_signal(sig: int) -> None:
    """Linux: the kernel sends us `sig` when our parent dies. Elsewhere the watchdog thread alone notices."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            say(f"expertmesh serve: prctl(PR_SET_PDEATHSIG) failed: {os.strerror(ctypes.get_errno())}")
    except (OSError, AttributeError) as e:
        say(f"expertmesh serve: prctl(PR_SET_PDEATHSIG) unavailable: {e}")


def _shutdown_ray_quietly() -> None:
    try:
        import ray

        ray.shutdown()
    except BaseException:  # noqa: BLE001 - best effort on the way out
        pass


def force_exit(code: int, ray_shutdown_s: float = 0.0) -> NoReturn:
    """Exit now: ray.shutdown() for at most ray_shutdown_s (not from a signal handler: starting a thread there
    could deadlock), then SIGKILL what is left of our session (the embedded Ray) if we lead it, then os._exit.
    (Joined to a cluster with --address, the GCS sees this driver gone and removes its actors.)"""
    if ray_shutdown_s > 0:
        t = threading.Thread(target=_shutdown_ray_quietly, name="force-exit-ray-shutdown", daemon=True)
        t.start()
        t.join(ray_shutdown_s)
    try:
        if os.getsid(0) == os.getpid():
            kill_session(os.getpid())
    except OSError:
        pass
    os._exit(code)


def exit_after(seconds: float, code: int) -> None:
    time.sleep(seconds)
    say(f"expertmesh serve: still exiting after {seconds:.0f} s, exiting now")
    force_exit(code)


class StartupAborted(KeyboardInterrupt):
    """A stop came in while starting up (a KeyboardInterrupt, so that ray.get passes it on)."""


class ServeLifecycle:
    """When the serve child stops. SIGINT/SIGTERM: the first drains, or aborts a startup at once (StartupAborted
    in the main thread; the startup also checks between its phases); a second one exits now. The parent's death
    (PARENT_DEATH_SIGNAL via PR_SET_PDEATHSIG, and a getppid() watchdog): a normal stop, and a hard exit if that
    takes over PARENT_GONE_GRACE_S.

    Signal handlers only set plain flags (`stopping`): an Event.set() there can deadlock on the Event's lock."""

    def __init__(self, parent_pid: int | None = None):
        self.parent_pid = parent_pid
        self.stopping = False
        self.parent_gone = False
        self.signals = 0
        self.starting = True

    def start(self) -> None:
        self.install_handlers()
        if self.parent_pid is not None:
            signal.signal(PARENT_DEATH_SIGNAL, self._on_parent_death)
            _set_parent_death_signal(PARENT_DEATH_SIGNAL)
            threading.Thread(target=self._watch_parent, name="parent-watchdog", daemon=True).start()

    def install_handlers(self) -> None:
        """(Again after ray.init, which installs its own SIGTERM handler.)"""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    @contextlib.contextmanager
    def keeping_handlers(self) -> Iterator[None]:
        """Around ray.init, where a SIGTERM used to kill us with SIGABRT (seen under load: the driver's C++
        failure-signal handler took it mid-connect). Meanwhile ours alone handle SIGINT/SIGTERM: ray.init's
        Python handlers (the last one kills Ray's processes under the connecting driver) are not installed, nor
        the driver's C++ failure-signal handler (its SIGSEGV traces too; Ray's own processes keep theirs), and an
        interrupted system call in Ray's C++ is restarted (SA_RESTART), not failed. A Ray without these hooks
        keeps its handlers until install_handlers (see signalled_in_ray_init)."""
        try:
            import ray._private.ray_constants as ray_constants
            import ray._private.utils as ray_utils

            saved = ray_utils.set_sigterm_handler, ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER
        except (ImportError, AttributeError):
            yield
            return
        self.install_handlers()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.siginterrupt(sig, False)
        ray_utils.set_sigterm_handler = lambda _handler: None
        ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
        try:
            yield
        finally:
            ray_utils.set_sigterm_handler, ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = saved
            self.install_handlers()  # without SA_RESTART again: a signal interrupts a blocking call

    def _on_signal(self, signum: int, _frame) -> None:
        self.signals += 1
        if self.signals > 1:
            say(f"expertmesh serve: {signal.Signals(signum).name} again, exiting now")
            force_exit(128 + signum)
        self.stopping = True
        self.check()

    def _on_parent_death(self, _signum: int, _frame) -> None:
        self.parent_gone = self.stopping = True  # the watchdog says so and bounds the stop
        self.check()

    def signalled_in_ray_init(self) -> None:
        """Ray's SIGTERM handler (in place during ray.init) took a signal and raised SystemExit: abort."""
        self.signals += 1
        self.stopping = True
        self.check()

    def check(self) -> None:
        """Abort the startup (raise StartupAborted) if a stop came in; between startup phases, and on a signal."""
        if self.stopping and self.starting:
            self.starting = False
            say("expertmesh serve: stopping the startup, cleaning up... (signal again to exit now)")
            raise StartupAborted

    def serving(self) -> None:
        """Started: from now on a first signal drains (the main loop watches `stopping`)."""
        self.check()
        self.starting = False

    def wait(self, seconds: float) -> bool:
        """Sleep until `stopping` or for `seconds`; returns `stopping`."""
        deadline = time.monotonic() + seconds
        while not self.stopping and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.1))
        return self.stopping

    def _watch_parent(self) -> None:
        while not self.parent_gone and os.getppid() == self.parent_pid:
            time.sleep(WATCHDOG_INTERVAL_S)
        self.parent_gone = self.stopping = True
        say(f"expertmesh serve: parent process {self.parent_pid} is gone, shutting down")
        time.sleep(PARENT_GONE_GRACE_S)
        say(f"expertmesh serve: not stopped {PARENT_GONE_GRACE_S:.0f} s after the parent died, exiting now")
        force_exit(1, ray_shutdown_s=FORCE_EXIT_RAY_S)
