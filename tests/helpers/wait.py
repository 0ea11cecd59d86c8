"""Waiting for an event (a state, a metric, an answer) instead of for time."""
import time


def wait_for(pred, timeout: float = 15.0, what: str = "condition", every: float = 0.05):
    """pred()'s first truthy value, asked every `every` seconds; TimeoutError naming `what` past timeout."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(every)
