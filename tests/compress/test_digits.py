"""Recovery on scikit-learn digits: a CNN teacher, then a 50%-structured-pruned student and a 2:4-sparse student,
each fine-tuned with ``dsx.distill``, end within 1 percentage point of the teacher's test accuracy."""

import pytest
import torch
import torch.nn as nn

import dsx
from dsx.compress.sparsity import check_2to4

datasets = pytest.importorskip("sklearn.datasets")


class DigitsCNN(nn.Module):
    """Two conv-BN-ReLU stages and an MLP head on the 8 x 8 digit images; the hidden linear takes 2:4."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def digits():
    data = datasets.load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def batches(x, y, seed, size=64):
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return [(x[i], y[i]) for i in perm.split(size)]


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    (xtr, ytr), test = digits()
    teacher = DigitsCNN()
    opt = torch.optim.Adam(teacher.parameters(), lr=3e-3)
    for epoch in range(8):
        teacher.train()
        for xb, yb in batches(xtr, ytr, epoch):
            opt.zero_grad()
            nn.functional.cross_entropy(teacher(xb), yb).backward()
            opt.step()
    teacher.eval()
    return teacher, (xtr, ytr), test


def recover(teacher, student, train, epochs):
    data = [b for e in range(epochs) for b in batches(*train, 100 + e)]
    student, losses = dsx.distill(teacher, student, data, epochs=1, lr=1e-3, progress=False)
    return student.eval(), losses


def test_teacher_is_accurate(setup):
    teacher, _, test = setup
    assert accuracy(teacher, *test) > 0.95


def test_structured_half_pruned_student_recovers_within_one_point(setup):
    teacher, train, test = setup
    x = test[0][:8]
    student = dsx.prune(teacher, 0.5, structured=True, example_inputs=x)
    info = dsx.history(student)[-1]["info"]
    assert abs(info["ratio"] - 0.5) <= 0.05
    assert sum(p.numel() for p in student.parameters()) < 0.55 * sum(p.numel() for p in teacher.parameters())
    student, losses = recover(teacher, student, train, epochs=12)
    assert losses[-1] < losses[0]
    assert accuracy(student, *test) >= accuracy(teacher, *test) - 0.01


def test_two_four_sparse_student_recovers_within_one_point_and_keeps_the_pattern(setup):
    teacher, train, test = setup
    student = dsx.sparsify(teacher, "2:4", example_inputs=test[0][:8])
    hidden = student.head[1]
    assert check_2to4(hidden.weight)
    student, _ = recover(teacher, student, train, epochs=6)
    assert check_2to4(student.head[1].weight)
    assert accuracy(student, *test) >= accuracy(teacher, *test) - 0.01
