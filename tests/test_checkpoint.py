import logging
import os
import random
import signal

import numpy as np
import pytest
import torch
from torch import nn

from wbs_dist.train.checkpoint import (
    PREEMPTED_EXIT_CODE,
    PreemptionFlag,
    apply_state,
    capture_rng_state,
    find_resume_checkpoint,
    load_checkpoint,
    make_state,
    prev_path,
    restore_rng_state,
    save_checkpoint,
)
from wbs_dist.errors import InputError


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def generators():
    return {
        "shuffle": np.random.default_rng(11),                   # PCG64: 128-bit ints in its state
        "philox": np.random.Generator(np.random.Philox(5)),    # uint64 arrays in its state
        "loader": torch.Generator().manual_seed(3),
    }


def draws(gens):
    return (
        [random.random() for _ in range(3)],
        np.random.rand(3).tolist(),
        torch.rand(3).tolist(),
        gens["shuffle"].permutation(10).tolist(),
        gens["philox"].normal(size=3).tolist(),
        torch.randint(0, 1000, (3,), generator=gens["loader"]).tolist(),
        random.gauss(0, 1),  # leaves a cached gaussian in Python's state
    )


def test_rng_round_trip_through_a_weights_only_file(tmp_path):
    seed_all(1)
    gens = generators()
    draws(gens)
    state = capture_rng_state(gens)
    expected = draws(gens)
    save_checkpoint(tmp_path / "rng.pt", {"rng": state})

    seed_all(99)
    fresh = generators()
    draws(fresh)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"], fresh)
    assert draws(fresh) == expected


def test_restore_names_a_missing_generator():
    state = capture_rng_state({})
    with pytest.raises(KeyError, match="shuffle"):
        restore_rng_state(state, {"shuffle": np.random.default_rng()})


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 1))

    def forward(self, x):
        return self.net(x)


def build():
    model = Tiny()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu")
    return model, opt, sched, scaler


def train_steps(model, opt, sched, scaler, gen, steps):
    """Every source of randomness a loop meets: dropout, sampling, flips, noise."""
    data = torch.arange(64, dtype=torch.float32).reshape(16, 4) / 64
    for _ in range(steps):
        idx = torch.as_tensor(gen.choice(16, size=4, replace=False))
        x = data[idx] + torch.as_tensor(np.random.normal(0, 0.01, (4, 4)), dtype=torch.float32)
        if random.random() < 0.5:
            x = x.flip(1)
        loss = model(x).square().mean()
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()


def test_resume_continues_bit_for_bit(tmp_path):
    seed_all(0)
    ref = build()
    ref_gen = np.random.default_rng(7)
    train_steps(*ref, ref_gen, 6)
    expected = [p.clone() for p in ref[0].parameters()]

    seed_all(0)
    model, opt, sched, scaler = build()
    gen = np.random.default_rng(7)
    train_steps(model, opt, sched, scaler, gen, 3)
    path = tmp_path / "run" / "last.pt"
    save_checkpoint(path, make_state(model=model, optimizer=opt, scheduler=sched, scaler=scaler,
                                     epoch=1, step=3, config={"lr": 1e-2, "model": "tiny"},
                                     loader_position={"epoch": 1, "batch": 3},
                                     generators={"sampler": gen}))

    seed_all(123)  # as in a new process with other seeds
    model, opt, sched, scaler = build()
    gen = np.random.default_rng(0)
    info = apply_state(load_checkpoint(find_resume_checkpoint(tmp_path / "run")), model=model,
                       optimizer=opt, scheduler=sched, scaler=scaler, generators={"sampler": gen})
    assert info == {"epoch": 1, "step": 3, "loader_position": {"epoch": 1, "batch": 3},
                    "config": {"lr": 1e-2, "model": "tiny"}}
    train_steps(model, opt, sched, scaler, gen, 3)
    for got, want in zip(model.parameters(), expected):
        assert torch.equal(got, want)


def test_apply_state_refuses_a_missing_scheduler(tmp_path):
    model, opt, sched, _ = build()
    state = make_state(model=model, optimizer=opt, epoch=0, step=0, config={})
    with pytest.raises(InputError, match="scheduler"):
        apply_state(state, model=model, optimizer=opt, scheduler=sched)


def save_steps(path, n):
    model = Tiny()
    opt = torch.optim.Adam(model.parameters())
    for step in range(n):
        save_checkpoint(path, make_state(model=model, optimizer=opt, epoch=0, step=step, config={}))


def test_rotation_keeps_previous_and_everything_loads_weights_only(tmp_path):
    path = tmp_path / "last.pt"
    stale = tmp_path / ".last.pt.crashed.tmp"
    stale.write_bytes(b"half a write")
    save_steps(path, 3)
    assert sorted(os.listdir(tmp_path)) == ["last.pt", "last.pt.prev"]
    assert torch.load(path, weights_only=True)["step"] == 2
    assert torch.load(prev_path(path), weights_only=True)["step"] == 1
    assert load_checkpoint(path)["step"] == 2


def test_truncated_newest_falls_back_to_prev(tmp_path, caplog):
    path = tmp_path / "last.pt"
    save_steps(path, 2)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="wbs_dist.train.checkpoint"):
        state = load_checkpoint(path)
    assert state["step"] == 0
    assert str(path) in caplog.text and "cannot be loaded" in caplog.text
    assert "previous checkpoint" in caplog.text


def test_missing_newest_falls_back_to_prev(tmp_path, caplog):
    path = tmp_path / "last.pt"
    save_steps(path, 2)
    path.unlink()  # a crash between rotation and rename
    assert find_resume_checkpoint(tmp_path) == path
    with caplog.at_level(logging.WARNING, logger="wbs_dist.train.checkpoint"):
        assert load_checkpoint(path)["step"] == 0
    assert str(prev_path(path)) in caplog.text


def test_both_corrupt_is_an_error_and_none_is_none(tmp_path):
    path = tmp_path / "last.pt"
    assert load_checkpoint(path) is None
    assert find_resume_checkpoint(tmp_path) is None
    path.write_bytes(b"")
    prev_path(path).write_bytes(b"garbage")
    with pytest.raises(InputError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and str(prev_path(path)) in str(err.value)


def test_preemption_signal_only_sets_the_flag(tmp_path):
    before = signal.getsignal(signal.SIGUSR2)
    flag = PreemptionFlag()
    with flag:
        assert not flag.requested and not flag.sync()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert flag.requested and flag.signum == signal.SIGUSR2
        assert flag.sync()  # no process group: the local flag
        assert os.listdir(tmp_path) == []
    assert signal.getsignal(signal.SIGUSR2) is before
    assert PREEMPTED_EXIT_CODE == 75


def test_preemption_sigterm_and_custom_list():
    before = signal.getsignal(signal.SIGTERM)
    flag = PreemptionFlag(signals=[signal.SIGTERM]).install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.requested and flag.signum == signal.SIGTERM
    finally:
        flag.uninstall()
    assert signal.getsignal(signal.SIGTERM) is before
