"""trainer_airbench.py on a tiny dataset in the official layout: reruns, resume after kill -9,
changed settings, offline (both trainers end to end: test_arms.py)."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import airbench
import trainer_airbench
from conftest import AIRBENCH_TINY, REPO, read_meta, tiny_args


def args_for(tiny_data, out, **kw):
    return tiny_args(tiny_data, out, **{**AIRBENCH_TINY, **kw})


def test_rerun_of_a_finished_experiment_changes_nothing(tiny_data, tmp_path):
    out = str(tmp_path / 'exp')
    trainer_airbench.main(args_for(tiny_data, out, runs=1))
    before = open(os.path.join(out, 'full.npy'), 'rb').read()
    trainer_airbench.main(args_for(tiny_data, out, runs=1))
    assert open(os.path.join(out, 'full.npy'), 'rb').read() == before
    meta = read_meta(out)
    assert len(meta['rows']['full']) == 1 and len(meta['sessions']) == 2


def test_changed_settings_are_refused(tiny_data, tmp_path):
    out = str(tmp_path / 'exp')
    trainer_airbench.main(args_for(tiny_data, out, runs=1))
    with pytest.raises(SystemExit, match=r'epochs: stored 2\.0, now 3\.0'):
        trainer_airbench.main(args_for(tiny_data, out, runs=1, epochs=3.0))
    # Settings that change only where or how fast the runs are computed are not differences.
    trainer_airbench.main(args_for(tiny_data, out, runs=1, compile='off', models_per_device=2,
                                   device='cpu'))
    assert len(read_meta(out)['sessions']) == 2


def test_offline_without_data_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(airbench, 'CIFAR_URL', 'http://127.0.0.1:9/cifar-10-python.tar.gz')
    with pytest.raises(SystemExit) as info:
        trainer_airbench.main(args_for(str(tmp_path / 'nothing'), str(tmp_path / 'exp')))
    assert str(info.value).startswith('error: CIFAR-10 is not in')


def test_resume_after_kill_keeps_finished_rows_byte_identical(tiny_data, tmp_path):
    out = str(tmp_path / 'exp')
    command = [sys.executable, 'trainer_airbench.py', *args_for(tiny_data, out, runs=3)]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            if any(r['complete'] for r in read_meta(out)['rows']['full']):
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    meta = read_meta(out)
    finished = {arm: [i for i, r in enumerate(meta['rows'][arm]) if r['complete']]
                for arm in ('full', 'ablated')}
    assert finished['full'] and len(finished['full']) + len(finished['ablated']) < 6
    saved = {arm: np.load(os.path.join(out, f'{arm}.npy'))[finished[arm]]
             for arm in finished}

    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    meta = read_meta(out)
    for arm in ('full', 'ablated'):
        assert all(r['complete'] for r in meta['rows'][arm]) and len(meta['rows'][arm]) == 3
        again = np.load(os.path.join(out, f'{arm}.npy'))[finished[arm]]
        assert again.tobytes() == saved[arm].tobytes()
