"""Multi-token prediction modules: the order of the concatenation eh_proj reads, pinned without training."""

import torch

from mini_deepseek import ModelConfig
from mini_deepseek.block import Block
from mini_deepseek.mtp import MTPModule
from mini_deepseek.norm import rms_norm
from mini_deepseek.rope import precompute_freqs_cis


def test_eh_proj_takes_the_normalized_embedding_first():
    # The published checkpoints' eh_proj reads [enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)], embedding first, although
    # the paper writes the hidden state first. With eh_proj = [I | 0] the block's input is the first half alone,
    # and enorm and hnorm get different gains, so the output shows which half came first.
    cfg = ModelConfig.preset("toy", n_mtp_modules=1)
    torch.manual_seed(0)
    module = MTPModule(cfg.n_layers, cfg).eval()
    D = cfg.dim
    with torch.no_grad():
        module.eh_proj.weight.copy_(torch.cat([torch.eye(D), torch.zeros(D, D)], dim=1))  # [D, 2D] = [I | 0]
        module.enorm.weight.copy_(torch.linspace(0.5, 2.0, D))
        module.hnorm.weight.copy_(torch.linspace(3.0, -1.0, D))
        for name, p in module.named_parameters():  # the block's own weights: random, but not the three above
            if not name.startswith(("eh_proj", "enorm", "hnorm")):
                p.normal_(std=0.1 if p.dim() > 1 else 1.0)
    B, n = 2, 6
    h_prev, other_h_prev, emb_next = torch.randn(B, n, D), torch.randn(B, n, D), torch.randn(B, n, D)
    freqs = precompute_freqs_cis(cfg, n)
    with torch.no_grad():
        out = module(h_prev, emb_next, freqs)
        assert torch.equal(out, module(other_h_prev, emb_next, freqs))  # the hidden state sits in the zero half
        # ... and the first half is the embedding under enorm's gains: the block runs on exactly that (and the
        # module's output is the block's, normalized for the shared head).
        expected = module.shared_head.norm(Block.forward(module, rms_norm(emb_next, module.enorm.weight, cfg.norm_eps),
                                                         freqs))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
