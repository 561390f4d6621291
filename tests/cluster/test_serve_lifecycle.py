"""`expertmesh serve` process lifecycle, with real processes: the serve child (and its embedded Ray: GCS, raylet,
agents, workers) never outlives its parent, a second Ctrl-C forces an exit, and a signal during startup stops it
within seconds.

Processes are found by scanning /proc: the serve child leads its own session, and every Ray process it starts
stays in that session (Ray's workers get their own process group, not their own session)."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from model.random_checkpoint import write_checkpoint
from tests.ports import free_port

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="scans /proc")

STARTUP_S = 180  # bound on a full start (Ray, workers, router, HTTP server) on a loaded machine
GONE_S = 30  # bound on every serve process being gone once serve stopped
CONTEXT = 4096  # the test checkpoint's positions: room for requests that outlast a signal on a fast machine


def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, session id, start time) of pid, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    return fields[0], int(fields[1]), int(fields[3]), int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _processes() -> dict[int, tuple[str, int, int, int]]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _stat(int(name))) is not None:
            out[int(name)] = st
    return out


def _live(procs: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """Those of (pid, start time) still running (a zombie has exited; only its parent has not reaped it)."""
    return {(pid, start) for pid, start in procs
            if (st := _stat(pid)) is not None and st[3] == start and st[0] != "Z"}


class Serve:
    """`expertmesh serve` as a user runs it (the console script); the serve child and every process of its
    session are recorded as they appear."""

    def __init__(self, model: Path, tmp: Path):
        self.url = f"http://127.0.0.1:{free_port()}"
        exe = Path(sys.executable).with_name("expertmesh")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "cluster.cli"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "XDG_CACHE_HOME": str(tmp / "cache")}
        self.proc = subprocess.Popen(
            [*cmd, "serve", "--model", str(model), "--workers", "2", "--port", self.url.rsplit(":", 1)[1],
             "--prometheus-file-sd", str(tmp / "file_sd.json")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.out: list[str] = []
        self.err: list[str] = []
        threading.Thread(target=lambda: self.out.extend(self.proc.stdout), daemon=True).start()
        threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True).start()
        self.child: int | None = None  # the serve child's pid, which is its session id
        self.seen: set[tuple[int, int]] = set()  # (pid, start time) of every process seen in its session
        self.cmdlines: dict[int, str] = {}  # as last seen (Ray's workers retitle themselves)

    def log(self) -> str:
        return "".join(self.err)[-4000:]

    def session_now(self) -> set[tuple[int, int]]:
        if self.child is None:
            return set()
        return {(pid, st[3]) for pid, st in _processes().items() if st[2] == self.child}

    def track(self) -> None:
        """Find the serve child (once), and record the processes now in its session."""
        if self.child is None:
            self.child = next((pid for pid, st in _processes().items() if st[1] == self.proc.pid), None)
        for pid, start in self.session_now():
            self.seen.add((pid, start))
            self.cmdlines[pid] = _cmdline(pid) or self.cmdlines.get(pid, "")

    def wait_for(self, what: str, cond, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            self.track()
            assert self.proc.poll() is None, f"serve exited ({self.proc.returncode}) before {what}:\n{self.log()}"
            assert time.monotonic() < deadline, f"no {what} within {timeout} s:\n{self.log()}"
            time.sleep(0.1)
        self.track()

    def wait_serving(self) -> None:
        self.wait_for("URL line", lambda: any("expertmesh serving" in x for x in self.out), STARTUP_S)

    def in_log(self, text: str) -> bool:
        return any(text in x for x in self.err)

    def procs(self, marker: str, live: bool = True) -> list[int]:
        """Pids of the session's processes whose command line has marker (now running, or ever seen)."""
        self.track()
        procs = _live(self.seen) if live else self.seen
        return [pid for pid, _ in procs if marker in self.cmdlines.get(pid, "")]

    def exit_code(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"serve still running {timeout} s after the signal:\n{self.log()}") from None

    def assert_all_gone(self, timeout: float = GONE_S) -> float:
        """Every process of the serve child's session exits within timeout; returns how long it took."""
        assert self.child is not None
        t0 = time.monotonic()
        while (left := _live(self.seen | self.session_now())) and time.monotonic() - t0 < timeout:
            time.sleep(0.2)
        assert not left, "still running: " + "; ".join(f"{p} {_cmdline(p)[:80]}" for p, _ in left)
        return time.monotonic() - t0

    def kill_all(self) -> None:
        """Cleanup, however a test ended: SIGKILL the parent and everything left of the child's session."""
        self.track()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        for pid, _ in _live(self.seen | self.session_now()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    ck = tmp_path_factory.mktemp("lifecycle") / "ck"
    write_checkpoint(ck, "tiny", seed=3, overrides={"max_position_embeddings": CONTEXT})
    return ck


@pytest.fixture
def serve(model, tmp_path):
    started: list[Serve] = []

    def start() -> Serve:
        started.append(Serve(model, tmp_path))
        return started[-1]

    yield start
    for s in started:
        s.kill_all()


def _complete(url: str, max_tokens: int, result: dict) -> None:
    try:
        result["r"] = httpx.post(url + "/v1/completions", json={"model": "ck", "prompt": "stay a while",
                                                                "max_tokens": max_tokens, "ignore_eos": True},
                                 timeout=120)
    except httpx.HTTPError as e:
        result["error"] = e


def _engine(url: str) -> dict:
    return httpx.get(url + "/v1/admin/engine", timeout=10).json()


def _tokens_lasting(url: str, seconds: float) -> int:
    """max_tokens of a request that decodes for about `seconds` on this machine now (timed on a short one), so
    a signal sent once it started lands mid-request however fast or loaded the machine is."""
    t0 = time.monotonic()
    r = httpx.post(url + "/v1/completions", json={"model": "ck", "prompt": "warm up", "max_tokens": 64,
                                                  "ignore_eos": True}, timeout=120)
    assert r.status_code == 200, r.text
    per_token = (time.monotonic() - t0) / 64
    return max(48, min(CONTEXT - 64, round(seconds / per_token)))


def _start_in_flight(url: str, max_tokens: int, result: dict) -> threading.Thread:
    """A completion of max_tokens, returned once the engine runs it and has decoded a token of it."""
    before = _engine(url)["generation_tokens_total"]
    request = threading.Thread(target=_complete, args=(url, max_tokens, result))
    request.start()
    deadline = time.monotonic() + 60
    while (state := _engine(url))["generation_tokens_total"] <= before or not state["num_running"]:
        assert request.is_alive() and time.monotonic() < deadline, (state, result)
        time.sleep(0.01)
    assert request.is_alive(), result
    return request


def test_parent_sigkill_drains_and_stops_child_and_ray(serve):
    s = serve()
    s.wait_serving()
    assert s.procs("raylet") and s.procs("gcs_server") and len(s.procs("ray::ExpertWorkerActor")) == 2
    # ~2 s of decoding: far longer than the child takes to notice (PDEATHSIG, a 0.1 s loop), far shorter than the
    # PARENT_GONE_GRACE_S the drain gets
    max_tokens = _tokens_lasting(s.url, 2.0)
    result: dict = {}
    request = _start_in_flight(s.url, max_tokens, result)
    s.proc.kill()  # SIGKILL: the parent forwards nothing, cleans up nothing
    s.proc.wait(timeout=10)
    # The child notices and drains: the engine stops accepting while the request is still running.
    deadline = time.monotonic() + 30
    try:
        while (state := _engine(s.url))["accepting"]:
            assert time.monotonic() < deadline, f"no drain within 30 s:\n{s.log()}"
            time.sleep(0.01)
    except httpx.HTTPError as e:  # the HTTP server stops only after the drain
        raise AssertionError(f"the drain ended before it was seen ({e}); {max_tokens} tokens:\n{s.log()}") from e
    assert state["num_running"] == 1, (state, max_tokens)
    took = s.assert_all_gone()
    request.join(timeout=30)
    assert s.in_log("is gone, shutting down") and s.in_log("draining in-flight") and s.in_log("stopped"), s.log()
    assert "r" in result and result["r"].status_code == 200, result
    assert result["r"].json()["usage"]["completion_tokens"] == max_tokens
    print(f"serve and its Ray gone {took:.1f} s after the parent's SIGKILL, having drained {max_tokens} tokens")


def test_second_ctrl_c_while_draining_forces_exit(serve):
    s = serve()
    s.wait_serving()
    # long (~20 s of decoding): the drain is still waiting for it when the second Ctrl-C comes
    request = _start_in_flight(s.url, _tokens_lasting(s.url, 20.0), {})
    s.proc.send_signal(signal.SIGINT)
    s.wait_for("drain", lambda: s.in_log("press Ctrl-C again to force exit") and s.in_log("draining in-flight"), 30)
    assert s.proc.poll() is None  # still draining the request
    t0 = time.monotonic()
    s.proc.send_signal(signal.SIGINT)
    assert s.exit_code(10) == 130
    exited = time.monotonic() - t0
    s.assert_all_gone()
    request.join(timeout=30)
    assert not request.is_alive()
    print(f"second Ctrl-C: parent exited in {exited:.1f} s, everything gone in {time.monotonic() - t0:.1f} s")


@pytest.mark.parametrize("when, how", [
    ("ray starting", "ctrl-c"),  # the child's first output comes from ray.init
    ("workers starting", "ctrl-c"),  # the expert worker actors exist, the cluster is not up
    ("ray started", "sigterm child twice"),  # the second signal while cleaning up: exit now
])
def test_signal_during_startup_stops_promptly(serve, when, how):
    s = serve()
    if when == "ray starting":
        s.wait_for("output", lambda: bool(s.err), STARTUP_S)
    elif when == "ray started":
        s.wait_for("Ray", lambda: s.in_log("Started a local Ray instance"), STARTUP_S)
    else:
        s.wait_for("worker actors", lambda: bool(s.procs("ray::ExpertWorkerActor")), STARTUP_S)
    t0 = time.monotonic()
    if how == "ctrl-c":
        s.proc.send_signal(signal.SIGINT)
        rc = s.exit_code(30)
        assert rc == 130 and s.in_log("startup aborted"), s.log()
    else:
        os.kill(s.child, signal.SIGTERM)
        s.wait_for("abort", lambda: s.in_log("stopping the startup"), 10)
        try:
            os.kill(s.child, signal.SIGTERM)
        except ProcessLookupError:  # the cleanup (a session kill) was quicker than the second signal
            pass
        rc = s.exit_code(10)
        # either the second signal forced the exit, or the abort's cleanup had already finished
        assert (rc == 128 + signal.SIGTERM and s.in_log("SIGTERM again, exiting now")) or \
            (rc == 130 and s.in_log("startup aborted")), s.log()
    exited = time.monotonic() - t0
    if when != "ray starting":
        assert s.procs("raylet", live=False), s.cmdlines
    s.assert_all_gone()
    assert not any("expertmesh serving" in x for x in s.out)
    print(f"{when}, {how}: serve exited {exited:.1f} s after the signal, rc {rc}")


def test_ray_init_keeps_serves_signal_handlers():
    """A SIGTERM during ray.init killed serve with SIGABRT under load (the driver's C++ failure-signal handler took
    it mid-connect): while ray.init runs, serve's handlers alone are in place, with SA_RESTART; after, Ray's hooks
    are back as they were."""
    import ray._private.ray_constants as ray_constants
    import ray._private.utils as ray_utils

    from cluster.serve_lifecycle import ServeLifecycle

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    failure_handler_off = ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER
    life = ServeLifecycle()
    try:
        with life.keeping_handlers():
            ours = signal.getsignal(signal.SIGTERM)
            assert getattr(ours, "__self__", None) is life
            ray_utils.set_sigterm_handler(lambda *_: None)  # what ray.init and its Node do
            assert signal.getsignal(signal.SIGTERM) == ours
            assert ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER is True  # read when the driver connects
        assert ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER == failure_handler_off
        ray_utils.set_sigterm_handler(signal.SIG_DFL)  # Ray's own hook is back afterwards
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
