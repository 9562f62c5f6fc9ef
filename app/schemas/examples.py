"""Request and response examples shown in the OpenAPI docs (a test validates every request example)."""

from __future__ import annotations

from typing import Any

_PROMPTS = [
    {"id": "q1", "text": "Q: What is the capital of France?\nA:", "category": "qa"},
    {"id": "q2", "text": "Write a haiku about autumn.", "category": "instruction"},
]

# POST /jobs bodies, one per job kind (name -> OpenAPI example object).
JOB_CREATE_EXAMPLES: dict[str, dict[str, Any]] = {
    "divergence": {
        "summary": "First divergence of PT and IT greedy decoding",
        "value": {
            "spec": {"kind": "divergence", "pair_id": "gemma3-1b", "prompts": _PROMPTS, "max_new_tokens": 32}
        },
    },
    "crosspatch": {
        "summary": "2x2 cross-patch at every boundary (sweep), prompts from a file",
        "value": {
            "spec": {
                "kind": "crosspatch",
                "pair_id": "gemma3-1b",
                "prompt_file": "prompts/chat-300.jsonl",
                "boundary": "sweep",
                "readouts": ["it", "pt"],
                "n_resamples": 2000,
            },
            "priority": 0,
        },
    },
    "train_dictionary": {
        "summary": "Train a BatchTopK SAE on IT's last MLP output",
        "value": {
            "spec": {
                "kind": "train_dictionary",
                "pair_id": "gemma3-1b",
                "prompt_file": "prompts/chat-300.jsonl",
                "model_role": "IT",
                "dictionary": {"architecture": "batchtopk", "layer": 25, "width": 16384, "k": 32},
            }
        },
    },
    "load_dictionary": {
        "summary": "Register a sae_lens-format dictionary from the dictionary roots",
        "value": {
            "spec": {"kind": "load_dictionary", "pair_id": "gemma3-1b", "path": "gemma3-1b/it-l25-16k"}
        },
    },
    "load_pretrained_dictionary": {
        "summary": "Register a pretrained SAE by sae_lens id (allow-listed; from the workers' local HF cache)",
        "value": {
            "spec": {
                "kind": "load_dictionary",
                "pair_id": "gemma3-1b",
                "source": "sae_lens",
                "release": "gemma-scope-2-1b-it-mlp-all",
                "sae_id": "layer_25_width_16k_l0_small",
            }
        },
    },
    "mediation": {
        "summary": "Rank, ablate and rescue a registered dictionary's features",
        "value": {
            "spec": {
                "kind": "mediation",
                "pair_id": "gemma3-1b",
                "dictionary_id": "gemma3-1b-it-l25-16k",
                "prompt_file": "prompts/chat-300.jsonl",
                "mediation": {"top_k": 200, "ks": [25, 50, 100, 200], "handoff": True},
            }
        },
    },
    "pipeline": {
        "summary": "Everything, for several families (divergence -> 2x2 -> dictionary -> mediation)",
        "value": {
            "spec": {
                "kind": "pipeline",
                "pair_ids": ["gemma3-1b", "qwen3-1.7b", "llama3.2-1b"],
                "prompt_file": "prompts/chat-300.jsonl",
                "mediation": {"top_k": 100, "ks": [10, 25, 50, 100]},
                "controls": ["offmanifold", "baselines"],
            },
            "priority": 10,
        },
    },
    "forced_tokens": {
        "summary": "Forced-token scoring: does the divergent token change the final answer? (method 6.1)",
        "value": {
            "spec": {
                "kind": "forced_tokens",
                "pair_id": "llama3.1-8b",
                "prompt_file": "prompts/holdout_600.jsonl",
                "max_new_tokens": 128,
                "branches": ["it", "pt", "rank_matched", "class_matched"],
            }
        },
    },
    "continuation": {
        "summary": "Constrained continuation: C_N for N in 0, 1, 2, 4, 8 with its controls (method 6.2)",
        "value": {
            "spec": {
                "kind": "continuation",
                "pair_id": "llama3.1-8b",
                "prompt_file": "prompts/holdout_600.jsonl",
                "ns": [0, 1, 2, 4, 8],
                "boundary": 19,
            }
        },
    },
    "lora_control": {
        "summary": "Domain-training control: LoRA CPT on PT, merge, verify domain learning, then the 2x2 (4.2)",
        "value": {
            "spec": {
                "kind": "lora_control",
                "pair_id": "llama3.1-8b",
                "corpus": ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n"],
                "prompt_file": "prompts/code_support.jsonl",
                "lora": {"rank": 32, "alpha": 64, "lr": 1e-4, "train_tokens": 20000000, "seq_len": 4096},
            }
        },
    },
    "crosspatch_controls": {
        "summary": "2x2 with its controls: off-manifold, commitment, selection baselines, native history",
        "value": {
            "spec": {
                "kind": "crosspatch",
                "pair_id": "gemma3-1b",
                "prompt_file": "prompts/chat-300.jsonl",
                "controls": ["offmanifold", "commitment", "baselines", "native_history"],
                "control_options": {
                    "alphas": [0, 0.25, 0.5, 0.75, 1],
                    "seeds": [0, 1, 2],
                    "horizons": [4, 8, 16],
                },
            }
        },
    },
    "lineage": {
        "summary": "Fixed-support lineage sweep: base -> SFT -> DPO -> final, one row per stage, and a contrast",
        "value": {
            "spec": {
                "kind": "lineage",
                "pair_id": "olmo2-1b",
                "prompt_file": "prompts/chat-300.jsonl",
                "stages": [
                    {"name": "sft", "path": "olmo2-1b-sft"},
                    {"name": "dpo", "path": "olmo2-1b-dpo"},
                    {"name": "final", "pair_id": "olmo2-1b"},
                ],
                "reference": "final",
                "contrasts": [["final", "sft"]],
            }
        },
    },
}

ROWS_EXAMPLE: dict[str, Any] = {
    "table": "summaries",
    "data": [
        {
            "family": "gemma3",
            "pair_id": "gemma3-1b",
            "boundary": 16,
            "readout": "it",
            "subset": "all",
            "statistic": "interaction",
            "estimate": 2.41,
            "ci_low": 1.97,
            "ci_high": 2.88,
            "n": 287,
            "p_value": 0.0001,
        }
    ],
    "count": 1,
}

ERROR_EXAMPLES: list[dict[str, Any]] = [
    {
        "message": "spec.boundary: boundary 40 out of range: pair 'gemma3-1b' has 26 layers (0..26)",
        "code": "invalid",
        "errors": [{"field": "spec.boundary", "reason": "boundary 40 out of range: ..."}],
    },
    {"message": "missing API key: send 'Authorization: Bearer <api key>'", "code": "unauthorized"},
    {"message": "you have 20 queued or running jobs; the limit is 20. ...", "code": "quota_exceeded"},
]
