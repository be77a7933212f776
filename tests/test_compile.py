"""torch.compile as an option (compile.py): where it cannot be used, the same results eagerly and a warning that
says why. Compiling itself takes minutes on the course CPU, so these tests make it unavailable or failing; the
benchmark (benchmarks/decode_vs_hf.py --compile) runs the real thing."""

import copy
import functools
import warnings

import pytest
import torch

from mini_deepseek import ByteTokenizer, DeepSeekV3, ModelConfig, TokenDataset, TrainConfig, train
from mini_deepseek import compile as compile_module
from mini_deepseek.compile import CompileNotice, MaybeCompiled, compiler_missing


def small_model() -> DeepSeekV3:
    torch.manual_seed(0)
    return DeepSeekV3(ModelConfig.preset("toy", n_layers=2, max_seq_len=64)).eval()


def test_without_a_compiler_generate_warns_and_decodes_eagerly(monkeypatch):
    model = small_model()
    prompt = torch.randint(0, 264, (2, 5))
    eager = model.generate(prompt, 6)
    monkeypatch.setattr(compile_module, "compiler_missing", lambda device: "no C++ compiler on PATH (g++)")
    with pytest.warns(CompileNotice, match="no C.. compiler"):
        compiled = model.generate(prompt, 6, compile=True)
    assert torch.equal(compiled, eager)


def test_a_compilation_that_fails_falls_back_to_eager_with_the_reason(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("inductor exploded")

    monkeypatch.setattr(compile_module, "compiler_missing", lambda device: None)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: broken)
    step = MaybeCompiled(lambda a: a + 1, torch.device("cpu"), "test step")
    with pytest.warns(CompileNotice, match="inductor exploded"):
        assert step(1) == 2
    assert step(2) == 3  # eager from then on, without another warning


def test_train_with_compile_falls_back_to_the_same_losses(monkeypatch):
    monkeypatch.setattr(compile_module, "compiler_missing", lambda device: "no C++ compiler on PATH (g++)")
    data = TokenDataset.from_text("def f(x):\n    return x + 1\n" * 200, ByteTokenizer())
    cfg = dict(steps=3, batch_size=2, seq_len=16, eval_every=0, warmup_steps=1)
    losses = []
    for compile_flag in (False, True):
        model = small_model().train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CompileNotice)
            history = train(model, data, TrainConfig(**cfg, compile=compile_flag))
        losses.append([r["loss"] for r in history.train])
    assert losses[0] == losses[1]


def test_compiler_missing_names_the_device_it_cannot_serve():
    assert "meta" in compiler_missing(torch.device("meta"))


def graphs_traced(fn, *args) -> int:
    """How many graphs torch.compile(fn, dynamic=True), as MaybeCompiled builds it, cuts fn into on these arguments;
    traced by dynamo alone (the backend keeps each graph as it is: seconds, where inductor takes minutes)."""
    graphs = []

    def keep(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    try:
        torch.compile(fn, backend=keep, dynamic=True)(*args)
    finally:
        torch._dynamo.reset()
    return len(graphs)


def test_what_torch_compile_traces_is_one_graph_each():
    """The training loss terms (MLA, the MoE layers with either balance loss, the MTP module) and a cached
    decoding step are one graph each. A graph break (a branch on a tensor's value, a shape that depends on one, an
    argument SDPA refuses when symbolic) would cut the compiled function into pieces run eagerly in between."""
    model = small_model().train()
    assert model.mtp and model.config.seq_aux_alpha > 0
    x = torch.randint(0, 264, (2, 32), generator=torch.Generator().manual_seed(0))
    y = x.roll(-1, dims=1)
    assert graphs_traced(model.loss_terms, x, y, y != -100, (1,)) == 1
    with_aux_loss = DeepSeekV3(ModelConfig.preset("toy", n_layers=2, max_seq_len=64, aux_loss_alpha=0.01)).train()
    assert graphs_traced(with_aux_loss.loss_terms, x, y, y != -100, (1,)) == 1  # the expert-level loss too
    model.eval()
    cache = model.new_cache(1, 40)
    with torch.no_grad():
        model(x[:1, :16], cache=cache)
        assert graphs_traced(model._forward, x[:1, 16:17], 16, cache, None, None, False) == 1


def test_a_copy_of_a_model_compiles_its_own_functions(monkeypatch):
    """The compiled loss terms and decoding step are bound to the model that built them: a deep copy (a reference
    policy, a checkpoint's twin) must run its own weights, not the original's. dynamo's eager backend stands in for
    inductor (the same binding, seconds instead of minutes)."""
    monkeypatch.setattr(compile_module, "compiler_missing", lambda device: None)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    model = small_model().train()
    x = torch.randint(0, 264, (2, 16), generator=torch.Generator().manual_seed(0))
    model.loss(x, x.roll(-1, dims=1), compile=True)
    model.eval().generate(x[:1, :4], 3, compile=True)
    twin = copy.deepcopy(model).train()
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    assert twin.loss(x, x.roll(-1, dims=1), compile=True)[0].item() == twin.loss(x, x.roll(-1, dims=1))[0].item()
    twin.eval()
    assert torch.equal(twin.generate(x[:1, :4], 3, compile=True), twin.generate(x[:1, :4], 3))
