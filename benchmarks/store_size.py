"""Size, write and read speed of the trajectory store's on-disk options.

Run: ``python benchmarks/store_size.py [--rows 1600000] [--repeats 3]``.

The data are synthetic but shaped like a recorded run: one append per optimizer
step (a micro-batch of 8 examples), example ids increasing through each epoch of a
4096-example dataset, 32-1024 response tokens per example (log-normal, median
about 200) at contiguous positions after a 20-200 token prompt, and float32 log-probs
that are mostly near 0 with a long negative tail (random mantissas, as real ones
have). The options, all written to and read from a temporary directory:

- ``t3s ipc, none``: the store's writer and reader (`t3s.TrajectoryWriter` /
  `t3s.TrajectoryReader`, per-batch CRC32, seal, verification) with
  ``compression=None``, the format before compression;
- ``t3s ipc, zstd`` / ``t3s ipc, lz4``: the same with compressed message bodies;
- ``pyarrow ipc, none`` / ``zstd``: a plain ``pyarrow.ipc`` stream of the same
  batches, without the store's checks (what the checks cost);
- ``parquet parts, zstd``: one Parquet file per 100 steps (and rank), written
  whole under a temporary name and renamed, page checksums on write, read through
  ``pyarrow.dataset`` with page checksum verification.

Each time is the best of ``--repeats`` rounds (the machine may be shared). Only
public pyarrow and t3s APIs and ``time`` are used.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

REPO = str(Path(__file__).resolve().parents[1])
if REPO not in sys.path:  # `python benchmarks/store_size.py` imports this checkout's t3s
    sys.path.insert(0, REPO)

import t3s  # noqa: E402
from t3s.trajectory.shards import trajectory_schema  # noqa: E402

FINGERPRINT = "store-size-benchmark"
STEPS_PER_PART = 100


def synthetic_batches(rows: int, seed: int = 0):
    """Record batches shaped like one rank's trajectory, about `rows` rows in all."""
    rng = np.random.default_rng(seed)
    schema = trajectory_schema()
    batches, total, step, next_id, dataset = [], 0, 0, 0, 4096
    while total < rows:
        ids, pos = [], []
        for _ in range(8):
            n = int(np.clip(rng.lognormal(np.log(200), 0.7), 32, 1024))
            prompt = int(rng.integers(20, 200))
            ids.append(np.full(n, next_id % dataset, np.int64))
            pos.append(np.arange(prompt, prompt + n, dtype=np.int32))
            next_id += 1
        eid, position = np.concatenate(ids), np.concatenate(pos)
        n = eid.shape[0]
        # most tokens are confident (log p near 0); some are not (a long tail)
        confident = rng.random(n) < 0.8
        logprob = np.where(confident, -rng.exponential(0.05, n),
                           -rng.exponential(2.5, n)).astype(np.float32)
        batches.append(pa.record_batch(
            [pa.array(np.full(n, step, np.int32)), pa.array(eid), pa.array(position),
             pa.array(logprob)], schema=schema))
        total += n
        step += 1
    return batches


def du(directory: Path) -> int:
    """Bytes of every file under `directory`."""
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- writers
def write_t3s(directory: Path, batches, compression):
    with t3s.TrajectoryWriter(directory, dataset_fingerprint=FINGERPRINT, rank=0, world_size=1,
                              compression=compression) as writer:
        for b in batches:
            writer.append(b.column(0), b.column(1), b.column(2), b.column(3))


def read_t3s(directory: Path) -> pa.Table:
    return t3s.TrajectoryReader(directory, dataset_fingerprint=FINGERPRINT).read()


def write_plain_ipc(directory: Path, batches, compression):
    directory.mkdir(parents=True, exist_ok=True)
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.OSFile(str(directory / "rank0.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, batches[0].schema, options=options) as stream:
        for b in batches:
            stream.write_batch(b)


def read_plain_ipc(directory: Path) -> pa.Table:
    with pa.OSFile(str(directory / "rank0.arrow"), "r") as source:
        return pa.ipc.open_stream(source).read_all()


def write_parquet_parts(directory: Path, batches, compression="zstd"):
    # A part file can only be written whole, so a writer keeps a step range's rows in
    # memory until the range ends (a crash loses the range in flight).
    directory.mkdir(parents=True, exist_ok=True)
    for first in range(0, len(batches), STEPS_PER_PART):
        part = pa.Table.from_batches(batches[first:first + STEPS_PER_PART])
        final = directory / f"rank00000-steps{first:08d}.parquet"
        tmp = directory / f".{final.name}.tmp"
        pq.write_table(part, tmp, compression=compression, write_page_checksum=True)
        os.replace(tmp, final)


def read_parquet_parts(directory: Path) -> pa.Table:
    fmt = ds.ParquetFileFormat(default_fragment_scan_options=ds.ParquetFragmentScanOptions(
        page_checksum_verification=True))
    return ds.dataset(str(directory), format=fmt).to_table()


OPTIONS = {
    "t3s ipc, none (before)": (lambda d, b: write_t3s(d, b, None), read_t3s),
    "t3s ipc, zstd": (lambda d, b: write_t3s(d, b, "zstd"), read_t3s),
    "t3s ipc, lz4": (lambda d, b: write_t3s(d, b, "lz4"), read_t3s),
    "pyarrow ipc, none (no checks)": (lambda d, b: write_plain_ipc(d, b, None), read_plain_ipc),
    "pyarrow ipc, zstd (no checks)": (lambda d, b: write_plain_ipc(d, b, "zstd"),
                                      read_plain_ipc),
    "parquet parts, zstd": (write_parquet_parts, read_parquet_parts),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_600_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    batches = synthetic_batches(args.rows)
    reference = pa.Table.from_batches(batches)
    raw = sum(c.nbytes for c in reference.columns)
    print(f"{reference.num_rows:,} rows in {len(batches)} appends; "
          f"{raw / 2**20:.1f} MiB of raw column values")
    print(f"| option | MiB | x of raw | write s | read s |")
    print(f"|---|---:|---:|---:|---:|")
    root = Path(tempfile.mkdtemp(prefix="t3s-store-size-"))
    try:
        results = {name: [None, [], []] for name in OPTIONS}
        for _ in range(args.repeats):  # interleaved rounds: a noisy neighbour hits all
            for name, (write, read) in OPTIONS.items():
                directory = root / name.replace(" ", "_").replace(",", "")
                shutil.rmtree(directory, ignore_errors=True)
                t0 = time.perf_counter()
                write(directory, batches)
                t1 = time.perf_counter()
                table = read(directory)
                t2 = time.perf_counter()
                if not table.sort_by([("step", "ascending")]).equals(
                        reference.sort_by([("step", "ascending")])):
                    raise AssertionError(f"{name}: read back differs from what was written")
                results[name][0] = du(directory)
                results[name][1].append(t1 - t0)
                results[name][2].append(t2 - t1)
        for name, (size, writes, reads) in results.items():
            print(f"| {name} | {size / 2**20:.1f} | {size / raw:.2f} | {min(writes):.2f} | "
                  f"{min(reads):.2f} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
