"""Balanced crosscoder branches: training in per-branch scaled space folds exactly into the saved weights."""

from __future__ import annotations

import torch

from crosspatch.saes.arch import Crosscoder, CrosscoderConfig
from crosspatch.saes.train import build_training_sae, make_config


def test_branch_scale_folds_into_the_inference_crosscoder() -> None:
    """Same reconstruction and JumpReLU scores before and after folding branch scales (10, 0.5) in."""
    cfg = make_config("batchtopk_crosscoder", layer=4, width=16, k=2, balance_branches=True)
    sae = build_training_sae(cfg, 8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sae.branch_scale.copy_(torch.tensor([10.0, 0.5]))
        sae.input_mean.copy_(torch.randn(2, 8, generator=g))
        sae.b_dec.copy_(torch.randn(2, 8, generator=g))
        sae.b_enc.copy_(0.1 * torch.randn(16, generator=g))
    x = torch.randn(32, 16, generator=g)  # [batch, n_branches * d]
    acts, _ = sae.encode_with_hidden_pre(x, k=2)  # [batch, F] score-space acts
    recon = sae.decode(acts).reshape(32, 2, 8)  # [batch, n_branches, d] raw units
    state = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    sae.process_state_dict_for_saving_inference(state)
    assert "branch_scale" not in state
    inf = Crosscoder(CrosscoderConfig(d_in=8, d_sae=16, dtype="float32", device="cpu"))
    inf.load_state_dict(state)
    with torch.no_grad():
        assert torch.allclose(inf.decode(acts), recon, atol=1e-5)
        hidden = torch.einsum("bnd,ndf->bf", x.reshape(32, 2, 8) - inf.input_mean, inf.W_enc) + inf.b_enc
        on = acts > 0
        assert torch.allclose(hidden[on], acts[on], rtol=1e-5, atol=1e-5)  # scores = folded pre-activations
