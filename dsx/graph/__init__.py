"""Graph capture (torch.export), the pass manager and fusion passes, and the torch.compile backend."""
