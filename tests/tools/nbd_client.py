#!/usr/bin/python3
"""A small NBD client on libnbd (Debian's python3-libnbd) for the tests.

usage: nbd_client.py URI info
       nbd_client.py URI pwrite OFFSET HEX [fua]
       nbd_client.py URI pread OFFSET LENGTH            (prints hex)
       nbd_client.py URI blocks SEED BLOCK...          (64 KiB blocks, then a flush)
       nbd_client.py URI writer SEED QD SLOTS SLOT_SIZE [SECONDS [MIN_ACKS]]
"blocks" writes each 64 KiB block number BLOCK with random.Random(SEED * 1000003 +
BLOCK).randbytes(65536), so that two runs with the same arguments write the same bytes.
The writer issues random writes, never two at once into the same slot, and prints
"I counter slot offset length" before issuing and "A counter" when acknowledged;
the data of a write is random.Random(counter).randbytes(length). It runs until SECONDS
pass and at least MIN_ACKS writes were acknowledged (so a test that needs some number of
writes gets them on a slow, busy machine too), the server goes away, or SIGINT (also when
started from a shell that ignores SIGINT for background jobs: the handler is set here).
"""

import random
import signal
import sys
import time

import nbd


def connect(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def writer(h, seed, qd, slots, slot_size, seconds, min_acks=0):
    rng = random.Random(seed)
    size = h.get_size()
    slots = min(slots, size // slot_size)
    inflight = {}
    busy = set()
    counter = seed * 10_000_000
    out = sys.stdout
    deadline = time.monotonic() + seconds
    acked = 0
    try:
        while time.monotonic() < deadline or acked < min_acks:
            while len(inflight) < qd:
                slot = rng.randrange(slots)
                if slot in busy:
                    continue
                if rng.random() < 0.1:  # byte-granular: exercises read-modify-write
                    start = rng.randrange(slot_size - 1)
                    length = rng.randrange(1, slot_size - start + 1)
                else:
                    start = rng.randrange(slot_size // 512) * 512
                    length = rng.randrange(1, (slot_size - start) // 512 + 1) * 512
                counter += 1
                data = random.Random(counter).randbytes(length)
                off = slot * slot_size + start
                out.write(f"I {counter} {slot} {off} {length}\n")
                out.flush()
                cookie = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off)
                inflight[cookie] = (counter, slot)
                busy.add(slot)
            h.poll(-1)
            for cookie in list(inflight):
                if h.aio_command_completed(cookie):
                    c, slot = inflight.pop(cookie)
                    busy.discard(slot)
                    acked += 1
                    out.write(f"A {c}\n")
            out.flush()
    except nbd.Error as exc:
        out.write(f"E {exc}\n")
        out.flush()
        return 0
    except KeyboardInterrupt:  # stopped: what was acknowledged is printed
        return 0
    return 0


def main(argv):
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job ignores it
    uri, cmd = argv[1], argv[2]
    h = connect(uri)
    if cmd == "info":
        print(h.get_size(), h.can_flush(), h.can_fua(), h.can_trim(), h.can_multi_conn())
    elif cmd == "pwrite":
        flags = nbd.CMD_FLAG_FUA if len(argv) > 5 and argv[5] == "fua" else 0
        h.pwrite(bytes.fromhex(argv[4]), int(argv[3]), flags)
        h.flush()
    elif cmd == "blocks":
        seed = int(argv[3])
        for i in map(int, argv[4:]):
            h.pwrite(random.Random(seed * 1000003 + i).randbytes(65536), i * 65536)
        h.flush()
    elif cmd == "pread":
        print(h.pread(int(argv[4]), int(argv[3])).hex())
    elif cmd == "writer":
        seconds = float(argv[7]) if len(argv) > 7 else 1e9
        min_acks = int(argv[8]) if len(argv) > 8 else 0
        return writer(h, int(argv[3]), int(argv[4]), int(argv[5]), int(argv[6]), seconds,
                      min_acks)
    else:
        print(f"unknown command {cmd}", file=sys.stderr)
        return 2
    h.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
