#!/usr/bin/python3
"""An NBD writer for power-loss tests, on libnbd (Debian's python3-libnbd).

usage: powerloss_writer.py URI SEED SMALL_REGION [QD]

Writes until the server goes away, never two commands in flight over the same 4 KiB
block, a mix of
  - small random writes: one 4 KiB block anywhere in [0, SMALL_REGION),
  - big sequential writes: 1 MiB at a time through [SMALL_REGION, device size), wrapping,
each with NBD_CMD_FLAG_FUA now and then, and NBD_CMD_FLUSH in between. It prints, in the
order it saw them:
  W counter offset length fua    before issuing a write (data: random.Random(counter))
  A counter                      the write was acknowledged
  X counter                      the write failed
  F n                            before issuing a flush; it covers every write acked above
  FA n                           the flush was acknowledged
  E message                      the connection broke (the server died): the end
"""

import random
import sys

import nbd

BLOCK = 4096
BIG = 1 << 20


def main(argv):
    uri, seed, small_region = argv[1], int(argv[2]), int(argv[3])
    qd = int(argv[4]) if len(argv) > 4 else 8
    rng = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    out = sys.stdout
    busy = set()  # blocks under a write in flight
    inflight = {}  # cookie -> (kind, id, blocks, buffer)
    counter = seed * 1_000_000
    flushes = 0
    cursor = small_region
    try:
        while True:
            while len(inflight) < qd:
                roll = rng.random()
                if roll < 0.08:
                    flushes += 1
                    out.write(f"F {flushes}\n")
                    cookie = h.aio_flush()
                    inflight[cookie] = ("F", flushes, (), None)
                    continue
                if roll < 0.25:
                    if cursor + BIG > size:
                        cursor = small_region
                    off, length = cursor, BIG
                else:
                    off, length = rng.randrange(small_region // BLOCK) * BLOCK, BLOCK
                blocks = range(off // BLOCK, (off + length) // BLOCK)
                if any(b in busy for b in blocks):
                    break  # wait for a completion first
                if length == BIG:
                    cursor += BIG
                fua = rng.random() < 0.3
                counter += 1
                data = random.Random(counter).randbytes(length)
                out.write(f"W {counter} {off} {length} {int(fua)}\n")
                out.flush()
                buf = nbd.Buffer.from_bytearray(bytearray(data))  # alive until completed
                cookie = h.aio_pwrite(buf, off, flags=nbd.CMD_FLAG_FUA if fua else 0)
                inflight[cookie] = ("W", counter, blocks, buf)
                busy.update(blocks)
            out.flush()
            h.poll(-1)
            for cookie in list(inflight):
                try:
                    done = h.aio_command_completed(cookie)
                except nbd.Error:
                    done, ok = True, False
                else:
                    ok = True
                if not done:
                    continue
                kind, ident, blocks, _ = inflight.pop(cookie)
                busy.difference_update(blocks)
                if kind == "F":
                    out.write(f"FA {ident}\n" if ok else f"FX {ident}\n")
                else:
                    out.write(f"A {ident}\n" if ok else f"X {ident}\n")
            if h.aio_is_dead() or h.aio_is_closed():
                raise nbd.Error("connection dead", 0)
    except nbd.Error as exc:
        out.write(f"E {exc}\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
