"""Quickstart: optimize a model, check what fired, save and reload it, and compile with the dsx backend.

Run: python examples/quickstart.py
"""

import tempfile

import torch

import dsx
from dsx.models import TinyGPT

model = TinyGPT().eval()
tokens = torch.randint(0, 512, (2, 64))

fast = dsx.optimize(model, tokens)
print(dsx.fusions(fast))
print(dsx.summary(fast))

with tempfile.TemporaryDirectory() as tmp:
    dsx.save(fast, f"{tmp}/tiny-gpt")
    again = dsx.load(TinyGPT().eval(), f"{tmp}/tiny-gpt")
    assert torch.equal(again(tokens), fast(tokens))

compiled = torch.compile(model, backend="dsx")
torch.testing.assert_close(compiled(tokens), model(tokens), rtol=1e-4, atol=1e-4)
print("ok")
