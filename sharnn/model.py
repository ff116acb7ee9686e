"""SHA-RNN: Single Headed Attention RNN (Merity 2019, "Stop Thinking With Your Head").

Faithful to the author's reference code (github.com/Smerity/sha-rnn, model.py, Nov 2019); the shared
fidelity fixture checks the logits to 1e-4. Where the paper and that code differ we follow the code
and say so. Axis order is time-major everywhere, as in the reference: (T, B, C).

    bytes -> Embedding -> dropouti -> N x Block -> dropout -> tied output layer -> logits
    Block: h = drop(LSTM(ln_start(h)))                      # the LSTM output REPLACES h (residual=False)
           if attention:  mem_in = ln_mem(h); h = ln_mid(h)
                          h = h + drop(Attn(h, cat(memory, mem_in)))
           h, x = ln_ff(h), ln_xff(h);  h = h + drop(Boom(x))

Carried state (LSTM (h, c) and attention memory) is passed in and out explicitly (`CarryState`).
The keys over the memory, cat(memory, mem_in), are views of a `MemoryWindow` (sharnn/state.py), in which new
positions are written after the memory rather than the memory copied anew every call. Generation adds
`SHARNN.step`: one byte per stream with the same arithmetic, its memories held in MemoryWindows
(`DecodeState`).
Without gradients in eval mode, results computed from the weights alone (reordered LSTM weights, the Boom's
scaled weights, the value gate) are kept between calls and dropped whenever the weights may change
(`sharnn.kernels.kept`; docs/caching.md states the rule).
The model holds only parameters it uses: the reference's `lnout`, `qkvs`, `r_gate` (and `lnmem`,
`lnmid` in blocks without attention) are never read, so they are left out (see `sharnn.convert`).
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sharnn.config import ModelConfig
from sharnn.kernels import (
    Dropout,
    attend,
    attend_cpu,
    attention_path,
    causal_mask,
    check_settings,
    dropout,
    forget_kept,
    get_cpu_kernels,
    kept,
    lstm_packed,
    packed_lstm_ok,
    tracing,
)
from sharnn.state import CarryState, DecodeState, LSTMState, MemoryWindow

# Every LayerNorm in the reference uses eps=1e-12 (apex FusedLayerNorm); torch's 1e-5 moves logits ~2e-3.
LN_EPS = 1e-12


def layer_norm(d: int) -> nn.LayerNorm:
    return nn.LayerNorm(d, eps=LN_EPS)


GELU_SCALE = 1.702  # the reference's GELU: x * sigmoid(1.702 x) == silu(1.702 x) / 1.702


class Overparam(nn.Module):
    """sigmoid(f) * tanh(c) with [c, f] = Linear(d, 2d)(x): over-parameterises the value gate."""

    def __init__(self, d: int):
        super().__init__()
        self.proj = nn.Linear(d, 2 * d)

    def forward(self, x: Tensor) -> Tensor:
        c, f = self.proj(x).chunk(2, dim=-1)
        return torch.sigmoid(f) * torch.tanh(c)


class Boom(nn.Module):
    """Feed-forward without a down projection: Linear(d, d_ff) -> GELU -> sum of d_ff // d chunks."""

    def __init__(self, d: int, d_ff: int, dropout: float):
        super().__init__()
        self.n_chunks = d_ff // d  # the reference truncates d_ff to a multiple of d
        self.proj = nn.Linear(d, d_ff)
        self.drop = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        T, B, C = x.shape
        # The GELU as one fused kernel (silu) on 1.702 x, with the 1.702 folded into the small weight and
        # bias; its 1 / 1.702 goes on the (T, B, C) sum: the chunk sum and dropout are linear.
        w, b = self.proj.weight, self.proj.bias
        if torch.is_grad_enabled() and w.requires_grad:
            w, b = w * GELU_SCALE, b * GELU_SCALE
        else:  # evaluation, generation: kept in eval mode, not scaled per call (1 MB per byte for `small`)
            w, b = kept(self, "scaled", lambda: (w.detach() * GELU_SCALE, b.detach() * GELU_SCALE))
        z = F.silu(F.linear(x, w, b))
        z = self.drop(z)[..., : self.n_chunks * C].view(T, B, self.n_chunks, C)  # (T, B, n_chunks, C)
        return z.sum(dim=-2) * (1.0 / GELU_SCALE)


def lstm_dtype(lstm: nn.LSTM, x: Tensor) -> torch.dtype:
    """The dtype the LSTM computes in (the README's precision table): under CPU autocast with the CPU's own
    kernels (`set_cpu_kernels`, every setting but "torch") the autocast dtype (oneDNN's bf16 LSTM, fast);
    everywhere else its weights' dtype: float32, or the 16-bit weights DeepSpeed's bf16/fp16 engine keeps
    (fp16 with DeepSpeed's loss scaling). Under CUDA autocast the LSTM runs outside it, in float32: torch's
    autocast wrapper for cuDNN RNNs casts input, weights and state to fp16 whatever dtype autocast was asked
    for (aten/src/ATen/cudnn/AutocastRNN.cpp), which under bf16 means an fp16 LSTM with no loss scaler, its
    small gradients flushed to zero. The CPU setting "torch" is the CUDA formulation, so it runs the LSTM
    outside CPU autocast in float32 too."""
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and get_cpu_kernels() != "torch":
        return torch.get_autocast_dtype("cpu")
    return lstm.weight_ih_l0.dtype


class SingleHeadAttention(nn.Module):
    """One head, no key/value projections; keys and values are the (normalised) hidden states.

    q = sigmoid(q_gate) * LayerNorm(Linear(h)),  k = sigmoid(k_gate) * keys,
    v = Overparam(sigmoid(v_gate)) * keys,       softmax(q k^T / sqrt(d) + causal mask) v
    """

    def __init__(self, d: int, dropout: float):
        super().__init__()
        self.q_gate = nn.Parameter(torch.zeros(d))
        self.k_gate = nn.Parameter(torch.zeros(d))
        self.v_gate = nn.Parameter(torch.zeros(d))
        self.query = nn.Linear(d, d)
        self.query_ln = layer_norm(d)
        self.v_overparam = Overparam(d)
        self.dropout = dropout

    def forward(self, h: Tensor, keys: Tensor, segment_keys: Tensor) -> Tensor:
        """h: (T, B, C) the segment; keys: (K, B, C) memory then `segment_keys`, the segment's own keys."""
        T, B, C = h.shape
        drop = self.dropout if self.training else 0.0
        # The key and value gates scale features, so they move off the (memory + T)-long keys onto the
        # T-long side: q . (k_gate * keys) == (q * k_gate) . keys, and
        # A @ (v_gate * keys) == v_gate * (A @ keys).
        # The dropout the reference applies to v = v_gate * keys is drawn on keys: same shape, same mask.
        q = self.queries(h, drop).to(keys.dtype)
        path = attention_path(keys)  # sharnn.kernels: the CPU setting, else set_attention_impl's choice
        if path == "cpu":  # CPU, set_cpu_kernels("fast"): written out, fast dropout masks
            out = attend_cpu(q, keys, segment_keys, drop)
        elif path == "written":  # CUDA (and CPU under "torch"): written out in torch's ops, torch's dropout
            out = attend(q, keys, segment_keys, drop)
        else:  # torch's SDPA. (T, B, C) -> (B, 1, T, C): one head
            v = dropout(keys, drop, self.training)  # F.dropout, except under set_cpu_kernels("fast-masks")
            q, k, v = (t.transpose(0, 1).unsqueeze(1) for t in (q, keys, v))
            mask = causal_mask(T, keys.shape[0] - T, h.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)  # (B, 1, T, C)
            out = out.squeeze(1).transpose(0, 1)  # (T, B, C)
        return out * self.value_gate()

    def value_gate(self) -> Tensor:
        """(C,) Overparam(sigmoid(v_gate)): parameters only, so `kept` in eval mode when no gradient is needed
        (a 256 x 512 product per byte in generation); one per autocast dtype."""
        p = self.v_gate
        if torch.is_grad_enabled() and p.requires_grad:
            return self.v_overparam(torch.sigmoid(p))
        device = p.device.type
        under = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None  # one each
        return kept(self, f"value_gate {under}", lambda: self.v_overparam(torch.sigmoid(p)).detach())

    def queries(self, h: Tensor, drop: float = 0.0) -> Tensor:
        """(T, B, C) float32: the segment's queries with the key gate folded in, q * sigmoid(k_gate), so that
        the attention scores are queries(h) @ keys^T / sqrt(C) (also read by sharnn.attention_report)."""
        C = h.shape[-1]
        # The reference computes this LayerNorm in float32 (it casts before qln), also under mixed precision.
        q = F.layer_norm(self.query(h).float(), (C,), self.query_ln.weight.float(),
                         self.query_ln.bias.float(), LN_EPS)
        q = dropout(torch.sigmoid(self.q_gate.float()) * q, drop, self.training)
        return q * torch.sigmoid(self.k_gate.float())


_WINDOWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Block -> the MemoryWindow its forward builds keys in: a workspace beside the block (out of state_dict and
deep copies), reused only for the memory it handed out last (MemoryWindow.extend checks)."""


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, use_attn: bool):
        super().__init__()
        d = cfg.d_model
        self.ln_start = layer_norm(d)
        self.lstm = nn.LSTM(d, d)
        self.attn = SingleHeadAttention(d, cfg.dropouth) if use_attn else None
        if use_attn:
            self.ln_mem = layer_norm(d)
            self.ln_mid = layer_norm(d)
        self.ln_ff = layer_norm(d)
        self.ln_xff = layer_norm(d)
        self.boom = Boom(d, cfg.d_ff, cfg.dropouth)
        self.drop = Dropout(cfg.dropouth)
        self.mem_len = cfg.mem_len

    def forward(self, h: Tensor, hidden: LSTMState | None, memory: Tensor | None
                ) -> tuple[Tensor, LSTMState, Tensor | None]:
        """h: (T, B, C); the LSTM state and attention memory carried from the previous segment (None at a
        stream's start; the memory always None without attention). Returns h, the LSTM state, the memory."""
        # Under torch.compile (SHARNN.compile) this frame runs eagerly and the methods it calls are compiled
        # (a no-op otherwise; torch.compiler.disable(recursive=False) would do the same but torch.export
        # refuses it). The LSTM and the attention break the graph, and torch compiles the code after a break
        # once for each variant of its inputs it meets, in one cache per method, up to 8 (recompile_limit;
        # then it runs eagerly): so what varies from call to call (whether there is a memory, the keys'
        # concatenation and cut) stays here, and the compiled methods see tensors only.
        torch._dynamo.skip_frame()
        h, hidden = self.recur(h, hidden)
        if self.attn is None:
            return self.feed_forward(h), hidden, None
        h, mem_in = self.ln_mid(h), self.ln_mem(h)
        keys = self.keys(memory, mem_in)
        return self.attend(h, keys, mem_in), hidden, keys[-self.mem_len:]  # memory: (<= M, B, C)

    @torch.compiler.disable  # bookkeeping, run as it is also under torch.compile
    def keys(self, memory: Tensor | None, mem_in: Tensor) -> Tensor:
        """(K, B, C): the memory, then the segment's keys `mem_in`, as a view of this block's MemoryWindow
        (no copy of the memory). Concatenated where a view cannot serve: while tracing (the graph builds
        them) and for SDPA with gradients, which reach the segment's keys only through this one tensor."""
        if memory is None:
            return mem_in
        if tracing() or (mem_in.requires_grad and attention_path(mem_in) == "sdpa"):
            return torch.cat([memory.to(mem_in.dtype), mem_in], dim=0)
        window = _WINDOWS.get(self)
        if window is None or window.mem_len != self.mem_len:
            window = _WINDOWS[self] = MemoryWindow(self.mem_len)
        return window.extend(memory, mem_in)

    def attend(self, h: Tensor, keys: Tensor, mem_in: Tensor) -> Tensor:
        """The attention over `keys` (memory, then the segment's own keys `mem_in`), then the feed-forward."""
        return self.feed_forward(h + self.drop(self.attn(h, keys, mem_in)))

    def step(self, h: Tensor, hidden: LSTMState | None, window: MemoryWindow | None
             ) -> tuple[Tensor, LSTMState]:
        """`forward` for one position (h: (1, B, C)) with the memory in a MemoryWindow, advanced in place."""
        h, hidden = self.recur(h, hidden)
        if self.attn is not None:
            mem_in = self.ln_mem(h)
            h = self.ln_mid(h)
            # The same keys as forward's cat, as views of the window. Streams whose memories hold as many
            # positions attend in one call: all of them, unless the prompts differed in length.
            out = [self.attn(h[:, s], keys, mem_in[:, s]) for s, keys in window.push(mem_in)]
            h = h + self.drop(out[0] if len(out) == 1 else torch.cat(out, dim=1))
        return self.feed_forward(h), hidden

    def recur(self, h: Tensor, hidden: LSTMState | None) -> tuple[Tensor, LSTMState]:
        """ln_start, then the LSTM: (T, B, C) -> (T, B, C) and the next (h, c)."""
        h = self.ln_start(h)
        # Run the LSTM in one dtype for input, state and weights (lstm_dtype): CPU autocast does not cast
        # nn.LSTM's input (oneDNN then fails), and carried state may arrive in another precision.
        dtype = lstm_dtype(self.lstm, h)
        if hidden is not None:
            hidden = (hidden[0].to(dtype), hidden[1].to(dtype))
        h_in = h.to(dtype)
        device = h.device.type
        if packed_lstm_ok(self.lstm, h_in):  # CPU without gradient: oneDNN's LSTM, weights reordered once
            x, hidden = lstm_packed(self.lstm, h_in, hidden)
        elif torch.is_autocast_enabled(device) and (device != "cpu" or dtype == torch.float32):
            # see lstm_dtype: never cuDNN's fp16 autocast wrapper; on a CPU under "torch", as on CUDA
            with torch.autocast(device, enabled=False):
                x, hidden = self.lstm(h_in, hidden)
        else:
            x, hidden = self.lstm(h_in, hidden)
        # The paper draws a residual around the LSTM; the reference code runs residual=False: x replaces h
        # (cast back to the stream's dtype, as the reference's x.float()).
        return self.drop(x).to(h.dtype), hidden

    def feed_forward(self, h: Tensor) -> Tensor:
        h, x = self.ln_ff(h), self.ln_xff(h)
        return h + self.drop(self.boom(x))


class SHARNN(nn.Module):
    """The SHA-RNN language model over bytes. Time-major: inputs (T, B) int64, logits (T, B, vocab)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i in cfg.attn_layers) for i in range(cfg.n_layer))
        self.out_bias = nn.Parameter(torch.zeros(cfg.vocab_size))  # the output weight is embed.weight (tied)
        self.drop_in = Dropout(cfg.dropouti)
        self.drop_out = Dropout(cfg.dropout)
        self.apply(self._init_weights)

    # The Hugging Face Hub (huggingface_hub's mixin, in sharnn's file format) is model I/O:
    # sharnn.io.pretrained, imported
    # only when one of these is called, so the model itself never loads the Hub's client.
    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs) -> "SHARNN":
        """A model from an exported model, checkpoint or run directory, or a Hub repo id `owner/name[@rev]`
        (sharnn.io.pretrained.HubModel.from_pretrained: huggingface_hub's keyword arguments); in eval mode."""
        from sharnn.io.pretrained import HubModel

        return HubModel.from_pretrained(name_or_path, **kwargs)

    def save_pretrained(self, save_directory, **kwargs):
        """Write this model as an exported model (weights, config.json, model card) to `save_directory`."""
        from sharnn.io.pretrained import HubModel

        return HubModel(self).save_pretrained(save_directory, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload this model as an exported model to the Hub repo `repo_id` (huggingface_hub's arguments)."""
        from sharnn.io.pretrained import HubModel

        return HubModel(self).push_to_hub(repo_id, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        # As the reference: N(0, (0.1/sqrt(d))^2) for Linear and Embedding weights, zero Linear biases.
        # LayerNorms keep (1, 0): the reference's apex LayerNorm escaped its init; LSTMs keep torch's default.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.1 / math.sqrt(self.cfg.d_model))
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # What eval mode keeps (sharnn.kernels.kept: reordered LSTM weights, the Boom's scaled weights, the value
    # gate) is dropped wherever the weights may change; nothing else checks them (docs/caching.md).
    def train(self, mode: bool = True) -> "SHARNN":
        """nn.Module.train (eval() calls it too), dropping what eval mode kept: training changes the weights,
        also in ways no version counter sees (DeepSpeed writes them through .data)."""
        forget_kept(self)
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        # every load_state_dict that reaches this model (its own, or a wrapper's), in either mode
        forget_kept(self)
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse: bool = True):
        # to(), half(), cuda(), ...: the parameters move or change dtype
        forget_kept(self)
        return super()._apply(fn, recurse)

    def compile(self, *args, **kwargs) -> None:
        """nn.Module.compile (forward compiled in place), with dynamic shapes from the first call unless
        `dynamic` is given: the segment length changes every training step, the memory grows to mem_len and
        evaluation and samples use other batch sizes, each of which would otherwise compile the model again
        (the first shape, then dynamic ones). Compiling pays off on GPUs; on a CPU it is slower than eager."""
        kwargs.setdefault("dynamic", True)
        super().compile(*args, **kwargs)

    def initial_state(self) -> CarryState:
        return CarryState.empty(self.cfg.n_layer)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: Tensor, state: CarryState | None = None, targets: Tensor | None = None
                ) -> tuple[Tensor, Tensor | None, CarryState]:
        """x: (T, B) bytes. Returns (logits (T, B, V), mean cross-entropy or None, next state)."""
        torch._dynamo.skip_frame()  # the state's bookkeeping runs eagerly under torch.compile: Block.forward
        check_settings()  # $SHARNN_CPU_KERNELS / $SHARNN_ATTENTION name settings (sharnn.kernels)
        T, B = x.shape
        state = state if state is not None else self.initial_state()
        # Cut every memory to its last M - T positions so keys (memory + segment) never exceed M.
        # The reference writes m[-(M - T):], which keeps everything when T == M; we treat M - T <= 0 as empty.
        keep = self.cfg.mem_len - T
        memory = [None if m is None or keep <= 0 else m[-keep:] for m in state.memory]

        h = self.drop_in(self.embed(x))  # (T, B, C)
        new_hidden, new_memory = [], []
        for block, hid, mem in zip(self.blocks, state.hidden, memory):
            h, hid, mem = block(h, hid, mem)
            new_hidden.append(hid)
            new_memory.append(mem)
        h = self.drop_out(h)

        logits = F.linear(h, self.embed.weight, self.out_bias)  # (T, B, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(T * B, -1).float(), targets.reshape(T * B))
        return logits, loss, CarryState(hidden=new_hidden, memory=new_memory)

    def step(self, x: Tensor, state: DecodeState) -> Tensor:
        """One new byte for each of B streams, for generation: x (B,) -> logits (B, V); `state` advances
        in place.

        The arithmetic of `forward(x.view(1, B), carry)`, op for op on the same (1, B, C) shapes, except for
        the memory: forward concatenates the memory with the new position and cuts the result to mem_len,
        a (mem_len, B, C) copy per byte; a `MemoryWindow` writes the new position into a preallocated
        buffer and hands the attention the same keys as a view. Build the state with
        `DecodeState.from_carry` from what forward returned after the prompt."""
        check_settings()
        h = self.drop_in(self.embed(x.view(1, -1)))  # (1, B, C)
        for i, block in enumerate(self.blocks):
            h, state.hidden[i] = block.step(h, state.hidden[i], state.memory[i])
        h = self.drop_out(h)
        return F.linear(h, self.embed.weight, self.out_bias)[0]  # (B, V)
