"""Faults injected on purpose: kill/terminate, shards, extension, full disk, divergence, damaged
files and bad settings. Nothing finished may be lost, and each error is one clear line."""
import errno
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import airbench
import store
import trainer_airbench
import trainer_madry
import viz
from conftest import AIRBENCH_TINY, REPO, read_meta, tiny_args

def args_for(tiny_data, out, **kw):
    return tiny_args(tiny_data, out, **{**AIRBENCH_TINY, **kw})


def wait_for_complete_row(folder, proc, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if any(r['complete'] for r in read_meta(folder)['rows']['full']):
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    raise AssertionError('no run completed in time')


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])  # preemption, Ctrl-C
def test_a_stop_signal_abandons_the_run_in_flight_then_resume_completes(tiny_data, tmp_path,
                                                                         signum):
    out = str(tmp_path / 'exp')
    command = [sys.executable, 'trainer_airbench.py', *args_for(tiny_data, out, runs=3,
                                                                epochs=40.0)]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_for_complete_row(out, proc)
    t0 = time.time()
    proc.send_signal(signum)
    stderr = proc.communicate(timeout=60)[1]
    assert time.time() - t0 < 20  # it did not wait for the whole experiment
    assert proc.returncode == 128 + signum
    assert f'stopped by {signal.Signals(signum).name}' in stderr and 'Traceback' not in stderr
    meta = read_meta(out)
    done = sum(r['complete'] for arm in store.ARMS for r in meta['rows'][arm])
    assert 1 <= done < 6
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert all(r['complete'] for arm in store.ARMS for r in read_meta(out)['rows'][arm])


def test_two_shards_write_disjoint_parts_that_viz_merges(tiny_data, tmp_path, capsys):
    out = str(tmp_path / 'exp')
    command = [sys.executable, 'trainer_airbench.py', *args_for(tiny_data, out, runs=3)]
    procs = [subprocess.Popen(command, cwd=REPO, env={**os.environ, 'RANK': str(rank),
                                                       'WORLD_SIZE': '2', 'LOCAL_RANK': str(rank)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    slots = {rank: read_meta(os.path.join(out, 'shards', f'{rank}-of-2'))['rows']['full']
             for rank in (0, 1)}
    assert [r['slot'] for r in slots[0]] == [0, 2] and [r['slot'] for r in slots[1]] == [1]
    assert not os.path.exists(os.path.join(out, 'full.npy'))  # nobody wrote the top-level part
    exp = viz.load(out)
    for arm in store.ARMS:
        assert [r['slot'] for r in exp['runs'][arm]] == [0, 1, 2]
        assert exp['margins'][arm].shape == (3, 4)
    viz.main([out, '--all'])
    assert '3 full and 3 ablated runs' in capsys.readouterr().out
    # A single process later finds everything done and trains nothing more.
    trainer_airbench.main(args_for(tiny_data, out, runs=3))
    assert read_meta(out)['rows'] == {'full': [], 'ablated': []}
    assert [r['slot'] for r in viz.load(out)['runs']['full']] == [0, 1, 2]


def test_slurm_array_and_torchrun_shares(monkeypatch):
    for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'SLURM_ARRAY_TASK_ID',
                'SLURM_ARRAY_TASK_COUNT', 'SLURM_ARRAY_TASK_MIN'):
        monkeypatch.delenv(key, raising=False)
    assert airbench.shard_from_env() == (0, 1, 0)
    monkeypatch.setenv('SLURM_ARRAY_TASK_ID', '7')
    monkeypatch.setenv('SLURM_ARRAY_TASK_COUNT', '64')
    monkeypatch.setenv('SLURM_ARRAY_TASK_MIN', '0')
    assert airbench.shard_from_env() == (7, 64, 0)
    monkeypatch.setenv('RANK', '3')
    monkeypatch.setenv('WORLD_SIZE', '8')
    monkeypatch.setenv('LOCAL_RANK', '3')
    assert airbench.shard_from_env() == (7 * 8 + 3, 64 * 8, 3)


def test_raising_runs_extends_the_experiment(tiny_data, tmp_path):
    out = str(tmp_path / 'exp')
    trainer_airbench.main(args_for(tiny_data, out, runs=1))
    first = np.load(os.path.join(out, 'ablated.npy'))[0].copy()
    trainer_airbench.main(args_for(tiny_data, out, runs=3))
    grown = np.load(os.path.join(out, 'ablated.npy'), mmap_mode='r')
    assert grown.shape == (3, 300, 10)
    assert grown[0].tobytes() == first.tobytes()
    assert [r['slot'] for r in read_meta(out)['rows']['ablated']] == [0, 1, 2]
    assert all(r['complete'] for r in read_meta(out)['rows']['ablated'])
    assert read_meta(out)['config']['runs'] == 3  # the stored settings say so too
    # a lowered --runs trains and removes nothing, and the stored settings still say 3
    trainer_airbench.main(args_for(tiny_data, out, runs=1))
    assert read_meta(out)['config']['runs'] == 3 and len(read_meta(out)['rows']['full']) == 3


def test_full_disk_while_writing_a_row_keeps_the_store_usable(tiny_data, tmp_path, monkeypatch):
    out = str(tmp_path / 'exp')
    real_write = store._write_at
    calls = []

    def write_then_fail(path, offset, data):
        calls.append(path)
        if len(calls) == 2:  # the second row: half of it reaches the disk, then the disk is full
            real_write(path, offset, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, 'No space left on device')
        real_write(path, offset, data)

    monkeypatch.setattr(store, '_write_at', write_then_fail)
    with pytest.raises(SystemExit, match='No space left on device.*rerun the same command'):
        trainer_airbench.main(args_for(tiny_data, out, runs=2))
    meta = read_meta(out)
    assert [r['complete'] for r in meta['rows']['full']] == [True, False]
    assert [r['complete'] for r in meta['rows']['ablated']] == [False, False]
    assert len(viz.load(out)['runs']['full']) == 1  # still readable
    kept = np.load(os.path.join(out, 'full.npy'))[0].copy()
    monkeypatch.setattr(store, '_write_at', real_write)
    trainer_airbench.main(args_for(tiny_data, out, runs=2))
    assert all(r['complete'] for arm in store.ARMS for r in read_meta(out)['rows'][arm])
    assert np.load(os.path.join(out, 'full.npy'))[0].tobytes() == kept.tobytes()


def test_diverged_runs_are_recorded_and_skipped_by_viz(tiny_data, tmp_path, capsys):
    out = str(tmp_path / 'exp')
    trainer_airbench.main(args_for(tiny_data, out, runs=2, lr=1e12))  # logits become nan/inf
    meta = read_meta(out)
    assert all(r['status'] == 'diverged' for arm in store.ARMS for r in meta['rows'][arm])
    capsys.readouterr()
    viz.main([out, '--all'])
    printed = capsys.readouterr().out
    assert 'skipped 4 diverged runs (2 full, 2 ablated)' in printed
    assert '0 full and 0 ablated runs' in printed


def test_near_chance_accuracy_counts_as_diverged(tiny_data, tmp_path, monkeypatch):
    out = str(tmp_path / 'exp')
    # injected: every model scores 0.11 on the test set, near chance (0.1 on 10 classes)
    monkeypatch.setattr(airbench, 'accuracy',
                        lambda logits, labels: torch.full((logits.shape[0],), 0.11))
    trainer_airbench.main(args_for(tiny_data, out, runs=1,
                                   min_test_acc=trainer_airbench.MIN_TEST_ACC))  # 0.2
    meta = read_meta(out)
    assert all(r['test_acc'] == pytest.approx(0.11) for arm in store.ARMS
               for r in meta['rows'][arm])
    assert all(r['status'] == 'diverged' for arm in store.ARMS for r in meta['rows'][arm])


def test_damaged_files_are_named(tiny_data, tmp_path):
    out = str(tmp_path / 'exp')
    trainer_airbench.main(args_for(tiny_data, out, runs=2))
    array = os.path.join(out, 'full.npy')
    with open(array, 'r+b') as f:
        f.truncate(os.path.getsize(array) // 2)
    with pytest.raises(SystemExit, match='full.npy is truncated or corrupt'):
        viz.main([out])
    with pytest.raises(SystemExit, match='full.npy is truncated or corrupt'):
        trainer_airbench.main(args_for(tiny_data, out, runs=2))
    with open(os.path.join(out, 'meta.json'), 'w') as f:
        f.write('{"format": 1, "rows": ')
    with pytest.raises(SystemExit, match='meta.json is truncated or corrupt'):
        viz.main([out])


def test_viz_reports_what_it_can_with_one_run_or_unequal_arms(tiny_data, tmp_path, capsys):
    out = str(tmp_path / 'exp')
    trainer_airbench.main(args_for(tiny_data, out, runs=1))
    capsys.readouterr()
    viz.main([out, '--all'])
    printed = capsys.readouterr().out
    assert 'fewer than 2 usable runs' in printed and 'Average:' in printed
    trainer_airbench.main(args_for(tiny_data, out, runs=3))
    meta = read_meta(out)
    meta['rows']['ablated'][2]['complete'] = False  # as if the last run was killed
    store.write_json_atomic(os.path.join(out, 'meta.json'), meta)
    viz.main([out, '--all'])
    printed = capsys.readouterr().out
    assert 'the arms are unequal (3 vs 2 runs)' in printed and 'Average:' in printed


@pytest.mark.parametrize('flags,message', [
    (dict(runs=0), '--runs must be at least 1'),
    (dict(batch_size=0), '--batch-size must be at least 1'),
    (dict(epochs=0.0), '--epochs must be positive'),
    (dict(device='mps'), 'only cpu and cuda are supported'),
    (dict(random_indices='[0,0]'), 'duplicated'),
    (dict(easy_indices='[2,300]'), 'out of range'),
    (dict(random_indices='[]', easy_indices='[]'), 'no excluded examples'),
    (dict(epochs=0.1), 'fewer training steps than ema_every'),  # airbench's own check
])
def test_bad_settings_are_refused_in_one_line_and_leave_nothing(tiny_data, tmp_path, flags,
                                                                 message):
    with pytest.raises(SystemExit, match=message):
        trainer_airbench.main(args_for(tiny_data, str(tmp_path / 'exp'), **flags))
    assert not os.path.exists(tmp_path / 'exp')


def test_madry_checks_its_widths_before_writing(tiny_data, tmp_path):
    with pytest.raises(SystemExit, match='widths must be four channel counts'):
        trainer_madry.main(tiny_args(tiny_data, str(tmp_path / 'exp'), widths='[16,32,64]'))
    assert not os.path.exists(tmp_path / 'exp')


def test_a_launch_that_failed_before_its_first_run_does_not_lock_the_settings(tiny_data, tmp_path,
                                                                              monkeypatch):
    out = str(tmp_path / 'exp')
    failing = lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError('out of memory'))
    monkeypatch.setattr(airbench, 'train_and_evaluate', failing)
    with pytest.raises(RuntimeError):
        trainer_airbench.main(args_for(tiny_data, out, runs=1, batch_size=50))
    assert read_meta(out)['config']['batch_size'] == 50 and not read_meta(out)['rows']['full'][0]['complete']
    monkeypatch.undo()
    trainer_airbench.main(args_for(tiny_data, out, runs=1, batch_size=30))  # fixed, accepted
    meta = read_meta(out)
    assert meta['config']['batch_size'] == 30 and meta['rows']['full'][0]['complete']
    # Once a part holds results, its settings hold.
    with pytest.raises(SystemExit, match='batch_size: stored 30, now 50'):
        trainer_airbench.main(args_for(tiny_data, out, runs=1, batch_size=50))


def test_a_second_writer_of_the_same_part_is_refused(tmp_path):
    out = str(tmp_path / 'exp')
    config = dict(runs=1, random_indices=[0], easy_indices=[1])
    first, _ = store.open_for_writing(out, config, 10, 1)
    script = ('import sys, store; '
              'store.open_for_writing(sys.argv[1], dict(runs=1, random_indices=[0], '
              'easy_indices=[1]), 10, 1)')
    other = subprocess.run([sys.executable, '-c', script, out], cwd=REPO, capture_output=True,
                           text=True, timeout=60)
    assert other.returncode == 1 and f'is being written by pid {os.getpid()}' in other.stderr
    first.close()  # released: the next process may write it
    again = subprocess.run([sys.executable, '-c', script, out], cwd=REPO, capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 0, again.stderr


@pytest.mark.parametrize('env,message', [
    (dict(WORLD_SIZE='abc'), 'not a whole number (WORLD_SIZE=abc)'),
    (dict(RANK='2', WORLD_SIZE='2'), 'gives shard 2 of 2: RANK must lie in'),
])
def test_bad_sharding_variables_are_named(monkeypatch, env, message):
    for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'SLURM_ARRAY_TASK_ID',
                'SLURM_ARRAY_TASK_COUNT', 'SLURM_ARRAY_TASK_MIN'):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit, match=re.escape(message)):
        airbench.shard_from_env()


@pytest.mark.parametrize('flag', ['--epoch', '--learning-rate', '--RUNS'])
def test_unknown_or_abbreviated_flags_are_refused(tiny_data, tmp_path, flag, capsys):
    with pytest.raises(SystemExit):
        trainer_airbench.main([flag, '3', '--out', str(tmp_path / 'exp')])
    assert f'unrecognized arguments: {flag} 3' in capsys.readouterr().err
    assert not os.path.exists(tmp_path / 'exp')


def test_unwritable_output_and_missing_batch_file(tiny_data, tmp_path):
    blocker = tmp_path / 'a-file'
    blocker.write_text('not a folder')
    with pytest.raises(SystemExit, match='cannot be written'):
        trainer_airbench.main(args_for(tiny_data, str(blocker / 'exp')))
    os.remove(os.path.join(tiny_data, airbench.FOLDER_NAME, 'data_batch_2'))
    with pytest.raises(SystemExit, match='data_batch_2 is missing'):
        trainer_airbench.main(args_for(tiny_data, str(tmp_path / 'exp')))


def test_cuda_requested_without_cuda_is_one_line_error(tiny_data, tmp_path):
    if airbench.torch.cuda.is_available():
        pytest.skip('this machine has CUDA')
    result = subprocess.run([sys.executable, 'trainer_airbench.py',
                             *args_for(tiny_data, str(tmp_path / 'exp'), device='cuda')],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        result.stderr.strip().splitlines()[-1]]  # exactly one line
    assert 'CUDA is not available' in result.stderr and 'Traceback' not in result.stderr
