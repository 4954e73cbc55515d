"""bench.py: the ways of training compared side by side, in one run on one device; and viz.py
timed at full size.

    python bench.py                  # the default recipes on the default device (a CUDA GPU)
    python bench.py --device cpu     # a small config that finishes within ~10 minutes on 2 cores
    python bench.py --viz            # viz.py on two synthetic (1000, 50000, 10) float16 arms

For each trainer (airbench94 and the madry ResNet-9) it times, on the same device and data:
one model at a time in eager mode (the reference), one at a time with torch.compile, K models
at once side by side in one network (grouped convolutions), and, on CUDA when the PyPI
`airbench` package is importable, its train94 as an outside peer. A training here is what the
trainers do per run: train, then logits on all training images, then test accuracy.
"""
import argparse
import importlib.util
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import airbench
import store
import trainer_airbench
import trainer_madry

TRAINERS = {'airbench': (trainer_airbench, airbench.train_airbench94),
            'madry': (trainer_madry, trainer_madry.train_madry)}
# On the CPU: each trainer's cpu preset, shortened, so that the whole bench takes minutes (the
# ResNet-9 also at half the preset's width; its lr peak moved with the shorter training, to the
# preset's 20% of it).
CPU_OVERRIDES = {'airbench': dict(preset='cpu', epochs=3.0),
                 'madry': dict(preset='cpu', epochs=2.0, lr_peak_epoch=0.4, widths=[8, 16, 32, 16])}
TIMED_TRAININGS = {'cpu': 2, 'cuda': 16}  # per path, after a warm-up chunk where there is one


# -----------------------------------------------------------------------------
#                                 Timing the trainers

def paths(device):
    """(name, models at once, compile) for each way of training to compare."""
    compiled = 'on'
    batched_compile = 'off' if device.type == 'cpu' else 'on'
    ks = [2, 4] if device.type == 'cpu' else [4, 8, 16]
    return ([('eager, 1 at a time', 1, 'off'), ('compiled, 1 at a time', 1, compiled)]
            + [(f'{"eager" if batched_compile == "off" else "compiled"}, {k} at once', k,
                batched_compile) for k in ks])


def time_path(train_fn, data, config, device, k, compile_mode, trainings):
    """Train in chunks of k models; returns seconds per training (steady state), the first
    chunk's seconds (compilation and warm-up included), mean test accuracy, and the share of
    a training's time spent on inference over the training images."""
    config = dict(config, models_per_device=k, compile=compile_mode)
    chunks = max(1, math.ceil(trainings / k))
    warm_up = device.type == 'cuda' or compile_mode == 'on'  # the CPU in eager needs none
    accs, timed, infer, first = [], [], [], None
    for c in range(chunks + warm_up):
        seeds = list(range(1000 * c, 1000 * c + k))
        indices = [data['arm_indices']['full']] * k
        result = airbench.train_and_evaluate(train_fn, data, seeds, indices, config, device)
        seconds = sum(result['seconds'].values())
        accs += list(result['test_acc'])
        if warm_up and c == 0:
            first = seconds
            continue
        timed.append(seconds / k)
        infer.append(result['seconds']['infer'] / seconds)
    return dict(per_training=float(np.mean(timed)), first_chunk=first,
                accuracy=float(np.mean(accs)), infer_share=float(np.mean(infer)),
                trainings=len(accs))


def airbench_package_peer(device, data, trainings):
    """The PyPI airbench package's train94 as an outside peer, if it can be imported (its
    module name clashes with ours, so it is loaded from its installed location)."""
    if device.type != 'cuda':
        return None, 'needs CUDA'
    here = os.path.dirname(os.path.abspath(__file__))
    paths_elsewhere = [p for p in sys.path if os.path.abspath(p or '.') != here]
    spec = importlib.machinery.PathFinder.find_spec('airbench', paths_elsewhere)
    if spec is None:
        return None, 'the airbench package is not installed (pip install airbench)'
    try:
        spec.name = 'airbench_package'
        package = importlib.util.module_from_spec(spec)
        sys.modules['airbench_package'] = package
        spec.loader.exec_module(package)
        package.warmup94()
        accs, times = [], []
        for _ in range(trainings):
            t0 = time.perf_counter()
            net = package.train94(verbose=False)
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
            accs.append(package.evaluate(net, package.CifarLoader('cifar10', train=False),
                                         tta_level=2))
        return dict(per_training=float(np.mean(times)), first_chunk=None,
                    accuracy=float(np.mean(accs)), infer_share=float('nan'),
                    trainings=trainings), None
    except Exception as e:  # an outside package: report, do not crash the bench
        return None, f'{type(e).__name__}: {str(e)[:150]}'


def bench_trainers(args):
    device = airbench.pick_device(args.device)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    trainings = TIMED_TRAININGS['cuda' if device.type == 'cuda' else 'cpu']
    header = (f"{'trainer':<9s}{'path':<24s}{'s/training':>11s}{'per hour':>10s}{'test acc':>10s}"
              f"{'vs eager':>10s}{'infer':>7s}{'first chunk s':>15s}")
    print(f'device: {device} ({torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"}), '
          f'torch {torch.__version__}')
    data_cache = {}
    rows = [header]
    for name in args.trainers:
        module, train_fn = TRAINERS[name]
        overrides = CPU_OVERRIDES[name] if device.type == 'cpu' else {}
        config = airbench.parse_config(module.CONFIG, module.PRESETS,
                                       [f'--{k.replace("_", "-")}={v}'
                                        for k, v in overrides.items()]
                                       + ['--data-dir', args.data_dir])
        key = (config['train_subset'], tuple(config['random_indices'] + config['easy_indices']))
        if key not in data_cache:
            data_cache[key] = airbench.prepare_data(config, device)
        data = data_cache[key]
        reference = None
        results = [(label, time_path(train_fn, data, config, device, k, mode, trainings))
                   for label, k, mode in paths(device)]
        if name == 'airbench':
            peer, why = airbench_package_peer(device, data, trainings)
            # Its own training only: the package takes no logits on the training images.
            results.append(('PyPI train94 (no infer)', peer) if peer else
                           ('PyPI train94 (no infer)', why))
        for label, r in results:
            if isinstance(r, str):
                rows.append(f'{name:<9s}{label:<24s}  not run: {r}')
                continue
            reference = reference or r['per_training']
            first = '-' if r['first_chunk'] is None else f"{r['first_chunk']:.1f}"
            rows.append(f"{name:<9s}{label:<24s}{r['per_training']:>11.2f}"
                        f"{3600 / r['per_training']:>10.0f}{r['accuracy']:>10.4f}"
                        f"{reference / r['per_training']:>9.2f}x{r['infer_share']:>7.0%}"
                        f"{first:>15s}")
            print(rows[-1], flush=True)
    print('\n' + '\n'.join(rows))
    print(f"\ns/training: steady-state wall-clock seconds per model (train + logits on all "
          f"training images + test accuracy); vs eager: speed relative to the first row; infer: "
          f"share spent on the training-image logits; first chunk: the warm-up chunk, with "
          f"compilation. Timed trainings per path: {trainings} (batched paths: whole chunks).")


# -----------------------------------------------------------------------------
#                                 viz.py at full size

def write_synthetic_arms(out, runs=1000, n_train=50000, seed=0):
    """An experiment folder in the trainers' format with `runs` complete rows per arm.

    Rows are written through a memory map in bulk (the trainers write and fsync row by row,
    which would take far longer here); meta.json marks every row complete."""
    config = dict(trainer_airbench.CONFIG, preset='synthetic', runs=runs)
    indices = config['random_indices'] + config['easy_indices']
    rng = np.random.default_rng(seed)
    labels = {i: int(rng.integers(10)) for i in indices}
    part, _ = store.open_for_writing(out, config, n_train, runs, labels=labels)
    block = rng.normal(0, 3, size=(8, n_train, 10)).astype(np.float16)
    for arm in store.ARMS:
        arr = np.lib.format.open_memmap(part.array_path(arm), mode='r+')
        for start in range(0, runs, len(block)):
            rows = arr[start:start + len(block)]
            rows[:] = block[:len(rows)]
            rows[:, indices] = rng.normal(2, 2, size=(len(rows), len(indices), 10))
        arr.flush()
        del arr
        for r, row in enumerate(part.rows(arm)):
            row.update(complete=True, seed=r, test_acc=0.94, seconds=1.0, status='ok')
    part._save_meta()


# Runs a script (argv[1:]) and prints its own peak resident memory last on stderr. Read inside the
# child: RUSAGE_CHILDREN in the parent is no measure here, because Linux carries the parent's
# peak (this bench maps the 2 GB it writes) into a child started with vfork, as subprocess does.
# VmHWM is the peak of the child's own address space; where /proc is missing, ru_maxrss (which
# may include that inherited peak) is an upper bound.
PEAK_MEMORY_PROBE = """
import resource, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name='__main__')
finally:
    try:
        with open('/proc/self/status') as f:
            peak = next(int(line.split()[1]) for line in f if line.startswith('VmHWM:'))
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f'peak KiB {peak}', file=sys.stderr)
"""


def bench_viz(args):
    needed = 2 * 1000 * 50000 * 10 * 2
    with tempfile.TemporaryDirectory(prefix='bench-viz-', dir=args.tmp) as tmp:
        free = os.statvfs(tmp).f_bavail * os.statvfs(tmp).f_frsize
        if free < needed * 1.1:
            raise SystemExit(f'error: --viz needs {needed / 1e9:.1f} GB free in {tmp}, '
                             f'there are {free / 1e9:.1f} GB (use --tmp DIR)')
        out = os.path.join(tmp, 'experiment')
        t0 = time.perf_counter()
        write_synthetic_arms(out)
        print(f'wrote two (1000, 50000, 10) float16 arms ({needed / 1e9:.1f} GB) in '
              f'{time.perf_counter() - t0:.0f} s to {out}')
        viz_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'viz.py')
        for attempt in ('first', 'second (warm cache)'):
            t0 = time.perf_counter()
            result = subprocess.run([sys.executable, '-c', PEAK_MEMORY_PROBE, viz_py, out],
                                    capture_output=True, text=True)
            seconds = time.perf_counter() - t0
            if result.returncode:
                raise SystemExit(f'viz.py failed:\n{result.stderr}')
            peak = int(result.stderr.rsplit('peak KiB ', 1)[1]) / 1024
            print(f'viz.py, {attempt} run: {seconds:.2f} s, peak memory {peak:.0f} MiB')
        print('\n' + result.stdout)
    print(f'removed {tmp}')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--device', default='', help="'' picks CUDA when available")
    parser.add_argument('--data-dir', default='data')
    parser.add_argument('--trainers', nargs='+', default=list(TRAINERS), choices=list(TRAINERS))
    parser.add_argument('--viz', action='store_true',
                        help='time viz.py on synthetic full-size arms instead')
    parser.add_argument('--tmp', default=None, help='where --viz writes its 2 GB (default: the '
                                                     'system temporary folder)')
    args = parser.parse_args(argv)
    bench_viz(args) if args.viz else bench_trainers(args)


if __name__ == '__main__':
    main()
