"""The on-device loader: equal step counts, excluded examples never drawn, augmentation."""
import numpy as np
import pytest
import torch

import airbench

EXCLUDED = list(range(20)) + [45114, 47798, 43746, 49106, 47082, 44095, 49524, 41014, 49159,
                              44279, 45927, 40141, 47731, 46440, 49015, 49690, 46836, 43512,
                              43189, 49320]


@pytest.mark.parametrize('batch_size,epochs', [(1024, 9.9), (1000, 10.0), (512, 24.0)])
def test_ablated_arm_takes_the_same_steps_and_never_draws_the_40(batch_size, epochs):
    full = np.arange(50000)
    ablated = np.setdiff1d(full, EXCLUDED)
    assert len(ablated) == 49960
    steps = airbench.total_steps(epochs, len(full), batch_size)
    # drop_last per epoch would give different step counts for the two arms at batch 1000:
    assert batch_size != 1000 or (50000 // 1000, 49960 // 1000) == (50, 49)
    plans_full = airbench.batch_plans(full, 0, batch_size, steps, 50000)
    plans_ablated = airbench.batch_plans(ablated, 1, batch_size, steps, 50000)
    assert len(plans_full) == len(plans_ablated) == steps
    assert all(len(p) == batch_size for p in plans_full + plans_ablated)
    drawn = torch.cat(plans_ablated)[:, 0].numpy()
    assert not np.isin(drawn, EXCLUDED).any()
    assert np.isin(EXCLUDED, torch.cat(plans_full)[:, 0].numpy()).all()


def test_each_pass_is_a_permutation_and_flips_alternate():
    kept = np.arange(0, 300, 3)  # 100 images out of 300
    plans = torch.cat(airbench.batch_plans(kept, 5, 30, 20, 300))  # 600 draws = 6 passes
    first, second = plans[:100], plans[100:200]
    assert sorted(first[:, 0].tolist()) == kept.tolist()
    assert sorted(second[:, 0].tolist()) == kept.tolist()
    flip_first = dict(zip(first[:, 0].tolist(), first[:, 1].tolist()))
    flip_second = dict(zip(second[:, 0].tolist(), second[:, 1].tolist()))
    assert all(flip_first[i] != flip_second[i] for i in kept.tolist())
    assert 30 < sum(flip_first.values()) < 70


def test_random_flips_are_fresh_at_every_draw_and_leave_the_order_alone():
    kept = np.arange(300)
    alternating = torch.cat(airbench.batch_plans(kept, 5, 30, 20, 300))  # 600 draws = 2 passes
    fresh = torch.cat(airbench.batch_plans(kept, 5, 30, 20, 300, alternate_flip=False))
    assert torch.equal(alternating[:, [0, 2, 3, 4, 5]], fresh[:, [0, 2, 3, 4, 5]])
    flips = [dict(zip(fresh[p * 300:(p + 1) * 300, 0].tolist(),
                      fresh[p * 300:(p + 1) * 300, 1].tolist())) for p in (0, 1)]
    same = sum(flips[0][i] == flips[1][i] for i in range(300))
    assert 110 < same < 190  # independent coin flips: about half the images keep their flip
    assert 110 < sum(flips[0].values()) < 190


def test_plans_depend_only_on_the_seed():
    a = airbench.batch_plans(np.arange(100), 7, 32, 10, 100)
    b = airbench.batch_plans(np.arange(100), 7, 32, 10, 100)
    c = airbench.batch_plans(np.arange(100), 8, 32, 10, 100)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def reference_augment(image_u8, flip, dy, dx, translate, pad_mode):
    """One image, augmented with numpy: normalise, flip, pad, crop at offset (dy, dx)."""
    x = image_u8.astype(np.float32) / 255
    x = (x - np.array(airbench.CIFAR_MEAN, np.float32)[:, None, None]) \
        / np.array(airbench.CIFAR_STD, np.float32)[:, None, None]
    if flip:
        x = x[:, :, ::-1]
    mode = 'reflect' if pad_mode == 'reflect' else 'constant'
    x = np.pad(x, ((0, 0), (translate, translate), (translate, translate)), mode=mode)
    return x[:, dy:dy + 32, dx:dx + 32]


@pytest.mark.parametrize('pad_mode', ['reflect', 'constant'])
def test_augment_matches_a_plain_reference(pad_mode):
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, size=(10, 3, 32, 32), dtype=np.uint8))
    plan = airbench.batch_plans(np.arange(10), 3, 10, 1, 10)[0]
    out = airbench.augment(images, plan, flip=True, translate=2, cutout=0, pad_mode=pad_mode)
    offsets = (plan[:, 2:4] * 5) >> airbench.RANDOM_BITS
    assert set(offsets.flatten().tolist()) <= set(range(5))
    for b in range(10):
        expected = reference_augment(images[plan[b, 0]].numpy(), plan[b, 1].item(),
                                     offsets[b, 0].item(), offsets[b, 1].item(), 2, pad_mode)
        np.testing.assert_allclose(out[b].numpy(), expected, atol=1e-6)


def test_cutout_zeroes_one_square_inside_the_image():
    images = torch.full((50, 3, 32, 32), 200, dtype=torch.uint8)
    plan = airbench.batch_plans(np.arange(50), 0, 50, 1, 50)[0]
    out = airbench.augment(images, plan, flip=False, translate=0, cutout=4)
    zero = (out == 0).all(1)  # (B, H, W): pixels set to the mean colour
    assert (zero.sum((1, 2)) == 16).all()
    for b in range(50):
        rows, cols = torch.nonzero(zero[b], as_tuple=True)
        assert rows.max() - rows.min() == 3 and cols.max() - cols.min() == 3
