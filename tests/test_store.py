"""store.py: rows written one at a time read back exactly, from any subset of columns."""
import numpy as np

import store


def test_gathered_columns_equal_the_stored_rows(tmp_path):
    n_train, runs = 500, 5
    config = dict(runs=runs, random_indices=[0, 1], easy_indices=[2])
    part, todo = store.open_for_writing(str(tmp_path / 'exp'), config, n_train, runs,
                                        labels={0: 1, 1: 2, 2: 3})
    rng = np.random.default_rng(0)
    written = {arm: {} for arm in store.ARMS}
    for arm, slot in todo[:-1]:  # the last run is left unfinished: it must not be read
        logits = rng.normal(0, 5, size=(n_train, 10)).astype(np.float32)
        part.write_row(arm, slot, logits, dict(seed=slot, test_acc=0.5, status='ok'))
        written[arm][slot] = logits.astype(np.float16)
    meta, complete = store.read_experiment(str(tmp_path / 'exp'))
    # unsorted, with runs of consecutive columns and single ones, the first and the last column
    columns = np.array([499, 7, 8, 9, 0, 250, 10, 3, 498])
    for arm in store.ARMS:
        assert [r['slot'] for r in complete[arm]] == sorted(written[arm])
        got = store.gather_logits(complete[arm], columns)
        expected = np.stack([written[arm][r['slot']][columns] for r in complete[arm]])
        assert got.dtype == np.float16 and np.array_equal(got, expected)
        # and the same as numpy's own reading of the file
        rows = [r['row'] for r in complete[arm]]
        on_disk = np.load(part.array_path(arm), mmap_mode='r')[rows][:, columns]
        assert np.array_equal(got, on_disk)
    # Runs of both arms in one call: each is read from its own arm's file.
    mixed = complete['ablated'][:1] + complete['full'] + complete['ablated'][1:]
    got = store.gather_logits(mixed, columns)
    expected = np.stack([written[r['arm']][r['slot']][columns] for r in mixed])
    assert np.array_equal(got, expected)
