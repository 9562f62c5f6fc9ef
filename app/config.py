"""One place for configuration: a pydantic-settings `Settings` read from `CROSSPATCH_*` env vars."""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

log = logging.getLogger(__name__)

# Passwords that mark an unconfigured deployment (refused in env=prod).
PLACEHOLDER_SECRETS = frozenset(
    {
        "",
        "changeme",
        "change-me",
        "change_me",
        "changethis",
        "password",
        "secret",
        "postgres",
        "crosspatch",
        "example",
        "xxx",
        "todo",
        "<password>",
        "${postgres_password}",
    }
)


class Settings(BaseSettings):
    """Service and CLI configuration. Every field can be set as `CROSSPATCH_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="CROSSPATCH_", env_file=".env", extra="ignore")

    data_dir: Path = Field(default=Path(".crosspatch"), description="Root for the job store, DuckDB, parts.")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL of the job store; default: SQLite file in data_dir."
    )
    duckdb_path: Path | None = Field(default=None, description="Results DuckDB file; default: in data_dir.")
    device: str = Field(default="cpu", description="Torch device for workers and the CLI: cpu, cuda, cuda:N.")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    model_allow_list: Path | None = Field(
        default=None, description="JSON/YAML file listing the pairs researchers may run (admin-managed)."
    )
    model_roots: list[Path] = Field(
        default_factory=list, description="Directories under which requests may name local model paths."
    )
    log_level: str = "INFO"
    env: Literal["dev", "prod"] = "dev"

    # ---- service (app/) ---------------------------------------------------------------------
    host: str = Field(default="127.0.0.1", description="Address `crosspatch serve` binds.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port `crosspatch serve` binds.")
    embedded_worker: bool = Field(
        default=True, description="`crosspatch serve` starts one local worker subprocess itself."
    )
    job_visibility: Literal["lab", "owner"] = Field(
        default="owner",
        description="Who reads a job's spec (inline prompts), logs and provenance: its owner (and admins), or "
        "the whole lab. Results follow each job's own `share` flag.",
    )
    max_streams_per_user: int = Field(
        default=8, ge=1, description="Concurrent progress streams (SSE) one researcher may hold; more is 429."
    )
    max_streams_total: int = Field(
        default=64, ge=1, description="Concurrent progress streams the whole server holds; more is 429."
    )
    max_active_jobs_per_user: int = Field(
        default=20, ge=1, description="Quota: a researcher's queued + running jobs; more answers 429."
    )
    max_request_bytes: int = Field(default=1_000_000, ge=1024, description="Largest request body accepted.")
    max_prompts_per_job: int = Field(default=10_000, ge=1, description="Most prompts one job may carry.")
    lease_seconds: float = Field(default=30.0, gt=0, description="A worker's lease on a claimed job.")
    heartbeat_seconds: float = Field(default=2.0, gt=0, description="How often a worker renews its lease.")
    max_attempts: int = Field(
        default=3, ge=1, description="Unused since worker losses are counted apart (worker_max_losses)."
    )
    poll_seconds: float = Field(default=1.0, gt=0, description="Idle worker / ingest loop poll interval.")
    worker_memory_bytes: int | None = Field(
        default=None, description="Memory a worker offers; default: the device's total memory."
    )
    device_memory_gb: float | None = Field(
        default=None,
        gt=0,
        description="Memory budget per device, GB (1e9 bytes), for a job's estimated peak (engine.admission, "
        "from config.json): lockstep when both models fit, staged (one model resident) when only one does, "
        "refused with the estimate otherwise (also at submit). A device map (`balanced`) counts every GPU. "
        "Default: no budget (lockstep).",
    )
    staged_state_bytes: int = Field(
        default=2 << 30,
        ge=0,
        description="Host memory for the states a staged job keeps between phases; beyond it, memory-mapped files.",
    )
    max_prompt_file_bytes: int = Field(
        default=64 << 20,
        ge=1,
        description="Largest prompt file (JSONL under the model roots) a job may name.",
    )
    max_prompt_chars: int = Field(
        default=20_000,
        ge=1,
        description="Longest prompt in characters, inline or one line of a prompt file (bounds its tokens).",
    )
    max_training_tokens: int = Field(
        default=10**9, ge=1, description="Most training tokens one dictionary job may ask for."
    )
    job_time_limit_seconds: dict[str, float] = Field(
        default_factory=lambda: {
            "divergence": 6 * 3600.0,
            "crosspatch": 12 * 3600.0,
            "train_dictionary": 24 * 3600.0,
            "load_dictionary": 600.0,
            "mediation": 12 * 3600.0,
            "pipeline": 48 * 3600.0,
        },
        description="Per-kind wall-clock budget of one attempt; past it the worker fails the job.",
    )
    job_memory_bytes: int | None = Field(
        default=None,
        ge=1 << 20,
        description="Resident memory a job's worker process may reach; past it the job fails. Default: none.",
    )
    cancel_grace_seconds: float = Field(
        default=10.0,
        gt=0,
        description="How long a job that should stop (cancelled, over budget) may take before its process is killed.",
    )
    worker_max_losses: int = Field(
        default=10, ge=1, description="Times a job's worker may be lost (lease expired) before the job fails."
    )
    worker_lock_dir: Path | None = Field(
        default=None,
        description="Where per-device worker locks live (default data_dir/workers); one host-wide directory "
        "keeps servers with different data dirs off each other's GPU.",
    )
    dictionary_roots: list[Path] = Field(
        default_factory=list, description="Directories under which dictionaries may be registered."
    )
    pretrained_dictionaries: list[str] = Field(
        default_factory=list,
        description="Pretrained SAEs researchers may load by sae_lens id, as 'RELEASE/SAE_ID' glob patterns "
        "(e.g. 'gemma-scope-2b-pt-res-canonical/*'); empty: none. Workers read them from their local "
        "Hugging Face cache only.",
    )
    executor: Literal["local", "ray"] = Field(
        default="local",
        description="Where workers run job chunks: 'local' (in the worker process) or 'ray' (in one warm Ray "
        "actor per loaded pair on the cluster at ray_address; needs the `ray` extra).",
    )
    ray_address: str | None = Field(
        default=None,
        description="Ray cluster to join with executor=ray ('ray://host:10001', 'auto'); default: the "
        "RAY_ADDRESS environment variable, else 'auto'.",
    )
    ray_num_gpus: float | None = Field(
        default=None,
        ge=0,
        description="GPUs each pair actor asks Ray for; default: 1 when device is cuda, else 0.",
    )
    ray_chunk_retries: int = Field(
        default=3,
        ge=0,
        description="Times a chunk whose Ray actor was lost is re-queued before the job fails.",
    )
    shared_cache_bytes: int = Field(
        default=20 * 2**30,
        ge=0,
        description="Size cap of the cache of dictionaries / activation caches shared across jobs (LRU "
        "eviction past it); 0 turns the cache off.",
    )

    @model_validator(mode="after")
    def _fill_paths(self) -> Settings:
        self.data_dir = self.data_dir.expanduser()
        if self.database_url is None:
            self.database_url = f"sqlite:///{(self.data_dir / 'jobs.sqlite').resolve()}"
        if self.duckdb_path is None:
            self.duckdb_path = self.data_dir / "results.duckdb"
        return self

    @model_validator(mode="after")
    def _prod_checks(self) -> Settings:
        """In `env=prod`: refuse a placeholder or empty database password; warn about a SQLite job store."""
        if self.env != "prod":
            return self
        assert self.database_url is not None
        try:
            url = make_url(self.database_url)
        except ArgumentError as e:
            raise ValueError(f"database_url is not a database URL: {e}") from e
        if url.password is not None and str(url.password).strip().lower() in PLACEHOLDER_SECRETS:
            shown = url.render_as_string(hide_password=True)
            raise ValueError(
                f"database_url ({shown}) has an empty or placeholder password; in env=prod set a real "
                "one (e.g. POSTGRES_PASSWORD=$(openssl rand -hex 16))"
            )
        if url.get_backend_name() == "sqlite":
            log.warning(
                "env=prod with a SQLite job store (%s): fine for one host, but workers on other hosts "
                "need PostgreSQL (CROSSPATCH_DATABASE_URL=postgresql+psycopg://...)",
                url.database,
            )
        return self


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings singleton (tests build their own `Settings(...)`)."""
    return Settings()
