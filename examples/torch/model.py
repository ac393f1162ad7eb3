"""A small causal transformer language model and its sampler (plain PyTorch).

Pre-norm blocks (torch.nn.TransformerEncoderLayer, norm_first) with a causal mask, learned
token and absolute position embeddings, an untied output layer. The task needs each token to
look a fixed distance back (two numbers and a carry), which attention over absolute positions
learns quickly.
"""

from __future__ import annotations

import torch
from torch import nn


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
        """Input embeddings of the surface variants start near their symbol's (N(0, sigma^2)
        apart), as in a pretrained model (the C++ demo's tie_embeddings); the output layer does not."""
        with torch.no_grad():
            w = self.tok.weight
            idx = torch.tensor(base, device=w.device)
            noise = torch.randn(w.shape, generator=generator).to(w.device) * sigma
            w.copy_(w[idx] + noise)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V]; row t is the distribution of token t + 1."""
        T = tokens.shape[1]
        if T > self.max_len:
            raise ValueError(f"sequence of {T} tokens longer than the model's {self.max_len}")
        x = self.tok(tokens) + self.pos.weight[:T]
        x = self.blocks(x, mask=self.causal[:T, :T], is_causal=True)
        return self.head(self.norm(x))


@torch.no_grad()
def sample(model: CausalLM, contexts: list[list[int]], max_new: int, eos: int, pad: int, temperature: float,
           generator: torch.Generator | None) -> list[list[int]]:
    """Continues each context (a list of token ids) until EOS or `max_new` tokens: T = 1
    sampling with torch.multinomial, or greedy decoding with temperature 0. Contexts of
    different lengths are right-padded; each row reads its own last position. Returns the
    continuations (the EOS included when it was sampled)."""
    device = model.head.weight.device
    B = len(contexts)
    lens = torch.tensor([len(c) for c in contexts], device=device)
    T = int(lens.max()) + max_new
    buf = torch.full((B, T), pad, dtype=torch.long, device=device)
    for i, c in enumerate(contexts):
        buf[i, : len(c)] = torch.tensor(c, dtype=torch.long)
    cur = lens.clone()
    done = torch.zeros(B, dtype=torch.bool, device=device)
    rows = torch.arange(B, device=device)
    for _ in range(max_new):
        width = int(cur.max())
        logits = model(buf[:, :width])[rows, cur - 1].float()
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(device)
        else:
            nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        buf[rows, cur] = nxt
        cur = cur + (~done).long()
        done = done | (nxt == eos)
        if bool(done.all()):
            break
    return [buf[i, len(c) : int(cur[i])].tolist() for i, c in enumerate(contexts)]
