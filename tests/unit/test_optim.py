"""LAMB (sharnn/optim.py) against a plain one-tensor-at-a-time reading of the Smerity/pytorch-lamb update."""

import io

import pytest
import torch

from sharnn.optim import LAMB


def reference_step(p, g, m, v, lr, betas, eps, weight_decay, min_trust, max_weight_norm):
    """One minimum-trust LAMB update of a single tensor, in place; returns the trust ratio as a float."""
    b1, b2 = betas
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    step = m / (v.sqrt() + eps) + weight_decay * p
    w = min(p.norm().item(), max_weight_norm)
    a = step.norm().item()
    trust = w / a if w > 0 and a > 0 else 1.0
    trust = max(trust, min_trust)
    p.sub_(lr * trust * step)
    return trust


def make_groups():
    """Two param groups exercising every branch of the update; returns (groups, names per group)."""
    gen = torch.Generator().manual_seed(0)
    big = torch.randn(40, 30, generator=gen)  # ||p|| ~ 35 > 10: the weight norm clamp is active
    zero = torch.zeros(7)  # w == 0 on the first step: trust 1
    tiny = 1e-3 * torch.randn(5, generator=gen)  # w / a ~ 1e-3: the min_trust clamp is active
    no_grad = torch.randn(3, generator=gen)  # grad stays None
    double = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)  # a second (device, dtype) bucket
    mat = torch.randn(6, 6, generator=gen)
    zero_grad = torch.randn(4, generator=gen)  # g == 0 and no weight decay: a == 0, trust 1
    groups = [
        dict(params=[big, zero, no_grad, double, tiny], lr=0.1, weight_decay=0.01),
        dict(params=[mat, zero_grad], lr=0.02, betas=(0.8, 0.99), min_trust=0.5),
    ]
    names = [["big", "zero", "no_grad", "double", "tiny"], ["mat", "zero_grad"]]
    for group in groups:
        group["params"] = [torch.nn.Parameter(p) for p in group["params"]]
    return groups, names


def make_grads(groups, names, step):
    gen = torch.Generator().manual_seed(100 + step)
    for group, group_names in zip(groups, names):
        for p, name in zip(group["params"], group_names):
            if name == "no_grad":
                p.grad = None
            elif name == "zero_grad":
                p.grad = torch.zeros_like(p)
            else:
                p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


def test_matches_reference_and_exposes_trust_ratios():
    groups, names = make_groups()
    ref = [[p.detach().clone() for p in group["params"]] for group in groups]
    ref_m = [[torch.zeros_like(p) for p in ps] for ps in ref]
    ref_v = [[torch.zeros_like(p) for p in ps] for ps in ref]
    # Group 0 overrides weight_decay, group 1 overrides betas and min_trust.
    opt = LAMB(groups, weight_decay=0.0)
    hparams = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]

    ref_trusts = {}
    for step in range(5):
        make_grads(groups, names, step)
        opt.step()
        trusts = []
        for gi, group in enumerate(groups):
            for pi, (p, name) in enumerate(zip(group["params"], names[gi])):
                if p.grad is None:
                    continue
                trust = reference_step(ref[gi][pi], p.grad, ref_m[gi][pi], ref_v[gi][pi], **hparams[gi])
                ref_trusts[(step, name)] = trust
                trusts.append(trust)
        got = opt.last_trust_ratios()
        assert got.dtype == torch.float32 and got.shape == (len(trusts),)
        torch.testing.assert_close(got, torch.tensor(trusts), rtol=1e-6, atol=0)
        for gi, group in enumerate(groups):
            for pi, p in enumerate(group["params"]):
                torch.testing.assert_close(p.detach(), ref[gi][pi], rtol=1e-6, atol=1e-7)

    # Every branch was really taken.
    assert groups[0]["params"][0].detach().norm() > 10
    assert ref_trusts[(0, "zero")] == 1.0
    assert ref_trusts[(0, "tiny")] == 0.25
    assert all(ref_trusts[(s, "zero_grad")] == 1.0 for s in range(5))


def test_grad_none_is_untouched_and_has_no_state():
    used = torch.nn.Parameter(torch.randn(4))
    unused = torch.nn.Parameter(torch.randn(4))
    before = unused.detach().clone()
    opt = LAMB([used, unused], lr=0.1)
    used.grad = torch.randn(4)
    opt.step()
    assert torch.equal(unused.detach(), before)
    assert unused not in opt.state
    assert used in opt.state
    assert opt.last_trust_ratios().shape == (1,)


def test_low_precision_keeps_float32_state():
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, generator=gen).to(torch.bfloat16))
    ref, m, v = p.detach().float(), torch.zeros(64), torch.zeros(64)
    opt = LAMB([p], lr=0.1)
    for _ in range(3):
        p.grad = torch.randn(64, generator=gen).to(torch.bfloat16)
        opt.step()
        reference_step(ref, p.grad.float(), m, v, lr=0.1, betas=(0.9, 0.999), eps=1e-6,
                       weight_decay=0.0, min_trust=0.25, max_weight_norm=10.0)
        ref = ref.to(torch.bfloat16).float()  # the parameter itself is rounded to bf16 each step
    assert p.dtype == torch.bfloat16
    assert opt.state[p]["exp_avg"].dtype == torch.float32
    assert opt.state[p]["exp_avg_sq"].dtype == torch.float32
    torch.testing.assert_close(opt.state[p]["exp_avg_sq"], v, rtol=1e-6, atol=0)
    torch.testing.assert_close(p.detach().float(), ref, rtol=2 ** -7, atol=0)


def test_step_reads_no_tensor_values_on_the_host(monkeypatch):
    # On CPU there is no sync to detect; forbidding the calls that would sync on a GPU is the proxy.
    groups, names = make_groups()
    opt = LAMB(groups)
    make_grads(groups, names, 0)

    def host_read(*args, **kwargs):
        raise AssertionError("host read of a tensor value inside step()")

    for method in ["item", "tolist", "__bool__", "__float__", "__int__"]:
        monkeypatch.setattr(torch.Tensor, method, host_read)
    opt.step()
    monkeypatch.undo()
    assert opt.last_trust_ratios().shape == (6,)

def test_sparse_gradient_raises():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        LAMB(emb.parameters()).step()


def test_state_dict_round_trip_continues_bitwise():
    def run(opt, params, steps):
        for step in steps:
            make_grads([{"params": params}], [["a", "b", "c"]], step)
            opt.step()

    gen = torch.Generator().manual_seed(0)
    # The bfloat16 tensor's float32 moments must survive the round trip unrounded.
    shapes = [((8, 3), torch.float32), ((5,), torch.bfloat16), ((2, 2, 2), torch.float32)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s, dtype in shapes]
    groups = [dict(params=params[:2], lr=0.05), dict(params=params[2:], weight_decay=0.1)]
    opt = LAMB(groups, lr=0.01)
    run(opt, params, range(3))
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buf)
    run(opt, params, range(3, 6))

    buf.seek(0)
    saved = torch.load(buf)
    resumed = [torch.nn.Parameter(p) for p in saved["params"]]
    # Different hyperparameters on purpose: load_state_dict must restore them.
    opt2 = LAMB([dict(params=resumed[:2]), dict(params=resumed[2:])], lr=123.0)
    opt2.load_state_dict(saved["opt"])
    assert opt2.state[resumed[1]]["exp_avg_sq"].dtype == torch.float32
    run(opt2, resumed, range(3, 6))
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)
    assert torch.equal(opt.last_trust_ratios(), opt2.last_trust_ratios())


@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=-1.0), "lr"),
    (dict(betas=(1.0, 0.999)), r"betas\[0\]"),
    (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
    (dict(betas=(0.9,)), "betas"),
    (dict(eps=0.0), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(min_trust=-0.25), "min_trust"),
    (dict(max_weight_norm=0.0), "max_weight_norm"),
    (dict(lr=float("nan")), "lr"),
])
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LAMB([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_bad_group_argument_raises_and_is_not_added():
    opt = LAMB([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="weight_decay"):
        opt.add_param_group(dict(params=[torch.nn.Parameter(torch.zeros(2))], weight_decay=-1.0))
    assert len(opt.param_groups) == 1
