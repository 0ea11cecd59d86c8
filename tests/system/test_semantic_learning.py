"""The semantic cache learns from verified outcomes, through the real daemon (issue 28): a remote
model whose answers mean something (the fault provider's "intent" model answers by keyword)
stands behind the gateway. A near-miss that the decision refused but the model answered alike is
promoted (the entry then serves queries that close); a hit that an audit (the model asked again
in the background class) finds wrong tightens its entry, and the same query then misses."""
import json

from helpers.daemon import Daemon
from helpers.fault_provider import FaultProvider
from helpers.http import request
from helpers.llm import metric
from helpers.wait import wait_for

Q0 = "How do I reset my password?"
NEAR_MISS = "My password, how do I reset it?"   # the trees refuse it (words moved); it means the same
WRONG = "How do I reset my router password?"     # the trees serve it at 0.8; the model answers otherwise


def ask(d, text):
    body = {"model": "assist", "messages": [{"role": "user", "content": text}], "max_tokens": 20, "temperature": 0}
    r = request(d.port, "POST", "/v1/chat/completions", json.dumps(body).encode(), timeout=30)
    assert r.status == 200, r.body
    return r.headers["x-tidegate-cache"], r.json()["choices"][0]["message"]["content"]


def test_promotion_and_tightening_change_later_decisions(tmp_path):
    p = FaultProvider()
    p.intents = {"router": "Hold the router's reset button for ten seconds.",
                 "password": "Use the reset link on the sign-in page."}
    model = {"name": "assist", "backends": [{"url": p.url, "model": "intent"}], "health_interval": 600}
    d = Daemon(tmp_path, workers=1, cache={"exact_enabled": False, "semantic_timeout": 1.0,
                                           "semantic_threshold": 0.8, "semantic_audit_rate": 1.0},
               inference={"enabled": True, "models": [model]})
    d.start()
    try:
        assert ask(d, Q0) == ("miss", p.intents["password"])
        wait_for(lambda: metric(d, "tidegate_semantic_inserts_total") >= 1, 30, "the first answer stored")
        before = {r["text"]: r for r in d.admin_json("cache", "explain", NEAR_MISS)["body"]["nearest"]}
        assert before[Q0]["decision"] == "veto:model"

        # a near-miss: answered by the model, stored, then verified against Q0's entry (alike)
        assert ask(d, NEAR_MISS) == ("miss", p.intents["password"])
        wait_for(lambda: metric(d, "tidegate_semantic_verified_same_total") >= 1, 30, "the near-miss verified")
        after = {r["text"]: r for r in d.admin_json("cache", "explain", NEAR_MISS)["body"]["nearest"]}
        assert after[Q0]["decision"] == "promoted" and after[Q0]["learned"]["same"] == 1

        # a hit the model would answer otherwise: served, audited, found wrong; then refused.
        # The audit is off the request path: the client has its answer while the model (held
        # here) still has the audit
        p.hold()
        assert ask(d, WRONG) == ("semantic", p.intents["password"])
        wait_for(lambda: p.in_flight == 1, 30, "the audit at the model")
        p.release()
        wait_for(lambda: metric(d, "tidegate_semantic_audit_wrong_total") >= 1, 30, "the hit audited")
        assert metric(d, "tidegate_semantic_audits_started_total") >= 1
        assert ask(d, WRONG) == ("miss", p.intents["router"])
        wait_for(lambda: metric(d, "tidegate_semantic_veto_tightened_total") >= 1, 30, "the veto counted")
        row = {r["text"]: r for r in d.admin_json("cache", "explain", WRONG)["body"]["nearest"]}[Q0]
        assert row["decision"] == "veto:tightened" and row["budget"]["audited"] == 1
        # the audit went to the model in the background class, beside the client's own requests
        assert sum(1 for _, m, _ in p.attempts if m == "intent") == 4
    finally:
        d.stop()
        p.close()
