"""`crosspatch dict cache|train|eval|list|show`: thin wrappers over saes/ (sparse dictionaries on MLP layers).

Errors a user can cause (bad layer, hook point, width, missing cache, corrupt cfg.json) are
`CrosspatchError`s, printed by the CLI as one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from crosspatch.app.cli import cli
from crosspatch.app.cli.progress import progress_bar
from crosspatch.engine.errors import CrosspatchError

if TYPE_CHECKING:  # imported where used: the CLI starts without sae_lens
    from crosspatch.saes.load import Dictionary
    from crosspatch.saes.quality import GateConfig

dict_app = typer.Typer(
    name="dict", help="Sparse dictionaries (SAE, transcoder, crosscoder) on MLP layers.", no_args_is_help=True
)
cli.add_typer(dict_app, name="dict")


def _registry_root(registry: Path | None) -> Path:
    if registry is not None:
        return registry
    from crosspatch.app.config import get_settings

    return get_settings().data_dir / "dictionaries"


def _parse_sets(items: list[str] | None) -> dict[str, Any]:
    """`--set key=value` options; values parsed as JSON where they parse (numbers, null, lists)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise CrosspatchError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


@dict_app.command("cache")
def cache_cmd(
    out: Annotated[Path, typer.Option("--out", help="Cache directory (resumed if it exists).")],
    pt: Annotated[str | None, typer.Option(help="PT model path (paired with --it).")] = None,
    it: Annotated[str | None, typer.Option(help="IT model path (alone: an IT-only cache).")] = None,
    organism: Annotated[str | None, typer.Option(help="A bundled organism instead of --pt/--it.")] = None,
    source: Annotated[
        Path | None, typer.Option(help="Prompt JSONL, text file, ids JSONL or datasets dir.")
    ] = None,
    layers: Annotated[str, typer.Option(help="'last:N' or indices '3,4'.")] = "last:3",
    hooks: Annotated[str, typer.Option(help="Hook points: mlp_in, mlp_out (comma list).")] = "mlp_in,mlp_out",
    shard_tokens: Annotated[int, typer.Option(min=1)] = 65536,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    max_seq_len: Annotated[int, typer.Option(min=1)] = 512,
    max_tokens: Annotated[int | None, typer.Option(min=1)] = None,
    training_prompts: Annotated[
        str,
        typer.Option(
            help="Prompt JSONL sources: 'mediation_fit' drops the prompts whose events mediation tests "
            "(needs --pt and --it); 'all' caches every prompt (the file is a separate corpus)."
        ),
    ] = "mediation_fit",
    fit_fraction: Annotated[float, typer.Option(help="Mediation fit fraction (as `mediate`).")] = 0.27,
    split_seed: Annotated[int, typer.Option(help="Mediation split seed (as `mediate`).")] = 0,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Divergence budget (as `mediate`).")] = 128,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N, or auto (accelerate device map).")] = "cpu",
    dtype: Annotated[
        str,
        typer.Option(help="Model dtype: float32, bfloat16 or float16 (activations are stored as float32)."),
    ] = "float32",
) -> None:
    """Cache MLP inputs/outputs of PT and/or IT on a token source (sharded, resumable).

    A prompt JSONL source is first split as mediation will split it: only prompts outside the mediation
    test split are cached, and their ids and the split are recorded (dictionaries never see evaluation
    prompts; `crosspatch mediate` refuses test events among them)."""
    from crosspatch.engine.pairs import load_model
    from crosspatch.saes.cache import build_cache, token_source

    if organism:
        from crosspatch.engine.organisms import organism_path

        try:
            root = organism_path(organism)
        except ValueError as e:
            raise CrosspatchError(str(e)) from None
        pt, it = str(root / "pt"), str(root / "it")
        source = source or root / "prompts.jsonl"
    paths = {r: p for r, p in (("pt", pt), ("it", it)) if p}
    if not paths:
        raise CrosspatchError("give --pt and/or --it (or --organism NAME)")
    if source is None:
        raise CrosspatchError("missing --source (prompt JSONL, text file, ids JSONL or datasets dir)")
    if training_prompts not in ("mediation_fit", "all"):
        raise CrosspatchError(f"unknown --training-prompts {training_prompts!r}; valid: mediation_fit, all")
    src = token_source(source)
    if src.kind == "prompts" and training_prompts == "mediation_fit":
        if set(paths) != {"pt", "it"}:
            raise CrosspatchError(
                "--training-prompts mediation_fit needs --pt and --it (to find the events mediation tests); "
                "pass --training-prompts all if the prompt file is a separate corpus"
            )
        from crosspatch.engine.pairs import load_pair
        from crosspatch.engine.prompts import load_prompts
        from crosspatch.saes.for_pair import mediation_training_prompts

        pair = load_pair(paths["pt"], paths["it"], device=device, dtype=dtype, pair_id=organism)
        keep, split = mediation_training_prompts(
            pair,
            load_prompts(src.path),
            fit_fraction=fit_fraction,
            split_seed=split_seed,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )
        src.prompt_ids, src.split = [p.id for p in keep], split
        typer.echo(
            f"training prompts: {len(keep)} of {split['n_prompts']} ({split['n_fit']} in the mediation fit "
            f"split, {split['n_without_event']} without an event); "
            f"{len(split['excluded_test_prompt_ids'])} test prompts excluded",
            err=True,
        )
        loaded = {"pt": (pair.pt, pair.tokenizer), "it": (pair.it, pair.tokenizer)}
    else:
        kind = "all" if src.kind == "prompts" else "separate_corpus"
        src.split = {"kind": kind, "note": "not the mediation prompts (the caller's responsibility)"}
        loaded = {
            r: load_model(p, device=device, dtype=dtype, require_tokenizer=False) for r, p in paths.items()
        }
    tok = next(iter(loaded.values()))[1]
    with progress_bar("caching activations (tokens)", max_tokens) as bar:
        seen = [0]

        def on_shard(rec: dict[str, Any]) -> None:
            seen[0] += rec["n_tokens"]
            if bar.enabled:
                bar.update(seen[0], note=rec["file"])
            else:
                typer.echo(f"shard {rec['file']}: {rec['n_tokens']} tokens", err=True)

        c = build_cache(
            out,
            {r: m for r, (m, _) in loaded.items()},
            src,
            layers,
            hooks,
            tok,
            model_paths=paths,
            shard_tokens=shard_tokens,
            batch_size=batch_size,
            max_seq_len=max_seq_len,
            max_tokens=max_tokens,
            on_shard=on_shard,
        )
    typer.echo(
        json.dumps(
            {
                "cache": str(out),
                "n_tokens": c.n_tokens,
                "layers": c.layers,
                "hook_points": c.hook_points,
                "roles": c.roles,
                "shards": len(c.manifest["shards"]),
            }
        )
    )


@dict_app.command("train")
def train_cmd(
    cache: Annotated[Path, typer.Option(help="Activation cache directory.")],
    layer: Annotated[int, typer.Option(help="Layer (must be in the cache).")],
    arch: Annotated[
        str,
        typer.Option(
            help="batchtopk, topk, jumprelu, standard, batchtopk_transcoder, "
            "batchtopk_skip_transcoder, batchtopk_crosscoder."
        ),
    ] = "batchtopk",
    role: Annotated[str | None, typer.Option(help="pt | it (crosscoders: paired).")] = None,
    hook: Annotated[str, typer.Option(help="mlp_out or mlp_in.")] = "mlp_out",
    width: Annotated[int, typer.Option(help="Number of latents.")] = 1024,
    k: Annotated[float | None, typer.Option(help="Active latents per token (top-k kinds).")] = None,
    tokens: Annotated[int, typer.Option(help="Training tokens (activation rows).")] = 1_000_000,
    batch_size: Annotated[int, typer.Option(min=1)] = 512,
    lr: Annotated[float, typer.Option()] = 3e-4,
    seed: Annotated[int, typer.Option()] = 0,
    out: Annotated[Path | None, typer.Option(help="Output dir (default: under the registry root).")] = None,
    registry: Annotated[
        Path | None, typer.Option(help="Registry root (default: <data_dir>/dictionaries).")
    ] = None,
    checkpoint_every: Annotated[int, typer.Option(min=0, help="Steps between checkpoints (0: none).")] = 1000,
    splice: Annotated[
        bool, typer.Option(help="Also measure CE/KL with the reconstruction spliced in.")
    ] = False,
    min_fve: Annotated[float, typer.Option(help="Quality gate: minimum held-out FVE per branch.")] = 0.75,
    min_heldout_tokens: Annotated[
        int, typer.Option(min=1, help="Quality gate: minimum held-out tokens (fewer: the gate fails).")
    ] = 10_000,
    max_alive: Annotated[float, typer.Option(help="Quality gate: maximum alive fraction.")] = 0.20,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Extra config option key=value.")] = None,
    device: Annotated[str, typer.Option(help="Training device (and of the models --splice loads).")] = "cpu",
    dtype: Annotated[str, typer.Option(help="dtype of the models --splice loads.")] = "float32",
) -> None:
    """Train one dictionary on a cache (resumes from its checkpoint), evaluate it, apply the gate."""
    from crosspatch.saes.cache import ActivationCache
    from crosspatch.saes.train import CONFIGS, Progress, make_config, train_dictionary

    kwargs: dict[str, Any] = dict(
        layer=layer,
        hook_point=hook,
        width=width,
        training_tokens=tokens,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=device,
    )
    kwargs.update(_parse_sets(set_))  # --set wins
    if role is not None:
        kwargs["model_role"] = role
    if k is not None:
        kwargs["k"] = int(k) if arch == "topk" else k
    cfg = make_config(arch, **kwargs)
    if arch not in CONFIGS:  # make_config already raised; keeps type checkers calm
        raise CrosspatchError(arch)
    c = ActivationCache(cache)
    if out is None:
        out = _registry_root(registry) / f"{cfg.model_role}-L{layer}-{hook}-{arch}-w{width}-s{seed}"
    models = _models_for(c, cfg.model_role, device, dtype) if splice else None

    with progress_bar(f"training {arch}", cfg.total_steps) as bar:

        def report(p: Progress) -> None:
            line = f"loss {p.loss:.4g} L0 {p.l0:.1f} dead {p.dead_fraction:.2%} tok/s {p.tokens_per_s:,.0f}"
            if bar.enabled:
                bar.update(p.step, note=line)
            else:
                typer.echo(f"step {p.step}/{p.total_steps} {line}", err=True)

        d = train_dictionary(
            cfg,
            c,
            out,
            progress=report,
            log_every=10 if bar.enabled else 100,
            checkpoint_every=checkpoint_every,
            models=models,
            gate=_gate(min_fve, min_heldout_tokens, max_alive),
        )
    _print_gate(d.meta)
    typer.echo(json.dumps(_summary(d.meta)))


def _gate(min_fve: float, min_heldout_tokens: int, max_alive: float) -> GateConfig:
    """The gate from CLI options (the method's defaults unless lowered explicitly)."""
    from crosspatch.saes.quality import GateConfig

    try:
        return GateConfig(
            min_fve=min_fve, min_heldout_tokens=min_heldout_tokens, alive_range=(0.01, max_alive)
        )
    except ValueError as e:
        raise CrosspatchError(str(e)) from None


def _print_gate(meta: dict[str, Any]) -> None:
    """Every gate check by name on stderr (stdout stays one JSON line)."""
    from crosspatch.saes.quality import format_gate

    typer.echo(format_gate(meta.get("gate") or {}), err=True)


def _models_for(c: Any, role: str, device: str = "cpu", dtype: str = "float32") -> dict[str, Any]:
    from crosspatch.engine.pairs import load_model

    roles = ["pt", "it"] if role == "paired" else [role]
    out = {}
    for r in roles:
        path = c.manifest["models"].get(r, {}).get("path")
        if not path:
            raise CrosspatchError(f"the cache manifest has no model path for {r!r}; cannot splice")
        out[r] = load_model(path, device=device, dtype=dtype, require_tokenizer=False)[0]
    return out


def _summary(meta: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "id",
        "kind",
        "architecture",
        "model_role",
        "layer",
        "hook_point",
        "width",
        "k",
        "training_tokens",
        "path",
    )
    source = (meta.get("cache") or {}).get("source") or {}
    return {
        **{k: meta.get(k) for k in keys},
        "gate": meta.get("gate", {}).get("status"),
        "gate_checks": [
            {k: c.get(k) for k in ("name", "value", "threshold", "passed", "status")}
            for c in meta.get("gate", {}).get("checks") or []
        ],
        "training_prompts": None if source.get("prompt_ids") is None else len(source["prompt_ids"]),
        "training_split": (source.get("split") or {}).get("kind"),
        "metrics": {k: v for k, v in meta.get("metrics", {}).items() if isinstance(v, (int, float))},
    }


def _resolve(ref: str, registry: Path | None) -> Dictionary:
    """A dictionary dir, `sae_lens:RELEASE/SAE_ID` (local Hugging Face cache), or a registry id."""
    from crosspatch.saes.load import load_dictionary, parse_pretrained_ref, resolve_dictionary
    from crosspatch.saes.registry import DictionaryRegistry

    if parse_pretrained_ref(ref) is not None:
        return resolve_dictionary(ref)
    if Path(ref).is_dir():
        return load_dictionary(ref)
    return DictionaryRegistry(_registry_root(registry)).load(ref)


@dict_app.command("eval")
def eval_cmd(
    ref: Annotated[
        str, typer.Argument(help="Dictionary directory, registry id, or sae_lens:RELEASE/SAE_ID.")
    ],
    cache: Annotated[Path, typer.Option(help="Activation cache with held-out tokens.")],
    registry: Annotated[Path | None, typer.Option()] = None,
    splice: Annotated[
        bool, typer.Option(help="Also measure CE/KL with the reconstruction spliced in.")
    ] = False,
    min_fve: Annotated[float, typer.Option()] = 0.75,
    min_heldout_tokens: Annotated[
        int, typer.Option(min=1, help="Minimum held-out tokens (fewer: the gate fails).")
    ] = 10_000,
    max_alive: Annotated[float, typer.Option(help="Maximum alive fraction.")] = 0.20,
    device: Annotated[str, typer.Option(help="Device of the models --splice loads.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="dtype of the models --splice loads.")] = "float32",
) -> None:
    """Re-evaluate a dictionary on held-out tokens and rewrite its gate status."""
    from crosspatch.saes.cache import ActivationCache
    from crosspatch.saes.quality import evaluate_dictionary

    d = _resolve(ref, registry)
    c = ActivationCache(cache)
    models = _models_for(c, d.meta.get("model_role") or d.branches[0], device, dtype) if splice else None
    evaluate_dictionary(
        d,
        c,
        models=models,
        gate=_gate(min_fve, min_heldout_tokens, max_alive),
        heldout_fraction=d.meta.get("train_config", {}).get("heldout_fraction", 0.1),
    )
    _print_gate(d.meta)
    typer.echo(json.dumps(_summary(d.meta)))


@dict_app.command("list")
def list_cmd(
    registry: Annotated[Path | None, typer.Option(help="Registry root.")] = None,
    layer: Annotated[int | None, typer.Option()] = None,
    kind: Annotated[str | None, typer.Option()] = None,
) -> None:
    """One line per registered dictionary: id, kind, layer, hook, width, k, gate, FVE."""
    from crosspatch.saes.registry import DictionaryRegistry

    filters = {k: v for k, v in (("layer", layer), ("kind", kind)) if v is not None}
    for r in DictionaryRegistry(_registry_root(registry)).rows(**filters):
        fves = [
            v for k, v in r["metrics"].items() if k.startswith("fve_") and not k.endswith(("_solo", "_min"))
        ]
        fve = f"{min(fves):.3f}" if fves else "-"
        typer.echo(
            f"{r['id']}\t{r['kind']}\tL{r['layer']}\t{r['hook_point']}\tw{r['width']}\tk{r['k']}\t"
            f"{r['gate_status']}\tFVE {fve}"
        )


@dict_app.command("show")
def show_cmd(
    ref: Annotated[
        str, typer.Argument(help="Dictionary directory, registry id, or sae_lens:RELEASE/SAE_ID.")
    ],
    registry: Annotated[Path | None, typer.Option()] = None,
) -> None:
    """The full crosspatch metadata of one dictionary (JSON)."""
    d = _resolve(ref, registry)
    typer.echo(json.dumps(d.meta, indent=1, sort_keys=True, default=str))
