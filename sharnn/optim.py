"""LAMB with a minimum trust ratio: the optimizer the SHA-RNN is trained with.

Merity (2019), "Single Headed Attention RNN: Stop Thinking With Your Head", trains with LAMB
(You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes") in the
variant of Smerity/pytorch-lamb, which has no Adam bias correction, clamps the weight norm at
max_weight_norm and clamps the trust ratio from below at min_trust. Per parameter tensor p with gradient g:

    m = b1 m + (1 - b1) g                 v = b2 v + (1 - b2) g^2
    step = m / (sqrt(v) + eps) + weight_decay p
    w = min(||p||, max_weight_norm)       a = ||step||
    trust = max(w / a if w > 0 and a > 0 else 1, min_trust)
    p -= lr trust step

The math runs on all tensors of one (device, dtype) bucket at once with torch._foreach_* ops and never
syncs with the host. float16/bfloat16 parameters keep float32 moments and are updated in float32, then
rounded back: in bfloat16, v = 0.999 v + 0.001 g^2 would mostly round back to v.
"""

from collections import defaultdict
from itertools import chain

import torch
from torch import Tensor

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _check_hparams(group: dict) -> None:
    """Raise ValueError naming the first bad hyperparameter of a param group."""
    if not group["lr"] >= 0.0:
        raise ValueError(f"lr must be >= 0, got {group['lr']}")
    if len(group["betas"]) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {group['betas']}")
    for i, beta in enumerate(group["betas"]):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {beta}")
    if not group["eps"] > 0.0:
        raise ValueError(f"eps must be > 0, got {group['eps']}")
    if not group["weight_decay"] >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {group['weight_decay']}")
    if not group["min_trust"] >= 0.0:
        raise ValueError(f"min_trust must be >= 0, got {group['min_trust']}")
    if not group["max_weight_norm"] > 0.0:
        raise ValueError(f"max_weight_norm must be > 0, got {group['max_weight_norm']}")


class LAMB(torch.optim.Optimizer):
    """Minimum-trust LAMB of Smerity/pytorch-lamb (see the module docstring for the update).

    Every hyperparameter can be overridden per param group. State per parameter: `exp_avg` (m) and
    `exp_avg_sq` (v), in the parameter's dtype, or float32 for float16/bfloat16 parameters.
    Parameters whose grad is None are skipped and get no state; sparse gradients raise RuntimeError.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, min_trust: float = 0.25,
                 max_weight_norm: float = 10.0):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        min_trust=min_trust, max_weight_norm=max_weight_norm)
        _check_hparams(defaults)
        super().__init__(params, defaults)
        self._trust = torch.empty(0)

    def add_param_group(self, param_group: dict) -> None:
        # Check before adding, so a bad group is never left half-registered.
        _check_hparams({**self.defaults, **param_group})
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict) -> None:
        # Optimizer.load_state_dict casts state tensors to their parameter's dtype, which would round the
        # float32 moments of float16/bfloat16 parameters: put the saved float32 values back afterwards.
        super().load_state_dict(state_dict)
        id_map = dict(zip(chain.from_iterable(g["params"] for g in state_dict["param_groups"]),
                          chain.from_iterable(g["params"] for g in self.param_groups)))
        for param_id, saved in state_dict["state"].items():
            p = id_map[param_id]
            if p.dtype in _LOW_PRECISION:
                self.state[p] = {k: v.to(p.device, torch.float32, copy=True) for k, v in saved.items()}

    def last_trust_ratios(self) -> Tensor:
        """Trust ratios applied by the last `step()`, for logging.

        A 1-D float32 tensor with one entry per parameter that had a gradient, in param-group order, on
        the device of the first such parameter; empty before the first step. Returning it does not sync;
        reading its values on the host (`.tolist()`) does. Not part of `state_dict()`.
        """
        return self._trust

    @torch.no_grad()
    def step(self, closure=None):
        """Apply one update to every parameter with a gradient; return closure() if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        trusts = []  # 0-d trust ratios in param-group order
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("LAMB does not support sparse gradients")
            buckets = defaultdict(list)  # (device, dtype) -> indices into params
            for i, p in enumerate(params):
                buckets[(p.device, p.dtype)].append(i)
            group_trusts = [None] * len(params)
            for indices in buckets.values():
                bucket_trust = self._update([params[i] for i in indices], group)
                for i, trust in zip(indices, bucket_trust.unbind()):
                    group_trusts[i] = trust
            trusts += group_trusts
        if trusts:
            device = trusts[0].device
            self._trust = torch.stack([t.to(device, torch.float32) for t in trusts])
        else:
            self._trust = torch.empty(0)
        return loss

    def _update(self, params: list[Tensor], group: dict) -> Tensor:
        """Update params (one device and dtype) in place; return their trust ratios, shape (len(params),)."""
        beta1, beta2 = group["betas"]
        is_low = params[0].dtype in _LOW_PRECISION
        state_dtype = torch.float32 if is_low else params[0].dtype
        for p in params:
            state = self.state[p]
            if not state:
                state["exp_avg"] = torch.zeros_like(p, dtype=state_dtype)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=state_dtype)
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
        weights = [p.float() for p in params] if is_low else params
        grads = [p.grad.to(state_dtype) for p in params]

        # m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2  (no bias correction)
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        # step = m / (sqrt(v) + eps) + wd p
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denoms, group["eps"])
        steps = torch._foreach_div(exp_avgs, denoms)
        if group["weight_decay"] != 0.0:
            torch._foreach_add_(steps, weights, alpha=group["weight_decay"])
        # trust = max(w / a, min_trust), or max(1, min_trust) where w or a is 0; kept on device (no .item())
        w = torch.stack(torch._foreach_norm(weights)).clamp_(max=group["max_weight_norm"])
        a = torch.stack(torch._foreach_norm(steps))
        trust = torch.where((w > 0) & (a > 0), w / a, 1.0).clamp_(min=group["min_trust"])
        # p -= lr trust step
        torch._foreach_mul_(steps, list((group["lr"] * trust).unbind()))
        torch._foreach_sub_(weights, steps)
        if is_low:
            torch._foreach_copy_(params, weights)
        return trust
