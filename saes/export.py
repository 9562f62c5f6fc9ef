"""What plain sae_lens needs to use a crosspatch dictionary: complete metadata, and crosscoder branches as SAEs.

Every dictionary crosspatch saves carries sae_lens's metadata fields in `cfg.json` (`metadata.hook_name` in
TransformerLens style such as `blocks.31.hook_mlp_out`, `model_name`, `context_size`, `dataset_path`,
`prepend_bos`, `exclude_special_tokens`; transcoders also `hook_name_out`), besides the top-level `dtype` and
`normalize_activations`. The Hugging Face module path the hook sits on (`model.layers.31.mlp`: `mlp_out`
is its output, `mlp_in` its input) stays in `crosspatch_meta.json` as `hf_module`.

Crosscoders: plain sae_lens has no crosscoder class (opening the main directory without crosspatch imported
fails with `KeyError: 'crosscoder'`). So each branch is also saved, under `<dir>/branches/<branch>/`, as a
standard sae_lens JumpReLU SAE that plain `sae_lens.SAE.load_from_disk` opens: that branch's encoder, the
shared threshold and that branch's decoder, with the input-mean centring folded into the biases:

    W_enc = W_enc[b]                      # [d, F]
    b_enc = b_enc - input_mean[b] @ W_enc[b]
    W_dec = W_dec[:, b]                   # [F, d]
    b_dec = b_dec[b] + input_mean[b]

so `encode` equals the crosscoder's `encode_branch(x, b)` and `decode` its `decode_branch(acts, b)` (up to
float rounding of the folded bias). The latent index is shared across branches, as in the crosscoder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

if TYPE_CHECKING:  # arch imports sae_lens; the export itself needs only the weights
    from crosspatch.saes.arch import Crosscoder

BRANCHES_DIR = "branches"


def tl_hook_name(layer: int, hook_point: str) -> str:
    """TransformerLens hook name of an MLP site: (31, "mlp_out") -> "blocks.31.hook_mlp_out"."""
    return f"blocks.{layer}.hook_{hook_point}"


def sae_lens_metadata(
    *, kind: str, layer: int, hook_point: str, role: str, manifest: dict[str, Any], cache_path: str | None
) -> dict[str, Any]:
    """sae_lens `metadata` fields for a dictionary trained on an activation cache's `role` activations.

    `model_name` is the cached model's path or hub id; `dataset_path` the cache's token source (its file,
    else the cache directory); `context_size` the cache's `max_seq_len`. Unknown values stay None.
    """
    models = manifest.get("models") or {}
    settings = manifest.get("settings") or {}
    source = manifest.get("source") or {}
    in_hook = "mlp_in" if kind == "transcoder" else hook_point
    md: dict[str, Any] = {
        "hook_name": tl_hook_name(layer, in_hook),
        "model_name": (models.get(role) or {}).get("path"),
        "context_size": settings.get("max_seq_len"),
        "dataset_path": source.get("path") or cache_path,
        "prepend_bos": True,
        "exclude_special_tokens": settings.get("drop_token_ids"),
    }
    if kind == "transcoder":
        md["hook_name_out"] = tl_hook_name(layer, "mlp_out")
    return md


def hf_module(manifest: dict[str, Any], role: str, layer: int) -> str | None:
    """The Hugging Face module path of `role`'s MLP at `layer`, as the cache recorded it."""
    return ((manifest.get("hf_modules") or {}).get(role) or {}).get(str(layer))


@torch.no_grad()
def export_crosscoder_branches(sae: Crosscoder, path: str | Path) -> dict[str, Path]:
    """Save each branch of an inference `Crosscoder` as a plain sae_lens JumpReLU SAE; {branch: dir}."""
    from sae_lens.saes.jumprelu_sae import JumpReLUSAEConfig

    root = Path(path) / BRANCHES_DIR
    cfg = sae.cfg
    base_md = cfg.metadata.to_dict()
    models = base_md.pop("branch_models", None) or {}
    out: dict[str, Path] = {}
    for b, name in enumerate(cfg.branches):
        mean = sae.input_mean[b]  # [d]
        weights = {
            "W_enc": sae.W_enc[b].contiguous(),  # [d, F]
            "b_enc": (sae.b_enc - mean @ sae.W_enc[b]).contiguous(),  # [F]
            "W_dec": sae.W_dec[:, b].contiguous(),  # [F, d]
            "b_dec": (sae.b_dec[b] + mean).contiguous(),  # [d]
            "threshold": sae.threshold.detach().clone().contiguous(),  # [F]
        }
        branch_cfg = JumpReLUSAEConfig(
            d_in=cfg.d_in,
            d_sae=cfg.d_sae,
            dtype=cfg.dtype,
            apply_b_dec_to_input=False,
            normalize_activations="none",
        ).to_dict()
        branch_cfg["device"] = "cpu"
        branch_cfg["metadata"] = {
            **base_md,
            "model_name": models.get(name, base_md.get("model_name")),
            "crosscoder_branch": name,
        }
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu() for k, v in weights.items()}, str(d / "sae_weights.safetensors"))
        (d / "cfg.json").write_text(json.dumps(branch_cfg))
        out[name] = d
    return out
