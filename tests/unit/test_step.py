"""train.step.train_step on its own: one optimizer step of a tiny model on a real (one-process, CPU)
Accelerator, checked against the same step written out by hand (forward with the carried state, backward,
clip, SGD); the state it hands back detached and carried into the next step; the random state resets."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import Accelerator

from sharnn import SHARNN, CarryState
from sharnn.corpus.data import ByteSplit, StreamLoader
from tests.helpers import random_bytes, tiny_config
from train.config import TrainConfig
from train.step import draw_resets, random_reset, train_step

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")

LR, CLIP, B, T = 0.5, 0.01, 2, 8


def setup(clip: float = CLIP, grad_accum: int = 1, state_reset_prob: float = 0.0):
    """A tiny model without dropout (so a forward by hand computes what train_step's forward does), SGD, a
    real Accelerator, and two loaders over the same bytes: one for train_step, one for the hand-made step."""
    model_cfg = tiny_config(mem_len=32, dropout=0.0, dropouth=0.0, dropouti=0.0)
    cfg = TrainConfig(model=model_cfg, batch_size=B, bptt=T, vary_bptt=False, warmup_steps=0, clip=clip,
                      grad_accum=grad_accum, state_reset_prob=state_reset_prob)
    torch.manual_seed(0)
    model = SHARNN(cfg.model)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=grad_accum)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model, optimizer = accelerator.prepare(model, optimizer)
    split = ByteSplit.from_bytes(random_bytes(4096))
    loaders = [StreamLoader(split, B, T, 0, 1, cfg.seed, vary_bptt=False) for _ in range(2)]
    return cfg, accelerator, model, optimizer, loaders


def by_hand(model: SHARNN, batches, carry: CarryState, clip: float):
    """The step written out: forward each micro-batch with the carried state, backward (each loss divided by
    the number of micro-batches, as accelerate does), clip the gradient to `clip`, SGD. Returns the new
    weights, the micro-batches' losses summed and the pre-clip gradient norm."""
    twin = copy.deepcopy(model)
    twin.zero_grad()
    total = 0.0
    for batch in batches:
        _, loss, carry = twin(batch.inputs.t(), carry, targets=batch.targets.t())
        (loss / len(batches)).backward()
        carry = carry.detach()
        total += loss.item()
    norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), clip)
    with torch.no_grad():
        for p in twin.parameters():
            p -= LR * p.grad
    return {k: v.detach() for k, v in twin.state_dict().items()}, total, float(norm)


def test_one_step_is_forward_backward_clip_and_step():
    cfg, accelerator, model, optimizer, (loader, mirror) = setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    want, want_loss, want_norm = by_hand(model, [next(mirror)], CarryState.empty(2), CLIP)
    out, carry = train_step(accelerator, model, optimizer, loader, CarryState.empty(2), cfg, 1)
    assert out.loss.item() == pytest.approx(want_loss, rel=1e-6)  # the model's own loss
    assert float(out.grad_norm) == pytest.approx(want_norm, rel=1e-5)  # the norm before clipping
    assert want_norm > 10 * CLIP  # so that clipping changed the step
    after = model.state_dict()
    for k in want:
        torch.testing.assert_close(after[k], want[k], rtol=1e-5, atol=1e-7, msg=k)
    # every weight moved by lr x its clipped gradient: the whole update has norm lr x clip
    update = torch.cat([(before[k] - after[k]).flatten() for k in before if before[k].is_floating_point()])
    assert update.norm().item() == pytest.approx(LR * CLIP, rel=1e-4)
    assert out.bytes == B * T and out.epoch == 0
    # the state handed back: this step's memory, cut from the graph
    assert carry.memory_len == T
    tensors = carry.to_tensors()
    assert tensors and all(t.grad_fn is None and not t.requires_grad for t in tensors.values())


def test_the_next_step_starts_from_the_carried_state():
    cfg, accelerator, model, optimizer, (loader, mirror) = setup(clip=0.0)  # 0: no clipping
    _, carry = train_step(accelerator, model, optimizer, loader, CarryState.empty(2), cfg, 1)
    next(mirror)
    second = next(mirror)
    want, want_loss, _ = by_hand(model, [second], carry, float("inf"))
    _, fresh_loss, _ = by_hand(model, [second], CarryState.empty(2), float("inf"))
    assert fresh_loss != pytest.approx(want_loss, rel=1e-4)  # the carried state matters to this step
    out, carry = train_step(accelerator, model, optimizer, loader, carry, cfg, 2)
    assert out.loss.item() == pytest.approx(want_loss, rel=1e-6)
    assert carry.memory_len == 2 * T
    after = model.state_dict()
    for k in want:
        torch.testing.assert_close(after[k], want[k], rtol=1e-5, atol=1e-7, msg=k)


def test_accumulated_micro_batches_make_one_step_on_the_summed_gradient():
    cfg, accelerator, model, optimizer, (loader, mirror) = setup(grad_accum=2)
    want, want_loss, want_norm = by_hand(model, [next(mirror), next(mirror)], CarryState.empty(2), CLIP)
    out, carry = train_step(accelerator, model, optimizer, loader, CarryState.empty(2), cfg, 1)
    assert out.loss.item() == pytest.approx(want_loss, rel=1e-6) and out.bytes == 2 * B * T
    after = model.state_dict()
    for k in want:
        torch.testing.assert_close(after[k], want[k], rtol=1e-5, atol=1e-7, msg=k)
    assert carry.memory_len == 2 * T


def test_random_resets_are_drawn_from_seed_and_step():
    draws = [draw_resets(7, step, 0.5) for step in range(1, 201)]
    assert draws == [draw_resets(7, step, 0.5) for step in range(1, 201)]  # every rank, every resume alike
    assert set(draws) == {(False, False), (False, True), (True, False), (True, True)}
    assert draw_resets(7, 1, 0.0) == (False, False)
    carry = CarryState(hidden=[(torch.ones(1, 2, 4), torch.ones(1, 2, 4)), None],
                       memory=[torch.ones(3, 2, 4), None])
    for step, (hidden, memory) in enumerate(draws[:20], start=1):
        kept = random_reset(carry, 7, step, 0.5)
        assert (kept.hidden[0] is None) == hidden and (kept.memory[0] is None) == memory


def test_the_state_is_forgotten_after_the_steps_the_draws_say():
    cfg, accelerator, model, optimizer, (loader, _) = setup(state_reset_prob=0.5)
    carry, forgot = CarryState.empty(2), set()
    for step in range(1, 9):
        _, carry = train_step(accelerator, model, optimizer, loader, carry, cfg, step)
        hidden, memory = draw_resets(cfg.seed, step, 0.5)
        assert (carry.hidden[0] is None) == hidden and (carry.memory[0] is None) == memory, step
        forgot |= {hidden, memory}
    assert forgot == {True, False}  # both happened in these steps
