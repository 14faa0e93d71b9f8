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


def test_a_benchmark_ends_the_run_and_leaves_the_process_group(tmp_path):
    # Under torchrun a benchmark ends the run as training does: a process that exits still inside its
    # gloo or NCCL group can abort on the way out (and torchrun then stops the others).
    import datetime

    import torch
    import torch.distributed as dist

    from engine.logging import RunLogger
    from engine.throughput import benchmark_training

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        model = torch.nn.Conv2d(1, 2, 3, padding=1)
        batches = [{"image": torch.randn(3, 1, 5, 7), "label": torch.randint(0, 2, (3, 5, 7))}]
        logger = RunLogger(tmp_path, active=True)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        results = benchmark_training(model, batches, RecordingSampler(), torch.nn.CrossEntropyLoss(), optimizer,
                                     steps=2, scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
                                     scaler=torch.amp.GradScaler("cpu", enabled=False), device=torch.device("cpu"),
                                     amp_dtype=None, grad_clip=None, memory_format=torch.contiguous_format,
                                     out=tmp_path, logger=logger)
        logger.close()
        assert results["steps"] == 2 and (tmp_path / "benchmark.json").is_file()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
