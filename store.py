"""The result store: every trained model's logits, one row per run, resumable and shard-safe.

An experiment folder holds one or more *parts*. A part is three files written by exactly one
process: `full.npy` and `ablated.npy`, float16 arrays of shape (rows, n_train, 10) preallocated
with `np.lib.format`, and `meta.json`, which says which run slot each row holds and which rows
are complete. A single process writes the part at the top of the folder, so
`np.load('logits/airbench/full.npy', mmap_mode='r')[i]` is run i's logits. Under torchrun or a
SLURM array, process k of W writes its own part in `shards/k-of-W/`, so no two processes ever
write the same file. `read_experiment` merges all parts.

Crash safety: a row is written with a plain file write and fsync'd *before* meta.json marks it
complete, and meta.json is replaced atomically. A crash at any moment therefore loses at most
the rows in flight, and a half-written row is never counted.

This module needs only numpy, so that viz.py can read results without importing torch.
"""
import contextlib
import hashlib
import json
import os
import shutil
import socket
import sys
import time

import numpy as np

try:
    import fcntl  # POSIX: a lock per part, so that two processes never write the same one
except ImportError:  # Windows: no lock (one process per output folder is then up to the user)
    fcntl = None

ARMS = ('full', 'ablated')
NUM_CLASSES = 10
DTYPE = np.dtype('<f2')  # float16 halves the size; margins are computed in float32 later
FORMAT_VERSION = 1


class StoreError(Exception):
    """A problem with the stored results that the user has to resolve; the message says how."""


# -----------------------------------------------------------------------------
#                                 Small file helpers

def _unique(path):
    """A temporary name next to `path` that no other process uses: tasks on different nodes of a
    cluster write into one shared folder and may have the same process id."""
    return f'{path}.tmp-{socket.gethostname()}-{os.getpid()}'


@contextlib.contextmanager
def _replacing(path, mode):
    """Open a temporary file to be written; on success it is fsync'd and replaces `path`
    (so `path` holds either the old or the new contents, never a mix); on failure it is removed."""
    tmp = _unique(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path, obj):
    with _replacing(path, 'w') as f:
        json.dump(obj, f, indent=1)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise StoreError(f'{path} is truncated or corrupt ({e}); restore it or delete the '
                         f'part folder it belongs to') from None


def sha256_file(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def sources_digest(paths):
    """A short hash of the code that makes the results (the files' contents, in path order)."""
    return hashlib.sha256(b''.join(open(p, 'rb').read() for p in sorted(paths))).hexdigest()[:12]


def save_sources(out, paths):
    """Copy the code that made these results into OUT/source/<hash>/; returns the hash."""
    digest = sources_digest(paths)
    folder = os.path.join(out, 'source', digest)
    os.makedirs(folder, exist_ok=True)
    for p in paths:
        target = os.path.join(folder, os.path.basename(p))
        if not os.path.exists(target):
            tmp = _unique(target)
            shutil.copyfile(p, tmp)
            os.replace(tmp, target)
    return digest


# -----------------------------------------------------------------------------
#                                 One part

def _npy_header(rows, n_train):
    """The .npy header bytes for a (rows, n_train, 10) float16 array."""
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, dict(descr=np.lib.format.dtype_to_descr(DTYPE), fortran_order=False,
                  shape=(rows, n_train, NUM_CLASSES)))
    return buf.getvalue()


def _write_at(path, offset, data):
    """Write bytes into an existing file and fsync. A plain write, not a memmap: on a full disk
    it raises OSError (ENOSPC) instead of killing the process with SIGBUS."""
    with open(path, 'r+b') as f:
        f.seek(offset)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _create_array(path, rows, n_train, copy_rows_from=None):
    """Create (atomically) a zero-filled array file; optionally carry rows over from an old one."""
    header = _npy_header(rows, n_train)
    row_bytes = n_train * NUM_CLASSES * DTYPE.itemsize
    with _replacing(path, 'wb') as f:
        f.write(header)
        f.truncate(len(header) + rows * row_bytes)  # sparse: unwritten rows take no disk
        if copy_rows_from is not None:
            old_path, old_rows = copy_rows_from
            old = np.load(old_path, mmap_mode='r')
            for r in old_rows:
                f.seek(len(header) + r * row_bytes)
                f.write(np.ascontiguousarray(old[r]).tobytes())


def open_array(path, expect_rows=None, expect_n_train=None):
    """Memory-map a stored array read-only, with a clear error if it is damaged."""
    try:
        arr = np.load(path, mmap_mode='r')
    except FileNotFoundError:
        raise StoreError(f'{path} is missing') from None
    except (ValueError, OSError, EOFError) as e:
        why = 'not a .npy array' if 'allow_pickle' in str(e) else str(e)  # numpy's hint misleads
        raise StoreError(f'{path} is truncated or corrupt ({why})') from None
    ok = arr.dtype == DTYPE and arr.ndim == 3 and arr.shape[2] == NUM_CLASSES
    ok = ok and (expect_rows is None or arr.shape[0] >= expect_rows)
    ok = ok and (expect_n_train is None or arr.shape[1] == expect_n_train)
    if not ok:
        raise StoreError(f'{path} has shape {arr.shape} and dtype {arr.dtype}; expected '
                         f'({expect_rows}, {expect_n_train}, {NUM_CLASSES}) float16')
    return arr


class Part:
    """The part of an experiment that one process writes: two arrays and a meta.json."""

    def __init__(self, folder, meta):
        self.folder = folder
        self.meta = meta
        self._lock = None  # set by open_for_writing: the lock file, held while writing

    def close(self):
        """Release the part's lock (also released by the OS when the process ends)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    @property
    def meta_path(self):
        return os.path.join(self.folder, 'meta.json')

    def array_path(self, arm):
        return os.path.join(self.folder, f'{arm}.npy')

    def rows(self, arm):
        return self.meta['rows'][arm]

    def complete_rows(self, arm):
        return [i for i, row in enumerate(self.rows(arm)) if row['complete']]

    def slots_done(self, arm):
        return {row['slot'] for row in self.rows(arm) if row['complete']}

    def _save_meta(self):
        write_json_atomic(self.meta_path, self.meta)

    def add_slots(self, arm, slots):
        """Give this part rows for more run slots, growing its array (used when --runs grows)."""
        old_rows = self.rows(arm)
        new = [s for s in slots if s not in {row['slot'] for row in old_rows}]
        path = self.array_path(arm)
        if not new and os.path.exists(path):
            return
        keep = self.complete_rows(arm) if os.path.exists(path) else []
        _create_array(path, len(old_rows) + len(new), self.meta['n_train'],
                      copy_rows_from=(path, keep) if keep else None)
        old_rows.extend(dict(slot=s, complete=False) for s in new)
        self._save_meta()

    def write_row(self, arm, slot, logits, record):
        """Store one run's logits, then mark it complete. Logits: (n_train, 10), any float dtype."""
        row_index = next(i for i, row in enumerate(self.rows(arm)) if row['slot'] == slot)
        n_train = self.meta['n_train']
        logits = np.ascontiguousarray(np.asarray(logits, dtype=DTYPE))
        assert logits.shape == (n_train, NUM_CLASSES), logits.shape
        offset = len(_npy_header(len(self.rows(arm)), n_train)) + row_index * logits.nbytes
        _write_at(self.array_path(arm), offset, logits.tobytes())
        self.rows(arm)[row_index] = dict(slot=slot, complete=True, **record)
        self._save_meta()


def _part_folder(out, shard, num_shards):
    return out if num_shards == 1 else os.path.join(out, 'shards', f'{shard}-of-{num_shards}')


def find_parts(out):
    """All parts of the experiment in `out`, the top-level one first."""
    folders = [out] if os.path.exists(os.path.join(out, 'meta.json')) else []
    shard_root = os.path.join(out, 'shards')
    if os.path.isdir(shard_root):
        for name in sorted(os.listdir(shard_root)):
            if os.path.exists(os.path.join(shard_root, name, 'meta.json')):
                folders.append(os.path.join(shard_root, name))
    parts = []
    for folder in folders:
        meta = read_json(os.path.join(folder, 'meta.json'))
        if not isinstance(meta, dict) or meta.get('format') != FORMAT_VERSION or 'rows' not in meta:
            raise StoreError(f'{folder}/meta.json is not a meta.json written by this code')
        parts.append(Part(folder, meta))
    return parts


def config_differences(stored, current, ignore=()):
    """Human-readable differences between two configs, skipping keys that may change."""
    keys = sorted((set(stored) | set(current)) - set(ignore))
    return [f'{k}: stored {stored.get(k, "<absent>")!r}, now {current.get(k, "<absent>")!r}'
            for k in keys if stored.get(k, '<absent>') != current.get(k, '<absent>')]


# -----------------------------------------------------------------------------
#                                 Opening an experiment for writing

def human_bytes(n):
    return f'{n / 1e9:.2f} GB' if n >= 1e9 else f'{n / 1e6:.1f} MB'


_NO_LOCKS = []  # set once the filesystem has refused a lock: said once, then parts go unlocked


def _lock_part(folder):
    """An exclusive lock on folder/.lock, held while this process writes the part, so that a
    second process (a duplicate launch, a requeued task whose first run is still alive) is
    refused instead of training the same slots and overwriting rows. Released when the file is
    closed or the process dies, kill -9 included. Returns the open file, or None without locks."""
    if fcntl is None or _NO_LOCKS:
        return None
    os.makedirs(folder, exist_ok=True)
    f = open(os.path.join(folder, '.lock'), 'a+')
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or 'another process'
        f.close()
        raise StoreError(f'{folder} is being written by {holder}: wait for it to finish, or use '
                         f'another --out') from None
    except OSError as e:  # a filesystem without locks (some network filesystems)
        f.close()
        _NO_LOCKS.append(e)
        print(f'note: {folder} cannot be locked ({e.strerror or e}); make sure that only one '
              f'process writes each part', file=sys.stderr, flush=True)
        return None
    f.seek(0)
    f.truncate()
    f.write(f'pid {os.getpid()} on {socket.gethostname()}')
    f.flush()
    return f


def ensure_writable(out):
    """Create the output folder and check that files can be written there, or raise."""
    probe = _unique(os.path.join(out, '.write-test'))
    try:
        os.makedirs(out, exist_ok=True)
        with open(probe, 'w') as f:
            f.write('ok')
        os.remove(probe)
    except OSError as e:
        raise StoreError(f'output folder {out} cannot be written: {e.strerror or e}') from None


def open_for_writing(out, config, n_train, runs, shard=0, num_shards=1, ignore_keys=(),
                     session=None, labels=None):
    """Open (or create) this process's part, and return it with the (arm, slot) pairs to train.

    labels: the class labels of the excluded examples, {index: label}, kept so that viz.py can
    compute margins without loading the dataset.
    Run slots 0..runs-1 exist in each arm; this process takes the slots s with
    s % num_shards == shard that no other part has completed. Runs are alternated between arms
    (full 0, ablated 0, full 1, ...) so that a partial experiment stays balanced.

    The part is locked for this process (Part.close() releases it). Its own earlier part is
    replaced when it holds no complete row (a launch that failed before its first run must not
    lock the folder to its settings); any part with results must have the same settings, and
    a refusal leaves the stored results as they were.
    """
    ensure_writable(out)
    folder = _part_folder(out, shard, num_shards)
    lock = _lock_part(folder)
    try:
        return _open_locked(out, folder, lock, config, n_train, runs, shard, num_shards,
                            ignore_keys, session, labels)
    except BaseException:
        if lock is not None:
            lock.close()
        raise


def _open_locked(out, folder, lock, config, n_train, runs, shard, num_shards, ignore_keys,
                 session, labels):
    parts = find_parts(out)
    mine = next((p for p in parts if os.path.abspath(p.folder) == os.path.abspath(folder)), None)
    if mine is not None and not any(mine.complete_rows(arm) for arm in ARMS):
        parts.remove(mine)  # no results: start this part afresh, with the current settings
        mine = None
    for part in parts:
        diff = config_differences(part.meta['config'], config, ignore_keys)
        if diff:
            raise StoreError(f'{part.meta_path} was made with different settings: '
                             + '; '.join(diff) + '. Use another --out, or restore the settings.')
        if part.meta['n_train'] != n_train:
            raise StoreError(f'{part.meta_path} stores {part.meta["n_train"]} training images, '
                             f'the data now has {n_train}')
    done_elsewhere = {arm: set().union(*(p.slots_done(arm) for p in parts if p is not mine))
                      for arm in ARMS}
    wanted = {arm: [s for s in range(runs) if s % num_shards == shard
                    and s not in done_elsewhere[arm]] for arm in ARMS}
    done_here = {arm: mine.slots_done(arm) if mine else set() for arm in ARMS}
    todo = [(arm, s) for s in range(runs) for arm in ARMS
            if s in wanted[arm] and s not in done_here[arm]]
    need = len(todo) * n_train * NUM_CLASSES * DTYPE.itemsize
    free = shutil.disk_usage(out).free
    if need > free:
        raise StoreError(f'{folder} needs {human_bytes(need)} for {len(todo)} rows but the disk '
                         f'has {human_bytes(free)} free')

    if mine is None:
        os.makedirs(folder, exist_ok=True)
        mine = Part(folder, dict(format=FORMAT_VERSION, config=config, n_train=n_train,
                                 labels={str(i): int(y) for i, y in (labels or {}).items()},
                                 sessions=[], rows={arm: [] for arm in ARMS}))
    # The latest settings: they differ from the stored ones in ignore_keys only (a raised
    # --runs, another --device, ...); each session's own command stays in 'sessions'. A
    # lowered --runs trains nothing and removes nothing, so the stored runs never fall below
    # the slots this part holds.
    held = max((row['slot'] + 1 for arm in ARMS for row in mine.rows(arm)), default=0)
    mine.meta['config'] = dict(config, runs=max(config['runs'], held))
    mine._lock = lock
    if session is not None:
        mine.meta['sessions'].append(dict(session, started=time.strftime('%Y-%m-%dT%H:%M:%S'),
                                          host=socket.gethostname(), pid=os.getpid()))
    mine._save_meta()  # before growing the arrays: a meta.json without rows is a valid part
    for arm in ARMS:
        mine.add_slots(arm, wanted[arm])
        open_array(mine.array_path(arm), len(mine.rows(arm)), n_train)  # fail early if damaged
    return mine, todo


# -----------------------------------------------------------------------------
#                                 Reading an experiment

def read_experiment(out):
    """The config and the complete runs of each arm, merged over all parts.

    Returns (meta, runs): meta is the first part's meta.json (config, labels, n_train) and
    runs[arm] a list of dicts (the row record plus 'part' and
    'row'), sorted by slot. A slot completed by two parts (possible only when two launches with
    different shard counts overlapped) is counted once.
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise StoreError(f'{out} is a file, not an experiment folder (such as logits/airbench)')
    if not os.path.isdir(out):
        raise StoreError(f'{out} does not exist; train first (python trainer_airbench.py)')
    parts = find_parts(out)
    if not parts:
        raise StoreError(f'{out} holds no meta.json: it is not an experiment folder, or no run '
                         f'has started there yet')
    runs = {}
    for arm in ARMS:
        seen = {}
        for part in parts:
            for i in part.complete_rows(arm):
                row = part.rows(arm)[i]
                seen.setdefault(row['slot'], dict(row, arm=arm, part=part, row=i))
        runs[arm] = [seen[s] for s in sorted(seen)]
    return parts[0].meta, runs


def gather_logits(runs, columns):
    """Logits of the given runs at the given training-image columns: (len(runs), len(columns), 10).

    Reads only those columns, with positioned reads rather than a memory map: mapped pages
    count towards the reader's resident memory (a 40-column read of two 1 GB arms through
    np.memmap peaked at 1 GB), while read() leaves them in the page cache only.
    """
    columns = np.asarray(columns)
    out = np.empty((len(runs), len(columns), NUM_CLASSES), DTYPE)
    by_file = {}
    for i, run in enumerate(runs):
        key = (run['part'].folder, run['arm'])
        by_file.setdefault(key, (run['part'], run['arm'], []))[2].append((i, run['row']))
    for part, arm, pairs in by_file.values():
        path = part.array_path(arm)
        arr = open_array(path, len(part.rows(arm)), part.meta['n_train'])  # checks the file
        dest, rows = map(np.array, zip(*pairs))
        out[dest] = _read_columns(path, arr.offset, arr.shape[1], rows, columns)
    return out


def _read_columns(path, header_bytes, n_train, rows, columns):
    """arr[rows][:, columns] of a stored array, one read per run of consecutive columns."""
    cell = NUM_CLASSES * DTYPE.itemsize  # bytes of one image's logits
    order = np.argsort(columns, kind='stable')
    ordered = columns[order]
    spans = np.split(ordered, np.flatnonzero(np.diff(ordered) != 1) + 1)
    out = np.empty((len(rows), len(columns), NUM_CLASSES), DTYPE)
    with open(path, 'rb') as f:
        for i, row in enumerate(rows):
            start = header_bytes + int(row) * n_train * cell
            chunk = b''.join(os.pread(f.fileno(), len(span) * cell, start + int(span[0]) * cell)
                             for span in spans if len(span))
            out[i, order] = np.frombuffer(chunk, DTYPE).reshape(len(columns), NUM_CLASSES)
    return out
