"""The training loop and evaluation on tiny synthetic problems (unit tests only; never user-facing)."""
import dataclasses
import re

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from lorakit._io import load_tensors
from lorakit.train import (
    EvalResult, TrainConfig, TrainingDivergedError, classification_loss, distillation_loss, evaluate, train,
)


def blobs(n=120, classes=3, dim=4, seed=0):
    """Linearly separable Gaussian blobs: class k centred at 4 * e_k."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centres = 4.0 * torch.eye(classes, dim)
    return centres[labels] + 0.3 * torch.randn(n, dim, generator=g), labels


def tiny_model(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 3))


def cfg(**overrides):
    return dataclasses.replace(TrainConfig(lr=0.05, batch_size=8, epochs=2, progress=False), **overrides)


def test_same_config_same_weights():
    data = blobs()
    runs = []
    for _ in range(2):
        model = tiny_model(dropout=0.2)  # dropout draws from the global RNG: seeded by train() too
        torch.manual_seed(1234 + len(runs))  # the caller's RNG state must not matter
        train(model, data, cfg())
        runs.append(model.state_dict())
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key


def test_different_seed_different_weights():
    data = blobs()
    a, b = tiny_model(), tiny_model()
    train(a, data, cfg(seed=0))
    train(b, data, cfg(seed=1))
    assert not torch.equal(a[0].weight, b[0].weight)


def test_caller_rng_state_is_left_alone():
    model = tiny_model(dropout=0.5)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    train(model, blobs(), cfg(steps=3))
    assert torch.equal(torch.rand(3), expected)


def test_loss_decreases_and_learns_a_separable_problem():
    data = blobs()
    model = tiny_model()
    history = train(model, data, cfg(epochs=5, log_every=5))
    assert history.losses[-1] < 0.5 * history.losses[0]
    assert evaluate(model, data, num_classes=3).accuracy == 100.0


def test_steps_override_epochs_and_history_windows():
    history = train(tiny_model(), blobs(n=16), cfg(steps=7, epochs=100, log_every=3))
    assert history.steps == 7
    assert history.loss_steps == [3, 6, 7]
    assert history.average_loss == pytest.approx(
        (3 * history.losses[0] + 3 * history.losses[1] + history.losses[2]) / 7)
    assert history.seconds > 0


def test_fractional_epochs_round_up_to_whole_steps():
    # 120 examples / batch 8 = 15 batches per epoch; half an epoch = ceil(7.5) = 8 steps
    assert train(tiny_model(), blobs(), cfg(epochs=0.5)).steps == 8


def test_on_step_is_called_after_every_step():
    seen = []
    train(tiny_model(), blobs(), cfg(steps=5), on_step=seen.append)
    assert seen == [1, 2, 3, 4, 5]


def test_only_trainable_parameters_change():
    model = tiny_model()
    model[0].requires_grad_(False)
    frozen = model[0].weight.clone(), model[0].bias.clone()
    head = model[3].weight.clone()
    train(model, blobs(), cfg(steps=10, weight_decay=0.1))
    assert torch.equal(model[0].weight, frozen[0]) and torch.equal(model[0].bias, frozen[1])
    assert not torch.equal(model[3].weight, head)


def test_explicit_params_limit_what_trains():
    model = tiny_model()
    before = model[0].weight.clone()
    train(model, blobs(), cfg(steps=5), params=model[3].parameters())
    assert torch.equal(model[0].weight, before)


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_optimizers_and_grad_clip_run(optimizer):
    history = train(tiny_model(), blobs(), cfg(steps=4, optimizer=optimizer, grad_clip=1.0, momentum=0.9))
    assert history.steps == 4


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lbfgs")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)


def test_nothing_trainable_is_an_error():
    model = tiny_model().requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        train(model, blobs(), cfg(steps=1))


def nan_at(bad_step):
    """A loss that is NaN at step ``bad_step`` (counted from 1) and cross-entropy otherwise."""
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        loss = classification_loss(model, batch)
        return loss * float("nan") if len(calls) == bad_step else loss

    return loss_fn


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    model = tiny_model()
    with pytest.raises(TrainingDivergedError, match="step 7") as info:
        train(model, blobs(), cfg(steps=20, checkpoint=str(path), checkpoint_every=5), loss_fn=nan_at(7))
    assert info.value.step == 7 and isinstance(info.value, RuntimeError)
    saved = load_tensors(path)
    # The checkpoint is step 5's weights; steps 6 ran afterwards, the NaN step 7 changed nothing.
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert set(saved) == set(model.state_dict())
    assert not torch.equal(saved["0.weight"], model[0].weight)  # step 6 happened after the checkpoint
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert str(path) in str(info.value) and "step 5" in str(info.value)


def test_checkpoint_written_at_the_end(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    model = tiny_model()
    train(model, blobs(), cfg(steps=3, checkpoint=str(path), checkpoint_every=100))
    saved = load_tensors(path)
    for key, value in model.state_dict().items():
        assert torch.equal(saved[key], value)


def test_nan_before_any_checkpoint(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    with pytest.raises(TrainingDivergedError, match="step 1"):
        train(tiny_model(), blobs(), cfg(steps=5, checkpoint=str(path)), loss_fn=nan_at(1))
    assert not path.exists()


class Fixed(nn.Module):
    """Predicts class ``inputs[:, 0]`` (as a one-hot logit), so predictions are chosen by the test."""

    def forward(self, x):
        return nn.functional.one_hot(x[:, 0].long(), 3).float()


def test_evaluate_counts_per_class_by_hand():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    preds = torch.tensor([0, 1, 0, 1, 1, 2, 0, 0, 2, 1])  # wrong: class 0 once, class 2 three times
    result = evaluate(Fixed(), (preds[:, None].float(), labels), num_classes=3, batch_size=4)
    assert result.wrong_per_class == [1, 0, 3]
    assert result.total_per_class == [3, 2, 5]
    assert result.accuracy == pytest.approx(60.0)
    assert result.per_class_accuracy == pytest.approx([200 / 3, 100.0, 40.0])
    assert result.correct == 6


def test_eval_result_to_dict_has_no_nan():
    result = EvalResult.from_counts([0, 0], [4, 0])
    assert result.to_dict()["per_class_accuracy"] == [100.0, None]


def test_evaluate_restores_mode_and_uses_eval_mode():
    model = tiny_model(dropout=0.9)
    data = blobs()
    model.train()
    first = evaluate(model, data, num_classes=3)
    assert model.training
    assert evaluate(model, data, num_classes=3) == first  # dropout off inside evaluate
    model.eval()
    evaluate(model, data, num_classes=3)
    assert not model.training


def test_train_restores_eval_mode():
    model = tiny_model().eval()
    train(model, blobs(), cfg(steps=2))
    assert not model.training


def test_evaluate_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="0..2"):
        evaluate(Fixed(), (torch.zeros(2, 1), torch.tensor([0, 5])), num_classes=3)


class DictData(Dataset):
    """Hugging Face style examples: dicts of tensors with a "labels" entry."""

    def __init__(self):
        self.x, self.y = blobs()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"features": self.x[i], "labels": self.y[i]}


class DictModel(nn.Module):
    """Returns an object with ``.logits`` (and ``.loss`` when labels are given), like transformers."""

    def __init__(self):
        super().__init__()
        self.net = tiny_model()

    def forward(self, features, labels=None):
        logits = self.net(features)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return type("Output", (), {"logits": logits, "loss": loss})()


def test_dict_batches_train_and_evaluate():
    model = DictModel()
    history = train(model, DictData(), cfg(epochs=5))
    assert history.losses[-1] < history.losses[0]
    assert evaluate(model, DictData(), num_classes=3).accuracy > 90


def test_custom_loss_and_predict_hooks():
    def loss_fn(model, batch):
        return nn.functional.cross_entropy(model(batch["features"]), batch["labels"])

    def predict_fn(model, batch):
        return model(batch["features"]).argmax(-1), batch["labels"]

    model = tiny_model()
    train(model, DictData(), cfg(epochs=5), loss_fn=loss_fn)
    assert evaluate(model, DictData(), num_classes=3, predict_fn=predict_fn).accuracy > 90


def test_non_finite_weights_never_overwrite_a_good_checkpoint(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    model = tiny_model()

    def poison(step):
        if step == 10:  # right before the step-10 checkpoint
            with torch.no_grad():
                model[3].bias.fill_(float("inf"))

    with pytest.raises(TrainingDivergedError, match="step 10"):
        train(model, blobs(), cfg(steps=20, checkpoint=str(path), checkpoint_every=5), on_step=poison)
    assert torch.isfinite(load_tensors(path)["3.bias"]).all()


def test_progress_bar_shows_the_loss(capsys):
    train(tiny_model(), blobs(), cfg(steps=4, log_every=2, progress=True))
    assert "loss=" in capsys.readouterr().err


# -- learning-rate schedule, validation, best weights ---------------------------------------------------
from lorakit.train import LRMultiplier, make_scheduler  # noqa: E402


@pytest.mark.parametrize("schedule, warmup, total, expected", [
    ("constant", 0, 10, [1, 1, 1, 1]),
    ("constant", 3, 10, [0.25, 0.5, 0.75, 1]),
    ("linear", 0, 4, [1, 0.75, 0.5, 0.25]),
    ("linear", 2, 6, [1 / 3, 2 / 3, 1, 0.75]),
    ("cosine", 0, 4, [1, (1 + 2 ** -0.5) / 2, 0.5, (1 - 2 ** -0.5) / 2]),
])
def test_lr_multiplier_closed_forms(schedule, warmup, total, expected):
    multiplier = LRMultiplier(schedule, warmup, total)
    assert [multiplier(step) for step in range(len(expected))] == pytest.approx(expected)


def test_scheduler_sets_the_optimizer_lr_of_each_step():
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.4)
    scheduler = make_scheduler(optimizer, cfg(schedule="linear", warmup_steps=1), total_steps=5)
    lrs = []
    for _ in range(5):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.4 * LRMultiplier("linear", 1, 5)(s) for s in range(5)]
    assert lrs == pytest.approx(expected)


def test_train_follows_the_schedule_step_by_step():
    """Plain SGD on one fixed batch: two steps at lr then lr / 2 equal the hand-written updates."""
    x, y = blobs(n=8)
    model = tiny_model()
    reference = tiny_model()
    train(model, (x, y), cfg(optimizer="sgd", lr=0.1, batch_size=8, steps=2, shuffle=False, schedule="linear"))
    for lr in (0.1, 0.05):
        reference.zero_grad()
        classification_loss(reference, (x, y)).backward()
        with torch.no_grad():
            for p in reference.parameters():
                p -= lr * p.grad
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)


def test_keep_best_puts_back_the_best_validation_weights():
    data, validation = blobs(seed=0), blobs(n=60, seed=1)
    model = tiny_model()
    history = train(model, data, cfg(lr=0.5, epochs=3, eval_every=2), validation=validation, num_classes=3)
    assert history.val_steps == list(range(2, history.steps + 1, 2)) + ([history.steps] if history.steps % 2 else [])
    best = max(history.val_accuracies)
    assert history.best_val_accuracy == best
    assert history.best_step == history.val_steps[history.val_accuracies.index(best)]
    assert evaluate(model, validation, num_classes=3).accuracy == best


def test_without_keep_best_the_last_weights_stay():
    data, validation = blobs(seed=0), blobs(n=60, seed=1)
    a, b = tiny_model(), tiny_model()
    train(a, data, cfg(epochs=2, keep_best=False), validation=validation, num_classes=3)
    train(b, data, cfg(epochs=2))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)  # validation scoring changes nothing in the training itself


def test_patience_stops_after_that_many_evaluations_without_improvement():
    x, _ = blobs(n=30, seed=1)
    impossible = (x, torch.full((30,), 2))  # a class the (frozen-at-zero) model never predicts
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([1.0, 0.0, -1.0]))
    model.weight.requires_grad_(False)
    history = train(model, blobs(), cfg(lr=0.0, steps=50, eval_every=1, patience=3), validation=impossible,
                    num_classes=3)
    assert history.stopped_early and history.steps == 4
    assert history.val_accuracies == [0.0] * 4 and history.best_step == 1


@pytest.mark.parametrize("field, value", [("schedule", "step"), ("warmup_steps", -1), ("eval_every", 0),
                                          ("patience", 0)])
def test_bad_schedule_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


# Distillation ---------------------------------------------------------------------------------------------
def _by_hand(student, teacher, labels, weight, temperature):
    """(1 - w) CE + w T^2 KL(p_teacher || p_student), written out with softmaxes and sums."""
    p_teacher = torch.softmax(teacher / temperature, dim=-1)
    log_student = torch.log_softmax(student / temperature, dim=-1)
    kl = (p_teacher * (p_teacher.log() - log_student)).sum(dim=-1).mean()
    ce = -torch.log_softmax(student, dim=-1)[torch.arange(len(labels)), labels].mean()
    return (1 - weight) * ce + weight * temperature ** 2 * kl


@pytest.mark.parametrize("weight, temperature", [(0.0, 2.0), (0.3, 3.0), (0.5, 1.0), (1.0, 2.0)])
def test_distillation_loss_matches_the_formula_by_hand(weight, temperature):
    x, y = blobs(n=24)
    student, teacher = tiny_model(seed=1), tiny_model(seed=2).eval()
    loss = distillation_loss(teacher, weight, temperature)(student, (x, y))
    expected = _by_hand(student(x), teacher(x), y, weight, temperature)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-7)


def test_distillation_from_itself_is_zero_and_dict_batches_match_pairs():
    x, y = blobs(n=24)
    model = DictModel().eval()
    pure = distillation_loss(model, weight=1.0)
    assert pure(model, {"features": x, "labels": y}).item() == pytest.approx(0.0, abs=1e-7)
    teacher = DictModel()
    torch.manual_seed(5)
    teacher.net = tiny_model(seed=5)
    teacher.eval()
    from_dict = distillation_loss(teacher, 0.4, 2.0)(model, {"features": x, "labels": y})
    expected = _by_hand(model.net(x), teacher.net(x), y, 0.4, 2.0)
    assert from_dict.item() == pytest.approx(expected.item(), rel=1e-6)


def test_distillation_alone_teaches_a_student_what_the_teacher_knows():
    teacher = tiny_model(seed=0)
    train(teacher, blobs(), cfg(epochs=5))
    teacher.eval().zero_grad(set_to_none=True)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = tiny_model(seed=3)
    assert evaluate(student, blobs(seed=1), num_classes=3).accuracy < 80
    train(student, blobs(), cfg(epochs=5), loss_fn=distillation_loss(teacher, weight=1.0))  # labels weigh 0
    assert evaluate(student, blobs(seed=1), num_classes=3).accuracy > 95
    assert all(p.grad is None for p in teacher.parameters())  # no gradient reaches the teacher
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items()) and not teacher.training


@pytest.mark.parametrize("kwargs, message", [
    ({"weight": 1.5}, "weight must be in [0, 1]"),
    ({"weight": -0.1}, "weight must be in [0, 1]"),
    ({"temperature": 0.0}, "temperature must be > 0"),
])
def test_bad_distillation_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        distillation_loss(tiny_model().eval(), **kwargs)


def test_a_teacher_in_training_mode_is_refused():
    with pytest.raises(ValueError, match="teacher.eval"):
        distillation_loss(tiny_model())
