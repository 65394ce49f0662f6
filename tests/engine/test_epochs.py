"""The engine's epoch driver (engine/epochs.py): save cadence, rows logged only after the state that covers them."""
import pytest
import torch

from filtersurgery.engine import epochs as ep


class Clock:
    """A fake ``time.time`` that an epoch moves to the next of the given times."""

    def __init__(self, times):
        self.now, self.times = 0.0, iter(times)

    def __call__(self):
        return self.now


def _drive(monkeypatch, n, state_every, times, fail_at=None):
    """Run ``n`` epochs with the clock at ``times[e]`` after epoch ``e``; returns (events, end or the exception)."""
    clock, events = Clock(times), []
    monkeypatch.setattr(ep.time, "time", clock)

    def one_epoch(e):
        if e == fail_at:
            raise KeyboardInterrupt
        events.append(("epoch", e))
        clock.now = next(clock.times)
        return {"epoch": e + 1}

    try:
        end = ep.run_epochs(0, lambda e: e >= n, one_epoch, lambda e: events.append(("save", e)),
                            lambda row: events.append(("log", row["epoch"])), state_every)
    except KeyboardInterrupt as exc:
        end = exc
    return events, end


def test_every_epoch_is_saved_then_logged(monkeypatch):
    events, end = _drive(monkeypatch, 3, 0.0, [1, 2, 3])
    assert end == 3
    assert events == [("epoch", 0), ("save", 0), ("log", 1), ("epoch", 1), ("save", 1), ("log", 2),
                      ("epoch", 2), ("save", 2), ("log", 3)]


def test_state_every_holds_rows_back_until_the_next_save_and_saves_the_last_epoch(monkeypatch):
    events, _ = _drive(monkeypatch, 4, 10.0, [4, 11, 13, 14])  # seconds since start after each epoch
    assert events == [("epoch", 0), ("epoch", 1), ("save", 1), ("log", 1), ("log", 2),
                      ("epoch", 2), ("epoch", 3), ("save", 3), ("log", 3), ("log", 4)]


def test_a_kill_between_saves_logs_no_unsaved_row(monkeypatch):
    events, end = _drive(monkeypatch, 4, 10.0, [4, 11, 13, 14], fail_at=3)
    assert isinstance(end, KeyboardInterrupt)
    assert events == [("epoch", 0), ("epoch", 1), ("save", 1), ("log", 1), ("log", 2), ("epoch", 2)]  # row 3 unsaved


def test_done_is_asked_after_each_epoch_and_may_read_what_it_recorded():
    curve = []

    def one_epoch(e):
        curve.append(e)
        return {"epoch": e + 1}

    saved, logged = [], []
    end = ep.run_epochs(0, lambda e: e >= 10 or len(curve) == 3, one_epoch, saved.append, logged.append)
    assert end == 3 and saved == [0, 1, 2] and [r["epoch"] for r in logged] == [1, 2, 3]
    assert ep.run_epochs(5, lambda e: e >= 5, one_epoch, saved.append, logged.append) == 5  # nothing left


def test_bad_state_every_and_non_finite_loss_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="^state_every: must be a finite number"):
        ep.run_epochs(0, lambda e: True, None, None, None, state_every=-1)
    ep.check_finite_loss(torch.tensor(1.5), "epoch 1", tmp_path / "s.pt")
    with pytest.raises(RuntimeError, match=r"^non-finite loss at stage 2 train epoch 3; the last saved state"):
        ep.check_finite_loss(float("nan"), "stage 2 train epoch 3", tmp_path / "s.pt")


def test_state_round_trips_the_global_rng_and_the_generator(tmp_path):
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(7)
    ep.save_training_state(tmp_path / "s.pt", {"w": torch.ones(2)}, None, {"epoch": 1}, gen=gen)
    want = (torch.rand(3), torch.rand(3, generator=gen))
    from filtersurgery.engine import checkpoint

    st = checkpoint.load_training_state(tmp_path / "s.pt")
    assert st["extra"]["epoch"] == 1
    ep.restore_rng(st["extra"], gen)
    assert torch.equal(torch.rand(3), want[0]) and torch.equal(torch.rand(3, generator=gen), want[1])
