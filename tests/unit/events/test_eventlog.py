"""The event log on disk: group commit, reading back, recovery from torn tails, refusal (and
repair) of corruption in the middle."""
import asyncio
import errno
import os

import pytest

from tidegate.core.events.eventlog import CorruptLog, LogUnavailable, Partition, read_all, recover, segments
from tidegate.ext.logwriter import crc32c


def test_crc32c_known_value():
    assert crc32c(b"123456789") == 0xE3069283


def write(directory, batches, **kw):
    async def main():
        p = Partition(str(directory), **kw)
        futs = [p.append([f"{b}-{i}".encode() * 20 for i in range(n)]) for b, n in enumerate(batches)]
        firsts = await asyncio.gather(*futs)
        p.close()
        return firsts, p.stats
    return asyncio.new_event_loop().run_until_complete(main())


def test_group_commit_and_read_back(tmp_path):
    firsts, stats = write(tmp_path, [3, 5, 2])
    assert firsts == [0, 3, 8]
    assert stats["log_blocks"] == 1  # appended in one loop turn: one write + one fsync
    got = list(read_all(str(tmp_path)))
    assert [s for s, _ in got] == list(range(10)) and got[3][1] == b"1-0" * 20
    firsts, _ = write(tmp_path, [4])  # reopened: sequence numbers continue
    assert firsts == [10]


def test_segments_roll(tmp_path):
    for _ in range(5):
        write(tmp_path, [50], segment_bytes=2000, compress=False)
    assert len(segments(str(tmp_path))) > 1
    assert [s for s, _ in read_all(str(tmp_path))] == list(range(250))


def test_torn_tail_is_cut_and_middle_corruption_refuses_to_open(tmp_path):
    write(tmp_path, [5])
    write(tmp_path, [5])
    (seg,) = segments(str(tmp_path))
    size = os.path.getsize(seg)
    with open(seg, "ab") as f:
        f.write(b"TGB1\x10\x00")  # a write cut short by a crash
    assert recover(str(tmp_path)) == 10 and os.path.getsize(seg) == size
    with open(seg, "r+b") as f:  # now damage the first of the two blocks: a good one follows it
        f.seek(40)
        f.write(b"\xff\xff\xff")
    with pytest.raises(CorruptLog) as e:
        recover(str(tmp_path))
    assert e.value.offset == 0 and "offset 0" in str(e.value) and seg in str(e.value)
    assert os.path.getsize(seg) == size  # refused, not cut
    assert recover(str(tmp_path), repair=True) == 0  # repair cuts at the bad block
    assert list(read_all(str(tmp_path))) == []


def test_recovery_reads_only_the_tail_segment(tmp_path):
    for _ in range(5):
        write(tmp_path, [50], segment_bytes=2000, compress=False)
    segs = segments(str(tmp_path))
    with open(segs[0], "r+b") as f:  # damage in a closed segment is not start-up's business
        f.seek(40)
        f.write(b"\xff\xff")
    assert recover(str(tmp_path)) == 250


def test_fsync_error_stops_acknowledging_until_a_fresh_segment_syncs(tmp_path):
    """EIO from fdatasync: the block's requests and every later one are refused, the refused
    block is cut, and acknowledging resumes only once a real block was written and synced into
    a fresh segment (the old file's cached pages prove nothing after a failed fsync)."""
    broken = {"on": True}

    def sync(fd):
        if broken["on"]:
            raise OSError(errno.EIO, "Input/output error")
        os.fdatasync(fd)

    async def main():
        p = Partition(str(tmp_path))
        assert await p.append([b"ok"]) == 0
        p.writer.sync = sync
        with pytest.raises(LogUnavailable):
            await p.append([b"lost"])
        with pytest.raises(LogUnavailable):
            p.append([b"refused"])
        assert not p.probe()  # still failing: still refusing
        broken["on"] = False  # the disk is back
        assert p.probe()
        assert await p.append([b"again"]) >= 1
        p.close()
    asyncio.new_event_loop().run_until_complete(main())
    assert [p for _, p in read_all(str(tmp_path))] == [b"ok", b"again"]  # the refused block is not there
    assert len(segments(str(tmp_path))) == 2  # acknowledging resumed in a fresh segment


def test_a_failed_cut_back_is_applied_at_recovery(tmp_path):
    """If cutting a refused block back fails too, the good length is recorded and recovery cuts
    there: an event answered 503 never surfaces later."""
    async def main():
        p = Partition(str(tmp_path))
        assert await p.append([b"ok"]) == 0
        seg, good = p.writer.path, p.writer.size
        p.close()
        return seg, good
    seg, good = asyncio.new_event_loop().run_until_complete(main())
    with open(seg, "ab") as f:  # a refused block that stayed in the file
        f.write(b"TGB1" + b"\x00" * 40)
    with open(seg + ".cut", "w") as f:
        f.write(str(good))
    assert recover(str(tmp_path)) == 1 and os.path.getsize(seg) == good and not os.path.exists(seg + ".cut")


def test_durable_mark_follows_the_fsync(tmp_path):
    from tidegate.core.events.eventlog import read_durable
    write(tmp_path, [3])
    seg, off = read_durable(str(tmp_path))
    assert seg == os.path.basename(segments(str(tmp_path))[-1]) and off == os.path.getsize(segments(str(tmp_path))[-1])


def test_retention_by_size_and_age_spares_what_views_still_need(tmp_path):
    for _ in range(6):
        write(tmp_path, [50], segment_bytes=2000, compress=False)
    p = Partition(str(tmp_path), segment_bytes=2000, compress=False)
    segs = segments(str(tmp_path))
    assert len(segs) >= 4
    import os as _os
    # the views are at the third segment: only the first two may go, however small the limit
    kept_from = _os.path.basename(segs[2])
    gone = p.retain(max_bytes=1, max_age=0, applied_before=kept_from)
    assert gone == segs[:2]
    old = segments(str(tmp_path))[0]
    _os.utime(old, (1, 1))
    assert p.retain(max_bytes=0, max_age=3600, applied_before=None) == [old]  # by age
    p.close()


def test_close_writes_what_is_buffered_and_answers_its_waiters(tmp_path):
    """A hand-off closes the partition with appends still waiting for their group commit: they
    are written and acknowledged before the lock goes, never left hanging."""
    async def main():
        p = Partition(str(tmp_path), window=10.0)  # no flush on its own within the test
        futs = [p.append([b"x" * 10]) for _ in range(3)]
        await asyncio.sleep(0)
        p.close()
        return [f.result() for f in futs]
    assert asyncio.new_event_loop().run_until_complete(main()) == [0, 1, 2]
    assert [s for s, _ in read_all(str(tmp_path))] == [0, 1, 2]


def test_repair_cuts_only_the_damaged_segment_and_keeps_the_ones_after_it(tmp_path):
    from tidegate.core.events.admin import _repair
    for _ in range(5):
        write(tmp_path, [50], segment_bytes=2000, compress=False)
    segs = segments(str(tmp_path))
    assert len(segs) >= 4
    before = {s: os.path.getsize(s) for s in segs}
    with open(segs[0], "r+b") as f:  # one flipped byte in the oldest segment's second block
        f.seek(before[segs[0]] // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    next_seq = _repair(str(tmp_path))
    assert next_seq == 250  # the tail is whole: the log goes on where it was
    assert segments(str(tmp_path)) == segs  # no segment dropped
    assert os.path.getsize(segs[0]) < before[segs[0]]  # cut at the bad block
    assert all(os.path.getsize(s) == before[s] for s in segs[1:])  # the others untouched
    seqs = [s for s, _ in read_all(str(tmp_path))]
    first_kept = int(os.path.basename(segs[1])[:-4])
    assert seqs[-1] == 249 and list(range(first_kept, 250)) == seqs[seqs.index(first_kept):]


class _FailingOs:
    """os for ext/logwriter, failing the nth call of one function (one step of a segment roll)."""

    def __init__(self, name: str, nth: int):
        self.name, self.nth, self.calls = name, nth, 0

    def __getattr__(self, attr):
        real = getattr(os, attr)
        if attr != self.name:
            return real

        def maybe_fail(*a, **kw):
            self.calls += 1
            if self.calls == self.nth:
                raise OSError(errno.EIO, f"injected {attr} failure")
            return real(*a, **kw)
        return maybe_fail


@pytest.mark.parametrize("step, nth", [("open", 1), ("fstat", 1), ("open", 2), ("fsync", 1)])
def test_a_failed_segment_roll_neither_fails_a_durable_block_nor_writes_through_a_closed_descriptor(
        tmp_path, monkeypatch, step, nth):
    """Rolling to a new segment after a block: opening it, its size, the directory, the
    directory's fsync. The block was durable before the roll: it is answered, and the writer
    stays on a segment it really holds (once it wrote the next block into whatever file reused
    the closed descriptor's number)."""
    from tidegate.ext import logwriter
    write(tmp_path, [50], segment_bytes=2000, compress=False)  # one full segment: the next block rolls
    bystander = tmp_path.parent / f"bystander-{step}-{nth}"

    async def main():
        p = Partition(str(tmp_path), segment_bytes=2000, compress=False)
        monkeypatch.setattr(logwriter, "os", _FailingOs(step, nth))
        first = await p.append([b"x" * 100 for _ in range(30)])  # fills the segment it opened: the roll fails
        monkeypatch.setattr(logwriter, "os", os)
        with open(bystander, "wb") as f:  # takes the lowest free descriptor number
            f.write(b"")
            second = await p.append([b"y" * 100 for _ in range(5)])
        p.close()
        return first, second, p.stats
    first, second, stats = asyncio.new_event_loop().run_until_complete(main())
    assert stats["log_write_errors"] == 0 and (first, second) == (50, 80)
    assert [s for s, _ in read_all(str(tmp_path))] == list(range(85))  # all there, once each
    assert bystander.read_bytes() == b""
