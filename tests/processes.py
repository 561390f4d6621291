"""Stopping a server a test started as a subprocess: a signal, a grace period, then SIGKILL."""

import signal
import subprocess


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 90) -> None:
    """Send `sig` if `proc` still runs and wait up to `timeout` s for it to exit; kill it if it does not."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
