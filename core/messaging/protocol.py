"""Every message between tidegate processes, named once.

Four sockets carry messages, each with its own shape:

* supervisor link (worker DEALER <-> supervisor ROUTER) and the admin control socket: one frame,
  an orjson object with an "op"; a request carries an "id" and its REPLY the same "id".
* mesh (ingress <-> ingress, core/messaging/mesh.py): frames of [[id, op, deadline, payload], ...]
  answered by [[id, ok, result], ...]; the ops are the owner-side handlers below.
* blocking-worker requests (ingress DEALER -> inference/embedder ROUTER): frames of
  [[op, rid, body], ...]; events come back as [[kind, rid, payload], ...].

Sizes are capped on the sockets themselves (ZMQ_MAXMSGSIZE), so decode only has to reject what
is not a JSON object.

Two payloads have a type here, and this module is the only place that knows their wire shape
(tests/unit/test_layers.py fails if an error list is built anywhere else):

* an error (ERR, and a blocking worker's refusal): `Failure(status, message, code, param)`,
  a list [status, message, code, param] on the wire (`Failure.wire()` / `Failure.of(payload)`);
* a token delta (DELTA): `delta(...)` builds it, `read_delta(payload)` reads it as a `Delta`.
  n = 1 sends the text alone (or [text, logprobs] when they were asked for), the cheapest
  shape on the hot path; n > 1 sends {index, text, logprobs}, and a choice that ends while
  others still run sends {index, end} (`choice_end`).
"""
from __future__ import annotations

from typing import NamedTuple

import orjson

from tidegate.core.http.http11 import HttpError, service_unavailable

# ---- worker -> supervisor ----------------------------------------------------------------------
READY = "ready"          # the worker listens and serves
HEARTBEAT = "hb"         # liveness + metrics snapshot
METRICS = "metrics"      # request: render the aggregated /metrics text (carries a fresh snapshot)
READINESS = "readiness"  # request: are all workers and downstream processes up?
REPLY = "reply"          # supervisor -> worker answer to a request

STANDBY = "standby"      # booted up to its durable stores; waiting for their locks (reload hand-off)
RELEASED = "released"    # answer to RELEASE: the stores are closed and their locks free

# ---- supervisor -> worker, unsolicited ---------------------------------------------------------
PURGE = "purge"          # drop cached answers (all, or one tenant's)
RELEASE = "release"      # reload: the next generation is on standby; flush, close and unlock the stores
RESUME = "resume"        # the reload failed after RELEASE: take the stores back and serve again
SHED = "shed"            # the classes an operator sheds now (admin shed on|off), to every ingress worker
BOX = "box"              # the box-level overload actions on now (core/overload/box.py), to every ingress worker

# ---- admin -> supervisor (control socket) ------------------------------------------------------
CONTROL_OPS = ("status", "workers", "config", "reload", "drain", "stop", "metrics", "cache", "shed", "breakers",
               "backends")

# ---- mesh: ops handled at a key's ring owner ---------------------------------------------------
RL_TAKE, RL_LEASE, RL_REFUND = "rl.take", "rl.lease", "rl.refund"        # rate-limit buckets
SESS_CREATE, SESS_GET, SESS_PATCH, SESS_DELETE = "sess.create", "sess.get", "sess.patch", "sess.delete"
SESS_ADOPT = "sess.adopt"  # a session whose owner changed (the worker count did): take it over
XC_GET, XC_PUT, XC_STALE = "xc.get", "xc.put", "xc.stale"                # exact cache (stale: for shedding)
EV_APPEND = "ev.append"                                                  # event-log partition

# ---- ingress -> blocking worker: [op, rid, body] -----------------------------------------------
GENERATE = "gen"         # inference: generate            -> DELTA*, END | ERR
CANCEL = "cancel"        # inference: the client left      (no answer)
CREDIT = "credit"        # inference: a stream's reader took n more deltas (body: n; no answer)
EMBED = "embed"          # inference: embeddings           -> EMB | ERR
LOOKUP = "lookup"        # embedder: semantic lookup       -> HIT | MISS | ERR
INSERT = "insert"        # embedder: store an answer       (no answer; rid 0)
AUDIT = "audit"          # embedder: a served hit's answer as the model gives it now (no answer; rid 0)
EXPLAIN = "explain"      # embedder: a tenant's nearest entries and why each is or is not served -> EXPLAIN
SCORE = "score"          # model worker: score a batch     -> SCORES | ERR

# ---- blocking worker -> ingress: [kind, rid, payload] ------------------------------------------
DELTA, END, ERR, EMB, HIT, MISS, SCORES = "d", "end", "err", "emb", "hit", "miss", "scores"
VIA = "via"  # a remote model names the backend (and its model) that answers, before its first DELTA or END


class ProtocolError(ValueError):
    pass


def encode(msg: dict) -> bytes:
    return orjson.dumps(msg)


def decode(frame: bytes) -> dict:
    try:
        msg = orjson.loads(frame)
    except orjson.JSONDecodeError as e:
        raise ProtocolError(f"not JSON: {e}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
        raise ProtocolError("message must be an object with an 'op' string")
    return msg


def pack(msgs: list, limit: int) -> tuple[list[bytes], list]:
    """msgs as orjson frames of at most `limit` bytes each (server.max_frame_bytes, which is also
    the sockets' ZMQ_MAXMSGSIZE: a bigger frame would drop the whole link), and the messages that
    alone exceed it, for the caller to fail instead of sending."""
    whole = orjson.dumps(msgs)
    if len(whole) <= limit:
        return [whole], []
    if len(msgs) == 1:
        return [], msgs
    mid = len(msgs) // 2
    a, too_big_a = pack(msgs[:mid], limit)
    b, too_big_b = pack(msgs[mid:], limit)
    return a + b, too_big_a + too_big_b


class Failure(NamedTuple):
    """Why a request failed downstream: the HTTP status and OpenAI error fields it answers with."""
    status: int
    message: str
    code: str
    param: str | None = None
    retry_after: float = 0.0  # seconds the client should wait (a backend's Retry-After), 0: none given

    def wire(self) -> list:
        out = [self.status, self.message, self.code, self.param]
        return out + [self.retry_after] if self.retry_after else out

    @classmethod
    def of(cls, payload) -> "Failure":
        """An ERR payload as a Failure (a malformed one is a 502: never trusted as it came)."""
        if isinstance(payload, Failure):
            return payload
        if isinstance(payload, list) and len(payload) in (4, 5) and isinstance(payload[0], int) and \
                (len(payload) == 4 or isinstance(payload[4], (int, float))):
            return cls(*payload)
        return cls(502, f"malformed error from a downstream process: {str(payload)[:200]}", "bad_gateway")

    def http(self) -> HttpError:
        """The HTTP answer; a 503 tells the client when to retry, and so does a 429 or 503 whose
        backend said when (its Retry-After, passed on once every attempt is spent)."""
        wait = max(1, int(self.retry_after + 0.999)) if self.retry_after else 0
        if self.status == 503:
            return service_unavailable(self.message, self.code, retry_after=wait or 1, param=self.param)
        if wait:
            return HttpError(self.status, self.message, self.code, param=self.param,
                             headers=[(b"retry-after", str(wait).encode())])
        return HttpError(self.status, self.message, self.code, param=self.param)

    @property
    def is_load(self) -> bool:
        """Refused for load (a full queue, a deadline passed waiting in it): shedding's business,
        not a failure a circuit breaker counts."""
        return self.code in LOAD_NOT_FAILURE

    @property
    def is_failure(self) -> bool:
        """A server-side failure the caller's own circuit breaker counts (not load, not a client
        that stopped reading)."""
        return self.status >= 500 and not self.is_load and self.code not in CLIENT_CAUSED

    @property
    def is_downstream_fault(self) -> bool:
        """A failure that meets every caller (the worker gone or wedged, a backend down or
        failing), which the downstream's shared breaker counts; "internal" is this request's
        own failure inside the worker and counts for its tenant alone."""
        return self.is_failure and self.code != "internal"


LOAD_NOT_FAILURE = ("queue_full", "deadline_exceeded")
CLIENT_CAUSED = ("reader_stalled",)


def failure(status: int, message: str, code: str, param: str | None = None, retry_after: float = 0.0) -> list:
    """An ERR payload, as it travels (a fifth element only when a Retry-After goes with it)."""
    return [status, message, code, param] + ([retry_after] if retry_after else [])


def error_event(rid, status: int, message: str, code: str, param: str | None = None) -> list:
    return [ERR, rid, [status, message, code, param]]


def http_error(payload) -> HttpError:
    """The HTTP answer to an ERR event's payload."""
    return Failure.of(payload).http()


# ---- token deltas -----------------------------------------------------------------------------
class Delta(NamedTuple):
    """One DELTA as the replies read it: a choice's text (and its tokens' logprobs when asked
    for), or, with n > 1, the END of a choice that finished while others still run."""
    text: str
    logprobs: list | None = None
    index: int = 0
    end: dict | None = None


def delta(text: str, logprobs: list | None = None, index: int | None = None):
    """A DELTA payload: index None for n = 1 (the text alone, or [text, logprobs])."""
    if index is None:
        return text if logprobs is None else [text, logprobs]
    return {"index": index, "text": text, "logprobs": logprobs}


def choice_end(index: int, end: dict) -> dict:
    """A DELTA payload carrying choice `index`'s END while other choices still run."""
    return {"index": index, "end": end}


def read_delta(payload) -> Delta:
    cls = payload.__class__
    if cls is str:
        return Delta(payload)
    if cls is list:
        return Delta(payload[0], payload[1])
    if "end" in payload:
        return Delta("", None, payload["index"], payload["end"])
    return Delta(payload["text"], payload["logprobs"], payload["index"])
