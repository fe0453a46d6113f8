#!/usr/bin/env python3
"""Which B-trees a SQLite file's commits write, read from its WAL.

Usage: orderbench/scripts/wal-pages.py DATA_DIR/orchestrator.db [more.db ...]

Run it while the process that writes the file is up (a clean shutdown
checkpoints the WAL and deletes it). It copies the file and its WAL, reads
the frames of the WAL's current generation (those whose salts are the
header's), groups them into commits (a commit's last frame carries the
database size), and names each frame's page by the table or index it belongs
to (SQLite's dbstat; page 1 is `sqlite_schema`, the header). Every frame is
a page written and synced on the path of whoever waits for that commit.
"""
import collections
import os
import shutil
import sqlite3
import struct
import sys
import tempfile


def frames(wal_path):
    data = open(wal_path, "rb").read()
    if len(data) < 32:
        return []
    page_size = struct.unpack(">I", data[8:12])[0]
    salts = data[16:24]
    out, at = [], 32
    while at + 24 + page_size <= len(data) and data[at + 8:at + 16] == salts:
        page, db_size = struct.unpack(">II", data[at:at + 8])
        out.append((page, db_size))
        at += 24 + page_size
    return out


def report(db):
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "copy.db")
        shutil.copy(db, copy)
        shutil.copy(db + "-wal", copy + "-wal")
        written = frames(copy + "-wal")
        con = sqlite3.connect(copy)
        names = dict((page, name) for name, page in con.execute("SELECT name, pageno FROM dbstat"))
        con.close()
    commits, current = [], []
    for page, db_size in written:
        current.append(names.get(page, "page %d (freed since)" % page))
        if db_size:
            commits.append(current)
            current = []
    print("%s: %d commits, %d frames, %.1f frames per commit"
          % (db, len(commits), sum(map(len, commits)), sum(map(len, commits)) / max(1, len(commits))))
    counts = collections.Counter(name for commit in commits for name in commit)
    for name, n in counts.most_common():
        print("  %-40s %6d  %5.2f per commit" % (name, n, n / len(commits)))
    sizes = collections.Counter(len(c) for c in commits)
    print("  frames per commit: " + ", ".join("%d×%d" % (n, size) for size, n in sorted(sizes.items())))


for path in sys.argv[1:] or sys.exit(__doc__):
    report(path)
