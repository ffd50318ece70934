"""Quickstart: let dsx.optimize pick the fastest verified plan, read its report, save and reload it.

Run: python examples/quickstart.py
"""

import tempfile

import torch

import dsx
from dsx.models import TinyGPT

model = TinyGPT().eval()
tokens = torch.randint(0, 512, (2, 64))

fast = dsx.optimize(model, tokens, max_error=0.01, metric="cosine", budget_s=30)  # same class, any shape
print(dsx.report(fast))                       # every plan tried: latency, speed-up, error, size, the winner
assert type(fast) is TinyGPT and fast(torch.randint(0, 512, (5, 33))).shape == (5, 33, 512)

with tempfile.TemporaryDirectory() as tmp:
    dsx.save(fast, f"{tmp}/tiny-gpt")         # the chosen plan is replayed on load, no second search
    again = dsx.load(TinyGPT().eval(), f"{tmp}/tiny-gpt")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), fast.state_dict().values()))
    torch.testing.assert_close(again(tokens), fast(tokens), rtol=1e-4, atol=1e-4)  # compiled kernels may differ

compiled = torch.compile(model, backend="dsx")
torch.testing.assert_close(compiled(tokens), model(tokens), rtol=1e-4, atol=1e-4)
print("ok")
