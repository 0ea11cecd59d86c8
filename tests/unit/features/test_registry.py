"""The feature registry: rows checked against the schema (errors name row and column, nothing is
half-loaded), versions switched atomically, tenants apart, one loader at a time."""
import pytest

from tidegate.core.features.registry import Registry, view_problem

VIEWS = [{"name": "user", "entity": "user_id", "features": [
    {"name": "age", "dtype": "int64", "default": 0}, {"name": "spend", "dtype": "float32", "default": -1.0}]}]


def test_load_then_read_with_defaults_and_tenants_apart(tmp_path):
    w = Registry(str(tmp_path), VIEWS, 1 << 24, writable=True)
    assert w.load("user", [("u1", {"age": "41", "spend": "12.5"}), ("u2", {"age": 7})], "acme") == (2, 1)
    w.load("user", [("u1", {"age": 99})], "globex")
    r = w  # LMDB allows one environment per process: the loader reads its own (workers read read-only)
    assert r.get("user", "acme", "u1") == ({"age": 41, "spend": 12.5}, 2)
    assert r.get("user", "acme", "u2") == ({"age": 7, "spend": -1.0}, 2)  # a missing feature takes its default
    assert r.get("user", "globex", "u1")[0]["age"] == 99 and r.get("user", "globex", "u2") is None
    assert r.get("nope", "acme", "u1") is None
    w.close()


def test_a_bad_row_names_row_and_column_and_nothing_is_written(tmp_path):
    w = Registry(str(tmp_path), VIEWS, 1 << 24, writable=True)
    w.load("user", [("u1", {"age": 1})], "acme")
    with pytest.raises(ValueError, match=r"row 2, column 'age'"):
        w.load("user", [("u1", {"age": 2}), ("u2", {"age": "old"})], "acme")
    with pytest.raises(ValueError, match=r"row 1, column 'spend'"):
        w.load("user", [("u3", {"spend": "inf"})], "acme")
    assert w.get("user", "acme", "u1") == ({"age": 1, "spend": -1.0}, 1)
    w.close()


def test_a_reader_snapshot_never_mixes_versions(tmp_path):
    w = Registry(str(tmp_path), VIEWS, 1 << 24, writable=True)
    w.load("user", [(f"u{i}", {"age": 1}) for i in range(100)], "acme")
    r = w
    env = r._open()
    with env.begin() as snapshot:  # a read that started before the next load
        w.load("user", [(f"u{i}", {"age": 2}) for i in range(100)], "acme")
        version = r._meta(snapshot)["user"]
        db = env.open_db(f"user@{version}".encode(), txn=snapshot, create=False)
        ages = {r.views["user"].unpack(v)["age"] for _, v in snapshot.cursor(db=db)}
    assert ages == {1}  # all old: the old version stays readable to the snapshot that holds it
    assert {r.get("user", "acme", f"u{i}")[0]["age"] for i in range(100)} == {2}
    assert r.stats() == [{"view": "user", "entity": "user_id", "features": 2, "version": 2, "rows": 100}]
    w.close()


def test_one_loader_at_a_time(tmp_path):
    from tidegate.core.base.filelock import StoreLock
    w = Registry(str(tmp_path), VIEWS, 1 << 24, writable=True)
    assert not StoreLock(str(tmp_path)).try_acquire()  # a second loader would wait, then StoreLocked
    w.close()
    assert StoreLock(str(tmp_path)).try_acquire()


@pytest.mark.parametrize("views, needle", [
    ([{"name": "v", "features": []}], "non-empty"),
    ([{"name": "v", "features": [{"name": "a", "dtype": "str"}]}], "dtype"),
    ([{"name": "v", "features": [{"name": "a"}, {"name": "a"}]}], "unique"),
    ([{"name": "v", "features": [{"name": "a", "default": "x"}]}], "default"),
])
def test_view_declarations_are_checked(views, needle):
    assert needle in view_problem(views)


def test_parquet_load_through_the_admin_side(tmp_path):
    pa = pytest.importorskip("pyarrow")  # a test extra
    import pyarrow.parquet as pq
    from tidegate.core.base import config
    from tidegate.core.features import admin
    path = tmp_path / "users.parquet"
    pq.write_table(pa.table({"user_id": ["u1", "u2"], "age": [41, 7], "spend": [1.5, None]}), path)
    cfg = config.validate({"server": {"data_dir": str(tmp_path / "data")}, "features": {"views": VIEWS}})
    assert admin.load(cfg, "user", str(path), "acme")["rows"] == 2
    assert admin.get(cfg, "user", "u2", "acme") == ({"age": 7, "spend": -1.0}, 1)  # null -> the default
    pq.write_table(pa.table({"user_id": ["u3"], "age": ["old"]}), path)
    with pytest.raises(ValueError, match=r"row 1, column 'age'"):
        admin.load(cfg, "user", str(path), "acme")
