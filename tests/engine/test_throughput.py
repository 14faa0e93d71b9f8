from engine.throughput import StepLoader


class RecordingSampler:
    def __init__(self):
        self.epochs = []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)


def test_step_loader_takes_exactly_n_batches_across_epochs():
    sampler = RecordingSampler()
    steps = StepLoader(["a", "b"], sampler, 5)
    assert len(steps) == 5
    assert list(steps) == ["a", "b", "a", "b", "a"]
    assert sampler.epochs == [0, 1, 2]
