import json
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dsx
from dsx.compress.distill import Distill, DistillationLoss, distill
from dsx.core.transform import Transform


def mlp(*widths, seed=0):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def toy_data(n=4, batch=8, features=6, classes=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, features, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n)]


# --- accuracy on scikit-learn digits -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y),
                                                        test_size=0.3, random_state=0, stratify=y)
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))
    train = [(x_train[order[i:i + 64]], y_train[order[i:i + 64]]) for i in range(0, len(order), 64)]
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
                            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                            nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(teacher.parameters(), lr=3e-3)
    for _ in range(8):
        for xb, yb in train:
            opt.zero_grad()
            F.cross_entropy(teacher(xb), yb).backward()
            opt.step()
    return teacher.eval(), train, x_test, y_test


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def soft_kl(teacher, student, x, temperature=4.0):
    with torch.no_grad():
        log_t = (teacher(x) / temperature).log_softmax(-1)
        return (log_t.exp() * (log_t - (student(x) / temperature).log_softmax(-1))).sum(-1).mean().item()


def test_distilled_student_is_close_to_the_teacher_and_closer_than_label_training(digits):
    teacher, train, x_test, y_test = digits
    teacher_acc = accuracy(teacher, x_test, y_test)
    assert teacher_acc >= 0.97  # measured 0.978
    student = mlp(64, 32, 10).eval()
    kd, losses = distill(teacher, student, train, epochs=20, lr=1e-2, progress=False)
    baseline, _ = distill(teacher, student, train, epochs=20, lr=1e-2, alpha=0.0, progress=False)
    kd_acc, baseline_acc = accuracy(kd, x_test, y_test), accuracy(baseline, x_test, y_test)
    # Measured 0.969 (distilled) and 0.965 (labels only) vs the teacher's 0.978. Distillation does not beat label
    # training reliably on digits over seeds and splits (the label-trained student reaches ~0.96-0.97 too), so
    # the comparison asserted is what distillation optimizes: agreement with the teacher on held-out data.
    assert kd_acc >= teacher_acc - 0.03
    assert baseline_acc >= teacher_acc - 0.05
    assert soft_kl(teacher, kd, x_test) < 0.5 * soft_kl(teacher, baseline, x_test)  # measured 0.024 vs 0.103
    assert len(losses) == 20 * len(train)
    info = dsx.history(kd)[-1]["info"]
    assert info["steps"] == len(losses) and info["final_loss"] == losses[-1]
    assert len(info["epoch_losses"]) == 20 and info["epoch_losses"][-1] < 0.5 * info["epoch_losses"][0]


def test_label_free_distillation_reaches_the_teacher(digits):
    teacher, train, x_test, y_test = digits
    student, _ = distill(teacher, mlp(64, 32, 10), [x for x, _ in train], epochs=20, alpha=1.0, lr=1e-2,
                         progress=False)
    assert accuracy(student, x_test, y_test) >= accuracy(teacher, x_test, y_test) - 0.03  # measured 0.969 vs 0.978


# --- the loss ------------------------------------------------------------------------------------------------------

def test_loss_matches_the_hand_computed_formula():
    s, t, temperature, alpha, label = [1.0, 2.0, 0.5], [2.0, 0.0, 1.0], 2.0, 0.6, 1

    def softmax(v):
        e = [math.exp(x) for x in v]
        return [x / sum(e) for x in e]

    p_t, p_s = softmax([x / temperature for x in t]), softmax([x / temperature for x in s])
    kl = sum(a * (math.log(a) - math.log(b)) for a, b in zip(p_t, p_s))
    ce = -math.log(softmax(s)[label])
    expected = alpha * temperature ** 2 * kl + (1 - alpha) * ce
    loss = DistillationLoss(temperature=temperature, alpha=alpha)
    got = loss(torch.tensor([s], dtype=torch.float64), torch.tensor([t], dtype=torch.float64), torch.tensor([label]))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    kd_only = loss(torch.tensor([s]), torch.tensor([t]))
    assert kd_only.item() == pytest.approx(alpha * temperature ** 2 * kl, rel=1e-5)


def test_token_logits_average_over_positions_and_mask():
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    labels = torch.randint(0, 7, (2, 3))
    loss = DistillationLoss()
    flat = loss(s.reshape(6, 7), t.reshape(6, 7), labels.reshape(6))
    assert loss(s, t, labels).item() == pytest.approx(flat.item(), rel=1e-6)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    keep = mask.bool()
    masked = DistillationLoss(alpha=1.0)(s, t, mask=mask)
    assert masked.item() == pytest.approx(DistillationLoss(alpha=1.0)(s[keep], t[keep]).item(), rel=1e-6)


def test_model_outputs_use_logits_or_the_first_tensor():
    @dataclass
    class Out:
        hidden: torch.Tensor
        logits: torch.Tensor

    s, t = torch.randn(4, 5), torch.randn(4, 5)
    loss = DistillationLoss(alpha=1.0)
    expected = loss(s, t).item()
    assert loss(Out(torch.randn(4, 2), s), (t, torch.randn(3))).item() == pytest.approx(expected)
    assert loss({"logits": s}, [t]).item() == pytest.approx(expected)


def test_loss_rejects_bad_settings_and_shapes():
    with pytest.raises(ValueError, match="temperature"):
        DistillationLoss(temperature=0)
    with pytest.raises(ValueError, match="alpha"):
        DistillationLoss(alpha=1.5)
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(4, 10\)"):
        DistillationLoss()(torch.randn(4, 5), torch.randn(4, 10))
    with pytest.raises(ValueError, match="student and teacher modules"):
        DistillationLoss(features={"0": "0"})
    with pytest.raises(ValueError, match="target"):
        DistillationLoss()(torch.randn(4, 5), torch.randn(4, 5), torch.randint(0, 5, (3,)))


def test_feature_projection_linear_is_built_up_front_and_trains():
    student, teacher = mlp(6, 16, 5), mlp(6, 32, 5, seed=1)
    loss = DistillationLoss(features={"0": "0", "1": "1"}, student=student, teacher=teacher)
    proj = loss.projections["0"]
    assert isinstance(proj, nn.Linear) and (proj.in_features, proj.out_features) == (16, 32)
    before = params(loss)
    opt = torch.optim.SGD([*student.parameters(), *loss.parameters()], lr=0.1)
    x = torch.randn(8, 6)
    for _ in range(3):
        with torch.no_grad():
            t_out = teacher(x)
        value = loss(student(x), t_out)
        opt.zero_grad()
        value.backward()
        opt.step()
    # the ReLU outputs' widths are only known at the first call: that projection was created then
    assert isinstance(loss.projections["1"], nn.Linear)
    assert not torch.equal(before["projections.0.weight"], loss.projections["0"].weight)
    loss.remove_hooks()
    student(x)
    assert loss._seen["student"] == {}


def test_conv_features_use_a_1x1_conv_projection():
    student = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10))
    teacher = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10))
    loss = DistillationLoss(features={"0": "0"}, student=student, teacher=teacher)
    proj = loss.projections["0"]
    assert isinstance(proj, nn.Conv2d) and proj.kernel_size == (1, 1)
    assert (proj.in_channels, proj.out_channels) == (4, 8)
    x = torch.randn(2, 1, 8, 8)
    loss(student(x), teacher(x)).backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


def test_distill_trains_the_projection_with_the_student():
    student, teacher = mlp(6, 16, 5), mlp(6, 32, 5, seed=1)
    seen = []

    def make_optimizer(ps):
        seen.extend((p, p.detach().clone()) for p in ps)
        return torch.optim.SGD(ps, lr=0.1)

    out, _ = distill(teacher, student, toy_data(), epochs=2, features={"0": "0"}, optimizer=make_optimizer,
                     progress=False)
    projection = [(p, start) for p, start in seen if not any(p is q for q in out.parameters())]
    assert {tuple(p.shape) for p, _ in projection} == {(32, 16), (32,)}
    assert all(not torch.equal(p, start) for p, start in projection)
    assert dsx.history(out)[-1]["info"]["projections"] == ["0"]
    assert not out._forward_hooks and not out[0]._forward_hooks and not teacher[0]._forward_hooks


def test_unknown_feature_names_list_valid_ones():
    student, teacher = mlp(6, 16, 5), mlp(6, 32, 5)
    with pytest.raises(ValueError, match=r"student has no module named 'fc1'.*'0', '1', '2'"):
        DistillationLoss(features={"fc1": "0"}, student=student, teacher=teacher)
    with pytest.raises(ValueError, match="teacher has no module named '7'"):
        distill(teacher, student, toy_data(), features={"0": "7"}, progress=False)


# --- distill(): training contract ----------------------------------------------------------------------------------

class Recorder(nn.Module):
    """Wraps a model and records the training flag and grad mode of each call."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, x):
        self.calls.append((self.training, torch.is_grad_enabled()))
        return self.inner(x)


def test_teacher_is_unchanged_and_its_mode_restored():
    teacher = Recorder(nn.Sequential(mlp(6, 32, 5, seed=1), nn.Dropout(0.5))).train()
    teacher.inner[1].eval()
    before = params(teacher)
    student = Recorder(mlp(6, 8, 5)).eval()
    out, _ = distill(teacher, student, toy_data(), epochs=2, progress=False)
    assert same(before, params(teacher))
    assert teacher.training and not teacher.inner[1].training
    assert set(teacher.calls) == {(False, False)}
    assert set(out.calls) == {(True, True)}
    assert not out.training and not any(m.training for m in out.modules())


def test_student_mode_is_restored_per_module():
    student = mlp(6, 8, 5).train()
    student[0].eval()
    out, _ = distill(mlp(6, 32, 5), student, toy_data(), progress=False)
    assert out.training and not out[0].training and out[2].training


def test_callers_student_is_untouched_unless_inplace():
    teacher, student = mlp(6, 32, 5, seed=1), mlp(6, 8, 5)
    before = params(student)
    out, losses = distill(teacher, student, toy_data(), epochs=2, progress=False)
    assert out is not student and same(before, params(student)) and not same(before, params(out))
    assert not dsx.history(student) and len(losses) == 8
    trained, _ = distill(teacher, student, toy_data(), inplace=True, progress=False)
    assert trained is student and not same(before, params(student))
    assert dsx.history(student)[-1]["transform"] == "distill"


def test_a_ready_optimizer_is_rebound_to_the_copy():
    teacher, student = mlp(6, 32, 5, seed=1), mlp(6, 8, 5)
    before = params(student)
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    out, _ = distill(teacher, student, toy_data(), optimizer=opt, progress=False)
    assert same(before, params(student)) and not same(before, params(out))
    assert not opt.state
    with pytest.raises(ValueError, match="optimizer: the ready optimizer holds parameters that are not"):
        distill(teacher, student, toy_data(), optimizer=torch.optim.SGD(teacher.parameters(), lr=0.1),
                progress=False)


def test_progress_bar_goes_to_stderr_only_when_enabled(capsys):
    teacher, student = mlp(6, 32, 5, seed=1), mlp(6, 8, 5)
    distill(teacher, student, toy_data(), progress=False)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""
    distill(teacher, student, toy_data(), progress=True)
    assert "dsx distill" in capsys.readouterr().err


def test_bad_inputs_raise_clear_errors():
    teacher, student = mlp(6, 32, 5, seed=1), mlp(6, 8, 5)
    with pytest.raises(ValueError, match="data: no batches"):
        distill(teacher, student, [], progress=False)
    with pytest.raises(ValueError, match=r"student output shape \(8, 3\) and teacher output shape \(8, 5\)"):
        distill(teacher, mlp(6, 8, 3), toy_data(), progress=False)
    with pytest.raises(ValueError, match="temperature"):
        distill(teacher, student, toy_data(), temperature=-1.0, progress=False)
    with pytest.raises(ValueError, match="alpha"):
        distill(teacher, student, toy_data(), alpha=-0.1, progress=False)
    with pytest.raises(ValueError, match="epochs"):
        distill(teacher, student, toy_data(), epochs=0, progress=False)
    with pytest.raises(ValueError, match="one-shot iterator"):
        distill(teacher, student, iter(toy_data()), epochs=2, progress=False)
    with pytest.raises(TypeError, match="wrap a single batch in a list"):
        distill(teacher, student, torch.randn(8, 6), progress=False)
    with pytest.raises(ValueError, match="batch 0 is a tuple of 3 items"):
        distill(teacher, student, [(torch.randn(8, 6), torch.zeros(8), torch.zeros(8))], progress=False)
    bad = toy_data(3)
    bad[1] = (torch.full((8, 6), float("nan")), bad[1][1])
    with pytest.raises(ValueError, match=r"data: batch 1: input args\[0\] contains NaN or inf"):
        distill(teacher, student, bad, progress=False)
    bad[1] = (torch.full((8, 6), 3e38), bad[1][1])  # finite inputs whose loss overflows
    with pytest.raises(ValueError, match=r"loss is (nan|inf) at step 2 \(epoch 1, batch 1\)"):
        distill(teacher, student, bad, progress=False)
    with pytest.raises(ValueError, match="teacher"):
        Distill(data=toy_data())(student)
    with pytest.raises(ValueError, match="device: expected a torch device such as 'cpu' or 'cuda:0', got 'gpu'"):
        distill(teacher, student, toy_data(), device="gpu", progress=False)
    with pytest.raises(TypeError, match="loss_fn: expected a callable"):
        Distill(teacher=teacher, data=toy_data(), loss_fn="print")
    labels = [(x, y.clone().fill_(7)) for x, y in toy_data(2)]
    with pytest.raises(ValueError, match=r"target: class indices must lie in \[0, 5\) \(or be -100\)"):
        distill(teacher, student, labels, progress=False)
    padded = [(x, torch.where(torch.arange(len(y)) % 2 == 0, y, -100)) for x, y in toy_data(2)]
    distill(teacher, student, padded, progress=False)  # -100 marks unlabelled rows


def test_dataloader_and_generator_data():
    x, y = torch.randn(32, 6), torch.randint(0, 5, (32,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    _, losses = distill(mlp(6, 32, 5), mlp(6, 8, 5), loader, epochs=2, device="cpu", progress=False)
    assert len(losses) == 8
    _, losses = distill(mlp(6, 32, 5), mlp(6, 8, 5), (b for b in toy_data()), progress=False)
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)


# --- Hugging Face style batches ------------------------------------------------------------------------------------

@dataclass
class LMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


class TinyLM(nn.Module):
    def __init__(self, dim, vocab=11, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None):
        return LMOutput(self.head(torch.tanh(self.embed(input_ids))))


class TinyLMWithLoss(TinyLM):
    def forward(self, input_ids, attention_mask=None, labels=None):
        out = super().forward(input_ids, attention_mask)
        if labels is not None:
            self.labels_seen = True
            out.loss = F.cross_entropy(out.logits.flatten(0, 1), labels.flatten())
        return out


def lm_batches(n=4):
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 11, (4, 6), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones(4, 6, dtype=torch.long),
                    "labels": (ids + 1) % 11})
    return out


def test_hf_style_dict_batches():
    teacher = TinyLM(32, seed=1)
    student, losses = distill(teacher, TinyLM(4), lm_batches(), epochs=5, lr=3e-2, progress=False)
    assert isinstance(student(lm_batches(1)[0]["input_ids"]), LMOutput)
    info = dsx.history(student)[-1]["info"]
    assert info["epoch_losses"][-1] < info["epoch_losses"][0]
    # a student whose forward takes labels gets them (its own .loss is the task loss); the teacher never does
    with_loss, _ = distill(teacher, TinyLMWithLoss(4), lm_batches(), progress=False)
    assert with_loss.labels_seen


# --- the transform: history, verification, save / load -------------------------------------------------------------

def test_transform_records_history_and_verifies_shapes_only():
    teacher, student = mlp(6, 32, 5, seed=1), mlp(6, 8, 5)
    step = Distill(teacher, toy_data(), epochs=2, progress=False)
    out = step(student, torch.randn(3, 6))
    entry = dsx.history(out)[-1]
    assert entry["transform"] == "distill" and entry["stage"] == "distill"
    assert entry["config"] == {"epochs": 2, "temperature": 4.0, "alpha": 0.7, "features": None, "lr": 1e-3,
                               "feature_weight": 1.0}
    # outputs change by design: no error bound (an infinite tolerance, recorded as None), shapes still checked
    assert step.tolerance_for(torch.float32) == math.inf and entry["error"]["max_rel"] > 1e-4
    assert entry["error"]["tolerance"] in (None, math.inf)
    assert len(step.losses) == 8 and entry["info"]["steps"] == 8
    json.dumps(entry)
    replayed = Transform.from_config("distill", entry["config"])
    assert replayed.teacher is None and "Distill(epochs=2" in repr(step)


def test_save_load_round_trip_is_bit_exact(tmp_path):
    teacher, student = mlp(6, 32, 5, seed=1), mlp(6, 8, 5)
    out, _ = distill(teacher, student, toy_data(), epochs=2, features={"0": "0"}, progress=False)
    dsx.save(out, tmp_path / "student")
    fresh = mlp(6, 8, 5, seed=3)
    loaded = dsx.load(fresh, tmp_path / "student")
    x = torch.randn(5, 6)
    assert torch.equal(loaded(x), out(x))
    assert same(params(loaded), params(out))
    assert [e["transform"] for e in dsx.history(loaded)] == ["distill"]
