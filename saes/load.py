"""Load dictionaries (sae_lens-format dirs, sae_lens's pretrained registry) behind one `Dictionary` interface.

The mediation code needs the same few things from an SAE, a transcoder or a crosscoder: encode activations,
decode latents, the decoder rows per model branch, where the dictionary sits (layer, hook point) and whether
it passed the quality gate. `Dictionary` gives exactly that and hides which sae_lens class is underneath.
crosspatch's own metadata lives in `crosspatch_meta.json` next to sae_lens's `cfg.json`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

import crosspatch.saes.arch  # noqa: F401  (registers crosspatch's classes with sae_lens)
from crosspatch.saes.arch import Crosscoder
from crosspatch.saes.errors import DictionaryLoadError, read_json_object

META_FILENAME = "crosspatch_meta.json"
CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
TRANSCODER_ARCHS = ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder")
KINDS = ("sae", "transcoder", "crosscoder")


def write_meta(path: str | Path, meta: dict[str, Any]) -> Path:
    """Write `crosspatch_meta.json` atomically; returns its path."""
    p = Path(path) / META_FILENAME
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
    os.replace(tmp, p)
    return p


def read_meta(path: str | Path) -> dict[str, Any] | None:
    p = Path(path) / META_FILENAME
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DictionaryLoadError(f"corrupt {p}: {e.msg} (line {e.lineno})") from None


def _kind_of(architecture: str) -> str:
    if architecture == "crosscoder":
        return "crosscoder"
    return "transcoder" if architecture in TRANSCODER_ARCHS else "sae"


class Dictionary:
    """A loaded dictionary with a uniform interface.

    - `encode(x, branch=None)`: `[..., d]` -> `[..., n_latents]` (crosscoders: `x` `[..., n_branches, d]`
      for the joint encoder, or `[..., d]` with `branch=` for one model's encoder).
    - `decode(acts, branch=None)`: `[..., n_latents]` -> `[..., d]` (crosscoders without `branch`:
      `[..., n_branches, d]`). Transcoders decode to the MLP output without the skip term.
    - `reconstruct(x, branch=None)`: what replaces the hooked activation when spliced (transcoders map the
      MLP input to the MLP output, skip term included).
    - `W_dec`: `{branch: [n_latents, d]}`, the output direction of each latent per model branch.
    """

    def __init__(self, sae: Any, meta: dict[str, Any] | None = None, path: Path | None = None) -> None:
        self.sae = sae.eval()
        self.path = path
        arch = sae.cfg.architecture()
        self.meta: dict[str, Any] = dict(meta or {})
        self.meta.setdefault("architecture", arch)
        self.meta.setdefault("saved_architecture", arch)
        self.meta.setdefault("kind", _kind_of(arch))
        self.meta.setdefault("width", int(sae.cfg.d_sae))
        self.meta.setdefault("gate", {"status": "not_evaluated"})
        if self.meta.get("layer") is None or self.meta.get("hook_point") is None:
            self.meta.update(
                {k: v for k, v in _site_from_hook_name(sae.cfg.metadata.hook_name).items() if v is not None}
            )

    # ---- identity -------------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return str(self.meta["kind"])

    @property
    def id(self) -> str | None:
        return self.meta.get("id")

    @property
    def layer(self) -> int | None:
        return self.meta.get("layer")

    @property
    def hook_point(self) -> str | None:
        return self.meta.get("hook_point")

    @property
    def input_hook(self) -> str | None:
        """Where the encoder reads: the hook point, or `mlp_in` for transcoders."""
        return self.meta.get("input_hook", "mlp_in" if self.kind == "transcoder" else self.hook_point)

    @property
    def branches(self) -> list[str]:
        if isinstance(self.sae, Crosscoder):
            return list(self.sae.cfg.branches)
        return [str(self.meta.get("model_role") or "model")]

    @property
    def n_latents(self) -> int:
        return int(self.sae.cfg.d_sae)

    @property
    def d_in(self) -> int:
        return int(self.sae.cfg.d_in)

    @property
    def gate_status(self) -> str:
        return str(self.meta.get("gate", {}).get("status", "not_evaluated"))

    @property
    def training_prompt_ids(self) -> frozenset[str] | None:
        """Prompt ids whose tokens trained this dictionary (from its cache's source); None if unknown
        (a separate corpus not keyed by prompt id, or a dictionary crosspatch did not train)."""
        ids = ((self.meta.get("cache") or {}).get("source") or {}).get("prompt_ids")
        return None if ids is None else frozenset(str(i) for i in ids)

    @property
    def training_split(self) -> dict[str, Any] | None:
        """How the training prompts were chosen (e.g. the mediation fit split), as recorded by the cache."""
        return ((self.meta.get("cache") or {}).get("source") or {}).get("split")

    @property
    def W_dec(self) -> dict[str, torch.Tensor]:
        w = self.sae.W_dec.detach()
        if isinstance(self.sae, Crosscoder):
            return {b: w[:, i] for i, b in enumerate(self.branches)}  # each [n_latents, d]
        return {self.branches[0]: w}  # [n_latents, d]

    def _branch(self, branch: str | None) -> str:
        if branch is None:
            return self.branches[0]
        if branch not in self.branches:
            raise ValueError(f"unknown branch {branch!r}; this dictionary has {', '.join(self.branches)}")
        return branch

    # ---- maps -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: torch.Tensor, branch: str | None = None) -> torch.Tensor:
        if isinstance(self.sae, Crosscoder):
            return self.sae.encode(x) if branch is None else self.sae.encode_branch(x, self._branch(branch))
        self._branch(branch)
        return self.sae.encode(x)

    @torch.no_grad()
    def decode(self, acts: torch.Tensor, branch: str | None = None) -> torch.Tensor:
        if isinstance(self.sae, Crosscoder):
            return (
                self.sae.decode(acts)
                if branch is None
                else self.sae.decode_branch(acts, self._branch(branch))
            )
        self._branch(branch)
        return self.sae.decode(acts)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, branch: str | None = None) -> torch.Tensor:
        if isinstance(self.sae, Crosscoder) and branch is not None:
            return self.sae.decode_branch(self.sae.encode_branch(x, self._branch(branch)), branch)
        if self.kind == "transcoder":
            return self.sae.forward(x)  # includes the skip term where there is one
        return self.decode(self.encode(x, branch), branch)

    # ---- persistence ----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> tuple[Path, Path, Path]:
        """Save in sae_lens format plus crosspatch_meta.json; returns (weights, cfg, meta) paths.

        Crosscoders also write each branch as a plain sae_lens SAE under `branches/<branch>/` (saes.export).
        """
        path = Path(path)
        weights, cfg = self.sae.save_model(path)
        if isinstance(self.sae, Crosscoder):
            from crosspatch.saes.export import export_crosscoder_branches

            export_crosscoder_branches(self.sae, path)
        self.meta["path"] = str(path.resolve())
        self.path = path
        return weights, cfg, write_meta(path, self.meta)

    def save_meta(self) -> None:
        """Persist `meta` next to the weights (after an eval or a gate override)."""
        if self.path is not None:
            write_meta(self.path, self.meta)

    def __repr__(self) -> str:
        return (
            f"Dictionary(id={self.id!r}, kind={self.kind}, arch={self.meta.get('architecture')}, "
            f"layer={self.layer}, hook={self.hook_point}, width={self.n_latents}, gate={self.gate_status})"
        )


def _site_from_hook_name(hook_name: str | None) -> dict[str, Any]:
    """Layer and hook point from a TransformerLens-style name like `blocks.4.hook_mlp_out`."""
    if not hook_name:
        return {"layer": None, "hook_point": None}
    m = re.match(r"blocks\.(\d+)\.hook_(mlp_out|mlp_in|resid_post|resid_pre|resid_mid|attn_out)", hook_name)
    if not m:
        return {"layer": None, "hook_point": hook_name}
    return {"layer": int(m.group(1)), "hook_point": m.group(2)}


def load_dictionary(path: str | Path, device: str = "cpu") -> Dictionary:
    """Load a sae_lens-format directory (cfg.json + sae_weights.safetensors [+ crosspatch_meta.json])."""
    from sae_lens import SAE

    p = Path(path)
    cfg_path, cfg = read_json_object(p, CFG_FILENAME, "dictionary", DictionaryLoadError)
    if "architecture" not in cfg or "d_in" not in cfg or "d_sae" not in cfg:
        raise DictionaryLoadError(f"corrupt {cfg_path}: needs 'architecture', 'd_in' and 'd_sae'")
    from sae_lens.registry import SAE_CLASS_REGISTRY

    if cfg["architecture"] not in SAE_CLASS_REGISTRY:
        raise DictionaryLoadError(
            f"{cfg_path}: unknown architecture {cfg['architecture']!r}; known: {', '.join(sorted(SAE_CLASS_REGISTRY))}"
        )
    if not (p / WEIGHTS_FILENAME).exists():
        raise DictionaryLoadError(f"no dictionary at {str(p)!r} ({WEIGHTS_FILENAME} missing)")
    meta = read_meta(p)
    try:
        sae = SAE.load_from_disk(p, device=device)
    except (SafetensorError, RuntimeError, KeyError, TypeError, ValueError) as e:
        raise DictionaryLoadError(f"could not load dictionary at {p}: {str(e).splitlines()[0]}") from None
    return Dictionary(sae, meta, p)


SAE_LENS_PREFIX = "sae_lens:"


def parse_pretrained_ref(ref: str) -> tuple[str, str] | None:
    """`sae_lens:RELEASE/SAE_ID` -> (release, sae_id); None for anything else (a path or registry id).

    The release is everything before the first `/` (sae_lens release names have none); the SAE id may
    contain slashes (`gemma-scope-2b-pt-res-canonical/layer_20/width_16k/canonical`).
    """
    if not ref.startswith(SAE_LENS_PREFIX):
        return None
    release, _, sae_id = ref[len(SAE_LENS_PREFIX) :].partition("/")
    if not release or not sae_id:
        raise DictionaryLoadError(f"bad pretrained dictionary {ref!r}; use sae_lens:RELEASE/SAE_ID")
    return release, sae_id


def pretrained_id(release: str, sae_id: str) -> str:
    """A registry-safe id for a pretrained SAE (no '/', at most 64 characters)."""
    import hashlib

    full = f"sae_lens:{release}~{sae_id.replace('/', '~')}"
    if len(full) <= 64:
        return full
    return full[:55] + "-" + hashlib.sha256(full.encode()).hexdigest()[:8]


@contextmanager
def _hub_offline() -> Iterator[str]:
    """Hugging Face hub in offline mode (local cache only) for the block; yields the cache directory."""
    from huggingface_hub import constants

    before, env = constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield str(constants.HF_HUB_CACHE)
    finally:
        constants.HF_HUB_OFFLINE = before
        if env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = env


def load_pretrained(release: str, sae_id: str, device: str = "cpu") -> Dictionary:
    """Load an SAE by sae_lens release id from the LOCAL Hugging Face cache only (never the network).

    Download it once beforehand (`hf download REPO --include 'FOLDER/*'`, or `SAE.from_pretrained` on a
    machine with network access); the error names the repo, the folder and the cache directory.
    """
    from sae_lens import SAE
    from sae_lens.loading.pretrained_saes_directory import get_repo_id_and_folder_name

    with _hub_offline() as cache:
        try:
            repo_id, folder = get_repo_id_and_folder_name(release, sae_id)
        except ValueError as e:
            raise DictionaryLoadError(f"pretrained dictionary {release}/{sae_id}: {e}") from None
        try:
            sae = SAE.from_pretrained(release, sae_id, device=device)
        except Exception as e:  # hub errors come in many types (LocalEntryNotFoundError, OSError, ...)
            detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise DictionaryLoadError(
                f"could not load pretrained dictionary {release}/{sae_id} from the local Hugging Face cache "
                f"{cache} (offline: crosspatch never downloads dictionaries; fetch it once with "
                f"`hf download {repo_id} --include '{folder}/*'`, or point HF_HUB_CACHE at a cache that "
                f"has it): {detail}"
            ) from None
    meta = {
        "id": pretrained_id(release, sae_id),
        "source": {"kind": "sae_lens_pretrained", "release": release, "sae_id": sae_id, "repo_id": repo_id},
    }
    return Dictionary(sae, meta, None)


def resolve_dictionary(ref: str | Path, device: str = "cpu") -> Dictionary:
    """A dictionary directory, or `sae_lens:RELEASE/SAE_ID` from the local Hugging Face cache."""
    parsed = parse_pretrained_ref(str(ref))
    if parsed is not None:
        return load_pretrained(*parsed, device=device)
    return load_dictionary(ref, device=device)
