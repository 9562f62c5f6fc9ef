"""Architecture adapters: where each supported HF family keeps its blocks, norms and unembedding.

An adapter lets the engine run a causal LM as an explicit stack, in the spirit of TransformerLens's
`forward(start_at_layer, stop_at_layer)`: `embed` -> `run_layers(resid, start, stop)` -> `final_norm` ->
`readout`. Masks and rotary embeddings are built with the model's own functions, so running every layer
through the adapter reproduces the model's own forward exactly.

Supported: Llama, Mistral, Qwen2, Qwen3, OLMo2, Gemma3 (text), GPT-2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from crosspatch.engine.errors import UnsupportedArchitectureError

# model_type (config.model_type) -> family name used in results and docs.
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "olmo2": "olmo2",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
    "gpt2": "gpt2",
}

FULL = "full_attention"
SLIDING = "sliding_attention"


@dataclass
class LayerContext:
    """Everything a block needs besides the residual: per-layer-type masks and rotary tables."""

    position_ids: torch.Tensor  # [batch, seq]
    layer_types: list[str]  # one per block
    masks: dict[str, torch.Tensor | None] = field(default_factory=dict)
    rotary: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=dict)
    copies: dict[torch.device, LayerContext] = field(default_factory=dict, repr=False)

    def on(self, device: torch.device) -> LayerContext:
        """This context on `device` (blocks spread over devices); each device's copy is made once."""
        if self.position_ids.device == device:
            return self
        if device not in self.copies:
            self.copies[device] = LayerContext(
                position_ids=self.position_ids.to(device),
                layer_types=self.layer_types,
                masks={k: None if m is None else m.to(device) for k, m in self.masks.items()},
                rotary={
                    k: None if r is None else tuple(t.to(device) for t in r) for k, r in self.rotary.items()
                },
            )
        return self.copies[device]


def module_device(module: nn.Module) -> torch.device:
    """Where `module` computes: accelerate's execution device when it dispatched the module (its weights may
    sit offloaded on cpu, disk or meta), else the device of its first parameter."""
    hook = getattr(module, "_hf_hook", None)
    hooks = getattr(hook, "hooks", None) or [hook]  # accelerate's SequentialHook holds several
    dev = next((h.execution_device for h in hooks if getattr(h, "execution_device", None) is not None), None)
    if dev is not None:
        return dev if isinstance(dev, torch.device) else torch.device(dev)
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for left-padded rows: real tokens count 0,1,2,... from their first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [batch, seq]


class ArchAdapter:
    """Explicit access to one causal LM's embedding, blocks, final norm and unembedding."""

    def __init__(self, model: PreTrainedModel) -> None:
        model_type = getattr(model.config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedArchitectureError(
                f"unsupported architecture {model_type!r} ({type(model).__name__}); "
                f"supported model types: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
            )
        self.model = model
        self.model_type: str = model_type
        self.family: str = SUPPORTED_MODEL_TYPES[model_type]
        self.is_gpt2 = model_type == "gpt2"
        self.decoder = self._find_decoder(model)
        self.config = self.decoder.config  # the text config (Gemma3 multimodal keeps it on the LM)
        if getattr(self.config, "use_bidirectional_attention", False):
            raise UnsupportedArchitectureError("bidirectional-attention Gemma3 variants are not causal LMs")
        self.blocks: nn.ModuleList = self.decoder.h if self.is_gpt2 else self.decoder.layers
        self.final_norm: nn.Module = self.decoder.ln_f if self.is_gpt2 else self.decoder.norm
        self.unembed: nn.Module = model.get_output_embeddings()
        self.n_layers: int = len(self.blocks)
        self.d_model: int = int(self.config.hidden_size if not self.is_gpt2 else self.config.n_embd)
        self.softcap: float | None = getattr(self.config, "final_logit_softcapping", None)
        self.layer_types: list[str] = self._layer_types()
        self.block_devices: list[torch.device] = [module_device(b) for b in self.blocks]  # one per block

    # ---- discovery ---------------------------------------------------------------------------
    @staticmethod
    def _find_decoder(model: PreTrainedModel) -> nn.Module:
        if hasattr(model, "transformer"):  # GPT-2
            return model.transformer
        decoder = model.model
        return getattr(decoder, "language_model", decoder)  # Gemma3 multimodal wraps the text model

    def _layer_types(self) -> list[str]:
        if self.is_gpt2:
            return [FULL] * self.n_layers
        if self.model_type == "mistral":
            kind = FULL if getattr(self.config, "sliding_window", None) is None else SLIDING
            return [kind] * self.n_layers
        types = getattr(self.config, "layer_types", None)
        return list(types[: self.n_layers]) if types else [FULL] * self.n_layers

    def mlp(self, layer: int) -> nn.Module:
        """The MLP module of block `layer`; its output is the MLP's write (before any post-norm)."""
        return self.blocks[layer].mlp

    @property
    def device(self) -> torch.device:
        return self.unembed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unembed.weight.dtype

    # ---- the stack, piece by piece -----------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Residual entering block 0 (the embedding scale of Gemma lives in its embedding module)."""
        if self.is_gpt2:
            device = module_device(self.decoder.wte)
            wte, wpe = self.decoder.wte(input_ids.to(device)), self.decoder.wpe(position_ids.to(device))
            return self.decoder.drop(wte + wpe)  # [batch, seq, d_model]
        embed = self.decoder.embed_tokens
        return embed(input_ids.to(module_device(embed)))  # [batch, seq, d_model]

    def context(
        self, resid: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> LayerContext:
        """Masks and rotary tables for a `[batch, seq, d_model]` residual, built by the model's own code."""
        attention_mask, position_ids = attention_mask.to(resid.device), position_ids.to(resid.device)
        ctx = LayerContext(position_ids=position_ids, layer_types=self.layer_types)
        mask_kwargs = dict(
            config=self.config,
            inputs_embeds=resid,
            attention_mask=attention_mask,
            cache=None,
            position_ids=position_ids,
        )
        for kind in sorted(set(self.layer_types)):
            make = create_causal_mask if kind == FULL else create_sliding_window_causal_mask
            ctx.masks[kind] = make(**mask_kwargs)
            if self.is_gpt2:
                ctx.rotary[kind] = None
            elif self.model_type.startswith("gemma3"):
                ctx.rotary[kind] = self.decoder.rotary_emb(resid, position_ids, kind)
            else:
                ctx.rotary[kind] = self.decoder.rotary_emb(resid, position_ids=position_ids)
        return ctx

    def run_block(self, layer: int, resid: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """One decoder block: `[batch, seq, d_model]` in, `[batch, seq, d_model]` out, on the block's device.

        A model spread over devices (accelerate `device_map`) gets the residual and the context moved to each
        block's device first; on one device nothing moves.
        """
        kind = ctx.layer_types[layer]
        block = self.blocks[layer]
        device = self.block_devices[layer]
        if resid.device != device:
            resid = resid.to(device)  # [batch, seq, d_model]
        ctx = ctx.on(device)
        if self.is_gpt2:
            out = block(resid, None, ctx.masks[kind], position_ids=ctx.position_ids)
        else:
            out = block(
                resid,
                attention_mask=ctx.masks[kind],
                position_embeddings=ctx.rotary[kind],
                position_ids=ctx.position_ids,
            )
        return out[0] if isinstance(out, tuple) else out

    def run_layers(
        self,
        resid: torch.Tensor,
        ctx: LayerContext,
        start: int | None = None,
        stop: int | None = None,
        capture_inputs: Sequence[int] = (),
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run blocks `start..stop-1` (Python slice semantics) on `resid`, the input of block `start`.

        Examples: `run_layers(h, ctx, 19)` runs blocks 19..L-1 (a late stack); `run_layers(h, ctx, 0, -4)`
        runs all but the last four. `capture_inputs` names blocks whose inputs are returned (index ==
        n_layers means the final block's output).
        """
        indices = range(self.n_layers)[slice(start, stop)]
        wanted = set(capture_inputs)
        captured: dict[int, torch.Tensor] = {}
        for layer in indices:
            if layer in wanted:
                captured[layer] = resid
            resid = self.run_block(layer, resid, ctx)  # [batch, seq, d_model]
        if self.n_layers in wanted and (not indices or indices[-1] == self.n_layers - 1):
            captured[self.n_layers] = resid
        return resid, captured

    def readout(self, final_resid: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm + unembedding (+ softcap). `[..., d_model]` -> `[..., vocab]`, or only `token_ids` columns.

        With `token_ids` (every margin the engine reads) the norm, the k unembedding columns and the softcap
        run in fp32 whatever the weights' dtype, so a bf16 model's margins are not quantised to bf16's step
        (0.125 at |logit| ~ 20); with fp32 weights it is the same computation as in the weights' dtype, bit for bit.
        The full-vocabulary path (greedy decoding) stays in the model's dtype.
        """
        final_resid = final_resid.to(module_device(self.final_norm))  # a no-op on one device
        if token_ids is None:
            logits = self.unembed(self.final_norm(final_resid))  # [..., vocab]
        else:
            h = self.final_norm_fp32(final_resid).to(self.device)  # [..., d_model] fp32
            token_ids = token_ids.to(self.device)
            weight = self.unembed.weight[token_ids].float()  # [..., k, d_model]
            logits = torch.einsum("...d,...kd->...k", h, weight)  # [..., k]
            bias = getattr(self.unembed, "bias", None)
            if bias is not None:
                logits = logits + bias[token_ids].float()
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def final_norm_fp32(self, final_resid: torch.Tensor) -> torch.Tensor:
        """The final norm computed in fp32: the module's own forward with fp32 copies of its parameters."""
        state = {name: t.float() for name, t in self.final_norm.state_dict(keep_vars=True).items()}
        return torch.func.functional_call(self.final_norm, state, (final_resid.float(),))

    def forward_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Full explicit forward: `[batch, seq]` ids -> `[batch, seq, vocab]` logits (for checks and tests)."""
        position_ids = positions_from_mask(attention_mask)
        resid = self.embed(input_ids, position_ids)
        ctx = self.context(resid, attention_mask, position_ids)
        resid, _ = self.run_layers(resid, ctx)
        return self.readout(resid)


def adapter_for(model: PreTrainedModel) -> ArchAdapter:
    """The adapter for `model`; raises `UnsupportedArchitectureError` listing what is supported."""
    return ArchAdapter(model)
