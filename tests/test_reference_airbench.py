"""The airbench94 reference (tests/bench_reference_airbench.py): its network, FLOPs, schedule, lookahead and
training loop. It needs PyTorch, which the project does not: without it these tests are skipped."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import bench_reference_airbench as reference  # noqa: E402  (after the skip: it needs PyTorch)


def test_the_network_is_airbench94s_and_its_forward_pass_costs_236_mflop():
    network = reference.build_network(torch.randn(64, 3, 32, 32))
    # 2 FLOPs per multiply-add: the 2x2 whitening convolution, then two 3x3 convolutions per block, each block's
    # second one after its 2x2 pooling (31 -> 15 -> 7 -> 3 pixels a side), and the 256 x 10 linear layer.
    expected = 2 * (31 * 31 * 24 * 12
                    + 31 * 31 * 64 * 24 * 9 + 15 * 15 * 64 * 64 * 9
                    + 15 * 15 * 256 * 64 * 9 + 7 * 7 * 256 * 256 * 9
                    + 7 * 7 * 256 * 256 * 9 + 3 * 3 * 256 * 256 * 9
                    + 256 * 10)
    assert reference.forward_flops(network, "cpu") == expected == 236_294_720
    trained = [name for name, parameter in network.named_parameters() if parameter.requires_grad]
    assert "0.weight" not in trained and "0.bias" in trained  # the whitening filters are fixed, their offsets learn
    norms = [layer for layer in network.modules() if isinstance(layer, torch.nn.BatchNorm2d)]
    assert len(norms) == 6 and not any(layer.weight.requires_grad for layer in norms)  # no learnt scales
    assert network[7].bias is None  # the linear layer has no bias
    assert network(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_the_whitening_filters_decorrelate_2x2_patches():
    images = torch.randn(256, 3, 32, 32) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)
    images[:, 1] += images[:, 0]  # correlated channels
    filters = reference.whitening_filters(images, epsilon=0.0)
    assert filters.shape == (24, 3, 2, 2) and torch.allclose(filters[12:], -filters[:12])
    whitened = torch.nn.functional.conv2d(images, filters[:12]).permute(1, 0, 2, 3).reshape(12, -1)
    covariance = whitened @ whitened.T / whitened.shape[1]
    assert torch.allclose(covariance, torch.eye(12), atol=0.02)


def test_the_learning_rate_rises_from_a_fifth_to_the_peak_then_falls_to_seven_hundredths():
    steps = 1000
    assert reference.relative_rate(0, steps) == pytest.approx(0.2)
    assert reference.relative_rate(230, steps) == pytest.approx(1.0)
    assert reference.relative_rate(steps, steps) == pytest.approx(0.07)


def test_the_lookahead_averages_weights_and_batch_norm_statistics_and_resets_the_network():
    network = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    lookahead = reference.Lookahead(network)
    start = {name: value.clone() for name, value in network.state_dict().items()}
    network.train()(torch.randn(8, 3))  # moves the running statistics
    with torch.no_grad():
        network[0].weight.add_(1.0)
    moved = {name: value.clone() for name, value in network.state_dict().items()}
    lookahead.reset(network, decay=0.75)
    for name, value in network.state_dict().items():
        if value.dtype.is_floating_point:
            assert torch.allclose(value, 0.75 * start[name] + 0.25 * moved[name]), name
    assert network.state_dict()["1.num_batches_tracked"] == 1  # counters are left alone


def test_a_short_training_learns_a_task_a_few_batches_can_learn(monkeypatch):
    monkeypatch.setattr(reference, "BATCH_SIZE", 64)
    rng = np.random.default_rng(0)

    def photos(count: int):
        """Dark noise with a bright square whose place is the class."""
        labels = rng.integers(0, 10, count)
        images = rng.integers(0, 50, (count, 32, 32, 3)).astype(np.uint8)
        for label in range(10):
            row, column = (label // 5) * 16, (label % 5) * 6
            images[labels == label, row:row + 16, column:column + 6] = 250
        return images, labels

    data = {"train": photos(512), "test": photos(200)}
    budget = 3 * 236_294_720 * 512 * 4  # 4 epochs of 8 steps
    result = reference.train_once(data, seed=0, budget_flops=budget, device="cpu")
    assert result["steps"] == 32 and result["training_flops"] == budget
    assert result["test_accuracy"] > 0.5  # chance is 0.1
