"""The example's language models (nn.Module) and their sampler (plain PyTorch).

WindowLM (the default): the C++ demo's model (examples/demo/mlp.hpp) as a PyTorch module, a
causal window MLP: the logits at position i read the tokens i - W + 1 .. i (W = 13, the window
that sees a token's operands two numbers back) and position i,
    h = tanh(b1 + P[i] + concat(E[x(i-W+1)], ..., E[x(i)]) W1),  logits = h W2 + b2.
CausalLM: a small pre-norm causal transformer. On this 2-core machine it did not learn the task
in the setup's budget (1,000 SFT steps at d = 64: cross-entropy 0.77, greedy pass@1 0.03), so
the example uses WindowLM; `--arch transformer` selects CausalLM for a longer run elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn


def _tie(emb: nn.Embedding, base: list[int], sigma: float, generator: torch.Generator) -> None:
    """Input embeddings of the surface variants start near their symbol's (N(0, sigma^2) apart),
    as in a pretrained model (the C++ demo's tie_embeddings); the output layer does not."""
    with torch.no_grad():
        w = emb.weight
        idx = torch.tensor(base, device=w.device)
        noise = torch.randn(w.shape, generator=generator).to(w.device) * sigma
        w.copy_(w[idx] + noise)


class WindowLM(nn.Module):
    def __init__(self, vocab: int, max_len: int, window: int = 13, embed: int = 16, hidden: int = 64, pad: int = 0):
        super().__init__()
        self.vocab, self.max_len, self.window, self.pad = vocab, max_len, window, pad
        self.tok = nn.Embedding(vocab, embed)
        self.pos = nn.Embedding(max_len, hidden)
        self.inp = nn.Linear(window * embed, hidden)
        self.head = nn.Linear(hidden, vocab)
        nn.init.normal_(self.tok.weight, std=1.0)
        nn.init.normal_(self.pos.weight, std=0.1)

    def tie_surface_embeddings(self, base: list[int], sigma: float, generator: torch.Generator) -> None:
        _tie(self.tok, base, sigma, generator)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V]; row t is the distribution of token t + 1."""
        B, T = tokens.shape
        if T > self.max_len:
            raise ValueError(f"sequence of {T} tokens longer than the model's {self.max_len}")
        x = torch.nn.functional.pad(tokens, (self.window - 1, 0), value=self.pad)
        win = x.unfold(1, self.window, 1)  # [B, T, W]: tokens t - W + 1 .. t
        e = self.tok(win).flatten(2)  # [B, T, W * embed]
        h = torch.tanh(self.inp(e) + self.pos.weight[:T])
        return self.head(h)


class CausalLM(nn.Module):
    def __init__(self, vocab: int, max_len: int, d_model: int = 64, n_layers: int = 2, n_heads: int = 4):
        super().__init__()
        self.vocab, self.max_len = vocab, max_len
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, dim_feedforward=4 * d_model, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        nn.init.normal_(self.tok.weight, std=0.5)
        nn.init.normal_(self.pos.weight, std=0.5)
        self.register_buffer("causal", torch.triu(torch.full((max_len, max_len), float("-inf")), 1), persistent=False)

    def tie_surface_embeddings(self, base: list[int], sigma: float, generator: torch.Generator) -> None:
        _tie(self.tok, base, sigma, generator)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V]; row t is the distribution of token t + 1."""
        T = tokens.shape[1]
        if T > self.max_len:
            raise ValueError(f"sequence of {T} tokens longer than the model's {self.max_len}")
        x = self.tok(tokens) + self.pos.weight[:T]
        x = self.blocks(x, mask=self.causal[:T, :T], is_causal=True)
        return self.head(self.norm(x))


@torch.no_grad()
def sample(model: nn.Module, contexts: list[list[int]], max_new: int, eos: int, pad: int, temperature: float,
           generator: torch.Generator | None) -> list[list[int]]:
    """Continues each context (a list of token ids) until EOS, `max_new` tokens or the model's
    last position (a context with a long teacher prefix has less room; one that fills every
    position gets an empty continuation, as tropd/schedules/plan.hpp allows): T = 1
    sampling with torch.multinomial, or greedy decoding with temperature 0. Contexts of
    different lengths are right-padded; each row reads its own last position. Returns the
    continuations (the EOS included when it was sampled)."""
    device = model.head.weight.device
    B = len(contexts)
    lens = torch.tensor([len(c) for c in contexts], device=device)
    max_len = getattr(model, "max_len", int(lens.max()) + max_new)
    if int(lens.max()) > max_len:
        raise ValueError(f"a context of {int(lens.max())} tokens is longer than the model's {max_len} positions")
    limit = torch.clamp(lens + max_new, max=max_len)  # each row's end: the budget or the model's last position
    T = int(limit.max())
    buf = torch.full((B, T), pad, dtype=torch.long, device=device)
    for i, c in enumerate(contexts):
        buf[i, : len(c)] = torch.tensor(c, dtype=torch.long)
    cur = lens.clone()
    done = cur >= limit
    rows = torch.arange(B, device=device)
    for _ in range(max_new):
        if bool(done.all()):
            break
        width = int(cur.max())
        logits = model(buf[:, :width])[rows, cur - 1].float()
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(device)
        else:
            nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        live = ~done
        buf[rows[live], cur[live]] = nxt[live]
        cur = cur + live.long()
        done = done | (nxt == eos) | (cur >= limit)
    return [buf[i, len(c) : int(cur[i])].tolist() for i, c in enumerate(contexts)]
