"""Fixtures shared by the recipe tests."""

import functools

import pytest
import torch


@pytest.fixture
def count_compiled_graphs(monkeypatch):
    """Make ``torch.compile`` trace with a backend that counts the graphs and runs them eagerly (a test
    pays for tracing only), and return ``count_after(module, *names)``: it wraps those functions of
    ``module`` so that each call appends the number of graphs traced so far to a list under the
    function's name, in the dict it returns."""
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()  # no graph cached by an earlier test
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counting_backend))

    def count_after(module, *names) -> dict[str, list[int]]:
        counts = {name: [] for name in names}
        for name in names:
            def counted(*args, original=getattr(module, name), name=name, **kwargs):
                result = original(*args, **kwargs)
                counts[name].append(len(graphs))
                return result
            monkeypatch.setattr(module, name, counted)
        return counts

    yield count_after
    torch._dynamo.reset()
