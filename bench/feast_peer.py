"""Feast's Python feature server on the same rows as tidegate's registry, for bench/predict_bench.py.

Run with the Python of a venv that has feast (the bench makes one: ~/.cache/tidegate-bench/
feast-venv), as `python feast_peer.py REPO_DIR USERS_CSV ONLINE_STORE [REDIS_URL]`: writes a
feature repo (one entity named by the CSV's first column, e.g. `user`, and one feature view `user_fv` of
the other columns, float32),
applies it and writes every row to the online store (sqlite, or redis) with
write_to_online_store, the path Feast's docs give for precomputed rows. Then
`feast serve` serves it (the bench starts that).
"""
import os
import sys
from datetime import datetime, timedelta, timezone

import pandas as pd

repo, users_csv, store = sys.argv[1], sys.argv[2], sys.argv[3]
redis_url = sys.argv[4] if len(sys.argv) > 4 else ""
os.makedirs(os.path.join(repo, "data"), exist_ok=True)
df = pd.read_csv(users_csv)
entity = df.columns[0]
feats = [c for c in df.columns if c != entity]
df["ts"] = datetime.now(timezone.utc) - timedelta(minutes=1)
df[feats] = df[feats].astype("float32")
df.to_parquet(os.path.join(repo, "data", "users.parquet"))
if store == "redis":
    host = redis_url.split("//", 1)[1].split("/", 1)[0]
    online = f"online_store:\n  type: redis\n  connection_string: \"{host}\"\n"
else:
    online = "online_store:\n  type: sqlite\n  path: data/online.db\n"
with open(os.path.join(repo, "feature_store.yaml"), "w") as f:
    f.write("project: bench\nregistry: data/registry.db\nprovider: local\n" + online +
            "entity_key_serialization_version: 3\n")
with open(os.path.join(repo, "features.py"), "w") as f:
    f.write(f"""from datetime import timedelta
from feast import Entity, FeatureView, Field, FileSource
from feast.types import Float32
entity = Entity(name="{entity}", join_keys=["{entity}"])
src = FileSource(path="data/users.parquet", timestamp_field="ts")
fv = FeatureView(name="{entity}_fv", entities=[entity], ttl=timedelta(days=3650), online=True, source=src,
                      schema=[{", ".join(f'Field(name="{c}", dtype=Float32)' for c in feats)}])
""")
os.chdir(repo)
import subprocess  # noqa: E402

subprocess.run([os.path.join(os.path.dirname(sys.executable), "feast"), "apply"], check=True, cwd=repo,
               stdout=subprocess.DEVNULL)
from feast import FeatureStore  # noqa: E402

fs = FeatureStore(repo_path=repo)
fs.write_to_online_store(f"{entity}_fv", df)
print(feats)
