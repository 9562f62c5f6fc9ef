"""Token sources for the activation cache: prompt files (read by `engine.prompts.load_prompts`), text
files, saved `datasets`, token-id lists; each with a content fingerprint for the manifest."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crosspatch.engine.errors import PromptFileError
from crosspatch.engine.prompts import PromptRecord, load_prompts
from crosspatch.saes.errors import CacheError

if TYPE_CHECKING:  # transformers is heavy; only the annotation needs it
    from transformers import PreTrainedTokenizerBase


# ---- token sources ------------------------------------------------------------------------------------
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class TokenSource:
    """Where token sequences come from: `kind` in prompts | text | dataset | ids.

    prompts: JSONL records with `prompt` or `formats`; text: a text file, one sequence per non-empty line;
    dataset: a local `datasets` directory (column `text_column`); ids: JSONL records with `input_ids`, or
    in-memory `ids` (for models without a tokenizer, as in tests).
    """

    kind: str
    path: Path | None = None
    ids: list[list[int]] | None = None
    text_column: str = "text"
    prompt_ids: list[str] | None = None  # prompts: keep only these ids; ids: the prompt id of each sequence
    split: dict[str, Any] | None = None  # how the training prompts were chosen (recorded, see `describe`)

    def fingerprint(self) -> str:
        """A hash of the source's content, stored in the manifest so a resume cannot mix sources."""
        if self.ids is not None:
            return hashlib.sha256(json.dumps(self.ids).encode()).hexdigest()
        assert self.path is not None
        if self.kind == "dataset":
            h = hashlib.sha256()
            for p in sorted(self.path.rglob("*")):
                if p.is_file():
                    h.update(p.name.encode() + _sha256_file(p).encode())
            return h.hexdigest()
        return _sha256_file(self.path)

    def describe(self) -> dict[str, Any]:
        """What the manifest (and so every dictionary trained on the cache) records about the source.

        `prompt_ids` lists the prompt ids whose tokens were cached (prompt sources, or id sources built
        from prompts), so mediation can check that no test event's prompt trained the dictionary; `split`
        says how they were chosen (e.g. the mediation fit split). Other sources have `prompt_ids` None
        (a separate corpus, not keyed by prompt id)."""
        out: dict[str, Any] = {
            "kind": self.kind,
            "path": str(self.path) if self.path else None,
            "hash": self.fingerprint(),
        }
        ids = self.prompt_ids
        if ids is None and self.kind == "prompts":
            ids = [r.id for r in self._records()]
        if ids is not None:
            out["prompt_ids"] = list(ids)
        if self.split is not None:
            out["split"] = dict(self.split)
        return out

    def _records(self) -> Iterator[PromptRecord]:
        """Prompt records of a `prompts` source (`engine.prompts.load_prompts`), filtered to `prompt_ids`."""
        assert self.path is not None
        keep = set(self.prompt_ids) if self.prompt_ids is not None and self.kind == "prompts" else None
        yield from (r for r in load_prompts(self.path) if keep is None or r.id in keep)

    def texts(self) -> Iterator[str]:
        """Raw texts (not for `ids` sources)."""
        assert self.path is not None
        if self.kind == "text":
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        yield line.rstrip("\n")
        elif self.kind == "prompts":
            yield from (r.text for r in self._records())
        elif self.kind == "dataset":
            try:
                import datasets  # optional dependency
            except ImportError:
                raise CacheError("a `datasets` source needs the `datasets` package installed") from None
            ds = datasets.load_from_disk(str(self.path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else next(iter(ds.values()))
            if self.text_column not in ds.column_names:
                raise CacheError(f"dataset has no column {self.text_column!r}; columns: {ds.column_names}")
            for row in ds:
                yield str(row[self.text_column])
        else:
            raise CacheError(f"source kind {self.kind!r} has no texts")

    def sequences(self, tokenizer: PreTrainedTokenizerBase | None, max_seq_len: int) -> Iterator[list[int]]:
        """Token id sequences, truncated to `max_seq_len` (BOS added by the tokenizer where it has one)."""
        if self.kind == "ids":
            seqs: Iterable[list[int]] = self.ids if self.ids is not None else self._ids_from_file()
            for s in seqs:
                if s:
                    yield [int(t) for t in s[:max_seq_len]]
            return
        if tokenizer is None:
            raise CacheError(f"a {self.kind!r} source needs a tokenizer; give one or use token-id input")
        for text in self.texts():
            ids = tokenizer.encode(text, add_special_tokens=True)[:max_seq_len]
            if ids:
                yield list(ids)

    def _ids_from_file(self) -> Iterator[list[int]]:
        assert self.path is not None
        with open(self.path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield list(json.loads(line)["input_ids"])
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise PromptFileError(
                            f"{self.path}:{i}: expected a JSON record with 'input_ids'"
                        ) from None


def token_source(spec: str | Path | Sequence[Sequence[int]] | TokenSource) -> TokenSource:
    """Detect a source: a TokenSource, a list of id lists, a `datasets` dir, a .jsonl or a text file."""
    if isinstance(spec, TokenSource):
        return spec
    if not isinstance(spec, (str, Path)):
        return TokenSource(kind="ids", ids=[list(map(int, s)) for s in spec])
    path = Path(spec)
    if not path.exists():
        raise PromptFileError(f"token source {str(path)!r} does not exist")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return TokenSource(kind="dataset", path=path)
        raise PromptFileError(f"{path} is a directory but not a saved `datasets` dataset")
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), None)
        if first is None:
            raise PromptFileError(f"{path} is empty")
        try:
            rec = json.loads(first)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{path}:1: not valid JSON ({e.msg})") from None
        return TokenSource(kind="ids" if "input_ids" in rec else "prompts", path=path)
    return TokenSource(kind="text", path=path)
