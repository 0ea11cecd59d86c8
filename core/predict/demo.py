"""`tidegate demo features DIR`: two worked examples with generated data, ready to serve.

* fraud (class critical, 64 inputs, logistic regression scored inline): the request's amount and
  hour, 30 user features from the registry, 30 merchant features (the registry, or Redis with
  --redis), and two live event-log views (the user's transactions and spend in the last hour).
* recommend (class background, a small MLP scored in the model worker, 10 items): the user's
  features and recent activity; fallback = last_served, so when scoring fails (or, under
  overload, is shed) the user gets the last recommendation served to them.

Writes DIR/tidegate.toml (data under DIR/data, the LLM off), DIR/users.csv, DIR/merchants.csv and
DIR/models/*.npz, then loads the rows. Weights and rows are random with a fixed seed.
"""
from __future__ import annotations

import csv
import os

import numpy as np

from tidegate.core.base.config import toml_value
from tidegate.core.features import admin

USER_FEATURES, MERCHANT_FEATURES, ITEMS = 30, 30, 10


def _view(name: str, n: int, source: str) -> dict:
    return {"name": name, "entity": name, "source": source, "ttl": 0,
            "features": [{"name": f"{name[0]}{i}", "dtype": "float32", "default": 0.0} for i in range(n)]}


def config_text(root: str, redis_url: str = "", bind: str = "127.0.0.1:8080") -> str:
    views = [_view("user", USER_FEATURES, "registry"), _view("merchant", MERCHANT_FEATURES,
                                                              "redis" if redis_url else "registry")]
    events = [{"name": "txn_1h", "kind": "count", "event_type": "txn", "window": 3600, "entity": "user"},
              {"name": "spend_1h", "kind": "sum", "event_type": "txn", "field": "amount", "window": 3600,
               "entity": "user"}]
    models = [{"name": "fraud", "path": os.path.join(root, "models", "fraud.npz"), "class": "critical",
               "inputs": ["request.amount", "request.hour", "user.*", "merchant.*", "events.txn_1h",
                          "events.spend_1h"]},
              {"name": "recommend", "path": os.path.join(root, "models", "recommend.npz"), "class": "background",
               "worker": True, "fallback": "last_served", "inputs": ["user.*", "events.txn_1h", "events.spend_1h"]}]
    lines = ["# written by `tidegate demo features`: serve with tidegate serve --config THIS_FILE",
             "[server]", f"bind = {toml_value(bind)}", f"data_dir = {toml_value(os.path.join(root, 'data'))}",
             f"run_dir = {toml_value(os.path.join(root, 'run'))}", "", "[inference]",
             "enabled = false                  # the LLM is not part of this demo", "",
             "[features]", f"views = {toml_value(views)}"]
    if redis_url:
        lines.append(f"redis_url = {toml_value(redis_url)}")
    lines += ["", "[events]", f"views = {toml_value(events)}", "", "[predict]", f"models = {toml_value(models)}", ""]
    return "\n".join(lines)


def _rows(path: str, name: str, n_rows: int, n_feats: int, rng) -> None:
    x = rng.normal(size=(n_rows, n_feats)).astype(np.float32)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([name] + [f"{name[0]}{i}" for i in range(n_feats)])
        for i, row in enumerate(x):
            w.writerow([f"{name[0]}{i}"] + [f"{v:.5f}" for v in row])


def build(root: str, users: int = 10000, merchants: int = 2000, redis_url: str = "", seed: int = 7,
          bind: str = "127.0.0.1:8080") -> str:
    """Write the files; returns the config's path (then check it and call load_rows)."""
    root = os.path.abspath(root)
    os.makedirs(os.path.join(root, "models"), exist_ok=True)
    rng = np.random.default_rng(seed)
    d_fraud = 2 + USER_FEATURES + MERCHANT_FEATURES + 2
    w = rng.normal(scale=0.3, size=d_fraud).astype(np.float32)
    w[0], w[-2], w[-1] = 0.002, 0.15, 0.002  # bigger amounts, more transactions and spend in the hour look riskier
    np.savez(os.path.join(root, "models", "fraud.npz"), w=w, b=np.float32(-2.0), version="fraud-demo-1")
    d_rec, hidden = USER_FEATURES + 2, 32
    np.savez(os.path.join(root, "models", "recommend.npz"),
             W0=rng.normal(scale=0.3, size=(d_rec, hidden)).astype(np.float32), b0=np.zeros(hidden, np.float32),
             W1=rng.normal(scale=0.3, size=(hidden, ITEMS)).astype(np.float32), b1=np.zeros(ITEMS, np.float32),
             version="recommend-demo-1")
    _rows(os.path.join(root, "users.csv"), "user", users, USER_FEATURES, rng)
    _rows(os.path.join(root, "merchants.csv"), "merchant", merchants, MERCHANT_FEATURES, rng)
    path = os.path.join(root, "tidegate.toml")
    with open(path, "w") as f:
        f.write(config_text(root, redis_url, bind))
    return path


def load_rows(cfg: dict, root: str, tenant: str = "anonymous") -> list[dict]:
    """Load the generated users and merchants (the registry, or Redis for a redis view)."""
    return [admin.load(cfg, "user", os.path.join(root, "users.csv"), tenant),
            admin.load(cfg, "merchant", os.path.join(root, "merchants.csv"), tenant)]
