"""The shape of the code: the import graph runs one way (primitives -> layers -> model -> checkpoint/training), and
importing the library has no side effects on Triton."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mini_deepseek", "kernels")


def module_files() -> dict[str, Path]:
    """{dotted module name: file} of every module of our packages."""
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            files[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return files


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """Our modules that `name` imports anywhere in its file (top level or inside functions)."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .x import y
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            # `from pkg import sub` imports the module pkg.sub when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the DFS stack, "done" after

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [node, nxt] if nxt in stack else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, stack + [node])):
                return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [])):
            return cycle
    return None


def test_import_graph_has_no_cycle():
    files = module_files()
    graph = {name: imports_of(name, path, set(files)) for name, path in files.items()}
    assert graph["mini_deepseek.mla"] >= {"mini_deepseek.config", "mini_deepseek.norm"}  # relative imports seen
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    # layers do not reach up into the model, the FP8 conversion or the checkpoints
    for layer in ("attention_ops", "attention", "mla", "moe", "mlp", "norm", "rope", "block"):
        assert not graph[f"mini_deepseek.{layer}"] & {"mini_deepseek.model", "mini_deepseek.fp8",
                                                      "mini_deepseek.checkpoint", "mini_deepseek.train"}, layer


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_import_has_no_triton_side_effects():
    """Importing the library (and running a CPU model in the default "auto" kernel mode) neither imports Triton nor
    the Triton kernels, nor sets TRITON_INTERPRET: that happens when a kernel is first used."""
    code = textwrap.dedent("""
        import os, sys
        import torch
        import mini_deepseek

        def state():
            loaded = sorted(m for m in ("triton", "kernels.fp8", "kernels.moe") if m in sys.modules)
            return f"{loaded} {os.environ.get('TRITON_INTERPRET')}"

        print(state())
        cfg = mini_deepseek.ModelConfig.preset("toy", dim=32, n_layers=2, inter_dim=64, moe_inter_dim=16,
                                               q_lora_rank=16, kv_lora_rank=16, max_seq_len=16)
        model = mini_deepseek.DeepSeekV3(cfg)
        model.loss(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))[0].backward()
        print(state())
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("MINI_DEEPSEEK_KERNELS", "TRITON_INTERPRET")}
    out = subprocess.run([sys.executable, "-c", code], env=env | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["[] None", "[] None"]
