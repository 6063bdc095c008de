#!/usr/bin/python3
# Map a whole NBD export with base:allocation block status, counting extents.
# Used by bench/blockstatus; must run under /usr/bin/python3 (python3-libnbd).
#
# usage: blockstatus-map.py URI [REPEAT]
#   Connects once, maps the export REPEAT times (default 1) and prints, per
#   map, one line: "<seconds> <extents> <data_extents> <data_bytes> <requests>".
#   Requests are capped below 4 GiB (compact headers carry 32-bit lengths).
import sys
import time

import nbd

CHUNK = (4 << 30) - (1 << 20)   # 4 GiB - 1 MiB: aligned, fits in 32 bits


def map_once(h, size):
    st = [0, 0, 0, 0]           # extents, data extents, data bytes, cursor

    def cb(metacontext, offset, entries, err):
        # entries = [len0, flags0, len1, flags1, ...]
        n = len(entries) // 2
        st[0] += n
        pos = offset
        lens = entries[0::2]
        flags = entries[1::2]
        for ln, fl in zip(lens, flags):
            if not (fl & 1):    # not a hole
                st[1] += 1
                st[2] += ln
            pos += ln
        st[3] = pos
        return 0

    off = 0
    reqs = 0
    t0 = time.perf_counter()
    while off < size:
        ln = min(size - off, CHUNK)
        st[3] = off
        h.block_status(ln, off, cb)
        reqs += 1
        if st[3] <= off:
            raise SystemExit(f"no progress at offset {off}")
        off = st[3]
    return time.perf_counter() - t0, st[0], st[1], st[2], reqs


def main():
    uri = sys.argv[1]
    repeat = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    if not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION):
        raise SystemExit("server does not support base:allocation")
    size = h.get_size()
    for _ in range(repeat):
        t, n, nd, db, reqs = map_once(h, size)
        print(f"{t:.6f} {n} {nd} {db} {reqs}", flush=True)
    h.shutdown()


if __name__ == "__main__":
    main()
