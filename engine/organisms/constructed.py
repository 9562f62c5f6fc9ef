"""Constructed PT/IT pairs: hand-set weights whose cross-patching 2x2 answer follows from the construction.

Residual-stream layout (d_model = 64), shared by every constructed organism:

- coordinate 0 (`CONST`): a constant every token embedding carries, so "always-on" neurons exist;
- coordinate 1 (`U`): the upstream signal `u` that IT's early blocks write in `upstream_dependent`/`mediated`;
- coordinates 2, 3 (`V_A`, `V_B`): each descendant's own upstream direction in `two_descendants`;
- coordinates 4..7 (`K[j]`): read only by the unembedding row of answer word j (t_IT for class j);
- coordinates 8..11 (`C[j]`): class indicator, 1 on the embedding of the words of class j, else 0;
- coordinates 12..15 (`M[j]`): extra axes that give the mediated neurons distinct decoder directions;
- coordinates 16..63: token identity, a random unit vector per word, scaled so every embedding has norm 8;
  `mediated` keeps 16..31 for word groups (`BACKGROUND[g]`: the word's group value on the embedding of the
  words of group g, independent of class) and its identity subspace starts at 32 (`Construction.identity_start`).

PT reads only token identity: its unembedding row for word t is the identity vector of the word before t in
a fixed random cycle `succ`, so PT's greedy continuation walks the cycle (t_PT = succ(current word)). Random
"noise" weights (attention everywhere, the unplanted MLP neurons) only read and write coordinates 16..63, so
they vary per-prompt values a little but never touch the planted coordinates. Planted neurons are Llama/Qwen3
gated MLP neurons, `down * silu(gate . x) * (up . x)` with no biases, so a neuron whose gate reads only `U`
is exactly 0 when `u` is absent (silu(0) = 0). A neuron fires only when the current word is in its class,
so IT departs from PT at the first generated step whose current word is classed: positions vary by prompt.
`mediated` also gives PT and IT the same final-MLP *background* neurons, one per word group, each writing back
on its group axis, which nothing downstream reads but the final norm: shared sparse features that fire under
either upstream at every scored position (the pool a matched-random control draws from, method 5.2).

GPT-2 (ungated gelu MLP, LayerNorm) gets the same logical construction written in a mean-free orthogonal
basis (see `_mean_free_basis`), with one answer word for every word, and no `mediated` kind.

`nominal_cells` replays the planted parts alone (noise weights set to zero) in float64 and gives the 2x2
values the construction implies; `expected()` turns them into the bounds the tests assert.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from crosspatch.engine.organisms.tiny import tiny_config
from crosspatch.engine.organisms.tokenizer import ANSWER_WORDS, SPECIAL_TOKENS, vocabulary

CONSTRUCTED_KINDS: tuple[str, ...] = (
    "upstream_dependent",
    "self_contained",
    "upstream_only",
    "mediated",
    "paper_sized",
    "lineage",
    "first_late_block",
    "two_descendants",
)
CONSTRUCTED_FAMILIES: tuple[str, ...] = ("llama", "qwen3", "gpt2")
# GPT-2's MLP has no gate, so a neuron cannot be exactly "u AND class j": its organisms use one answer word
# for every word (all divergences at position 0) and have no `mediated` kind (its neurons would co-fire).
FAMILY_KINDS: dict[str, tuple[str, ...]] = {
    "llama": CONSTRUCTED_KINDS,
    # llama-only: depth anatomy, closure's wrong-descendant control
    "qwen3": tuple(k for k in CONSTRUCTED_KINDS if k not in ("first_late_block", "two_descendants")),
    "gpt2": ("upstream_dependent", "self_contained", "upstream_only"),
}

D_MODEL = 64
N_LAYERS = 5
BOUNDARY = round(0.6 * N_LAYERS)  # 3: upstream = blocks 0..2, late stack = blocks 3..4 + norm + unembed
N_CLASSES = len(ANSWER_WORDS)
CONST, U = 0, 1
V_A, V_B = 2, 3
K = tuple(4 + j for j in range(N_CLASSES))
C = tuple(8 + j for j in range(N_CLASSES))
M = tuple(12 + j for j in range(N_CLASSES))
N_RESERVED = 16
N_PLANT_SLOTS = 8  # MLP neurons 0..7 of every block are reserved for planting; the rest are noise
# `mediated`'s word groups: axes 16..31; each cycle word carries its own group value (drawn from GROUP_VALUES)
# on its group's axis. Background neuron g (final MLP slot N_CLASSES + g, in PT and IT alike) reads it and
# writes back on the same axis: silu(2 v / rms) * (2 / rms) * 0.5, 2.9 .. 7.0 at rms 1. Many groups and
# per-word values keep a word's background from being one fixed vector per (class, group): a dictionary
# then learns one latent per group, not one per classed word fused with its planted direction.
N_BACKGROUND = 16
BACKGROUND = tuple(N_RESERVED + g for g in range(N_BACKGROUND))
GROUP_VALUES = (1.5, 2.0, 2.5, 3.0, 3.5)
BACKGROUND_GATE = 2.0
BACKGROUND_WRITE = 0.5

EMBED_NORM = math.sqrt(D_MODEL)  # post-RMSNorm the embedding is itself (RMS 1)
CONST_VALUE = 2.0
CLASS_VALUE = 2.0
BETA_PT = 1.0  # scale of PT's cycle readout
BETA_IT = 2.0  # scale of the answer-word readout on K[j]
NOISE_STD = 0.05
NORM_EPS = {"llama": 1e-6, "qwen3": 1e-6, "gpt2": 1e-5}  # the configs' rms_norm_eps / layer_norm_epsilon


@dataclass(frozen=True)
class Neuron:
    """One planted MLP neuron on the post-norm residual `x`: gated `down * silu(gate . x) * (up . x)`
    (Llama, Qwen3) or, with `up=None`, `down * gelu_new(gate . x)` (GPT-2, zero bias)."""

    layer: int
    index: int
    gate: dict[int, float]
    up: dict[int, float] | None
    down: dict[int, float]


@dataclass
class Construction:
    """Everything a constructed organism's weights and expected values follow from."""

    kind: str
    family: str
    seed: int
    word_class: dict[int, int]  # token id -> class j, for classed cycle words
    succ: dict[int, int]  # token id -> PT's next word (a single cycle over the cycle words)
    it_neurons: list[Neuron] = field(default_factory=list)
    mediators: list[Neuron] = field(default_factory=list)  # the known final-MLP mediators (`mediated`)
    # `lineage`: descendants of the same base (PT), name -> their neurons; `it_neurons` is the last stage.
    stages: dict[str, list[Neuron]] = field(default_factory=dict)
    strong_classes: tuple[int, ...] = ()  # `paper_sized`: classes whose late effect needs IT's upstream u
    beta_pt: float = BETA_PT  # scale of PT's cycle readout (the new kinds halve it: |Y(PT, PT)| ~ 3.7)
    base_neurons: list[Neuron] = field(default_factory=list)  # in PT and IT alike (`mediated`'s background)
    word_group: dict[int, int] = field(default_factory=dict)  # token id -> word group g (`mediated`)
    group_value: dict[int, float] = field(default_factory=dict)  # token id -> its group indicator value

    @property
    def identity_start(self) -> int:
        """First coordinate of the token-identity subspace (after the word-group axes, if any)."""
        return N_RESERVED + (N_BACKGROUND if self.word_group else 0)

    @property
    def plant_slots(self) -> int:
        """MLP neurons 0..plant_slots-1 of every block are kept free of noise for planting."""
        return N_CLASSES + N_BACKGROUND if self.word_group else N_PLANT_SLOTS

    @property
    def answer_ids(self) -> list[int]:
        vocab = vocabulary()
        return [vocab.index(w) for w in ANSWER_WORDS]


def _silu(z: float) -> float:
    return z / (1.0 + math.exp(-z))


def _gelu_new(z: float) -> float:
    return 0.5 * z * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))


def _activation(n: Neuron, x: list[float]) -> float:
    """The neuron's activation on the post-norm residual `x` (logical coordinates)."""
    pre = sum(w * x[i] for i, w in n.gate.items())
    if n.up is None:
        return _gelu_new(pre)
    return _silu(pre) * sum(w * x[i] for i, w in n.up.items())


def _unit(coords: dict[int, float]) -> dict[int, float]:
    norm = math.sqrt(sum(v * v for v in coords.values()))
    return {i: v / norm for i, v in coords.items()}


def make_construction(kind: str, family: str = "llama", seed: int = 0) -> Construction:
    """The word classes, PT's cycle and IT's planted neurons for `kind`; deterministic in `seed`."""
    if family not in CONSTRUCTED_FAMILIES:
        raise ValueError(f"constructed organisms exist for {', '.join(CONSTRUCTED_FAMILIES)}, not {family!r}")
    if kind not in FAMILY_KINDS[family]:
        raise ValueError(
            f"unknown constructed kind {kind!r} for {family}; choose one of {', '.join(FAMILY_KINDS[family])}"
        )
    vocab = vocabulary()
    rng = random.Random(seed)
    cycle_words = [i for i, w in enumerate(vocab) if w not in SPECIAL_TOKENS and w not in ANSWER_WORDS]
    order = cycle_words[:]
    rng.shuffle(order)
    succ = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}
    # Half the cycle words get a class; the walk from any word meets a classed word within a few steps.
    classed = order[:]
    rng.shuffle(classed)
    # `paper_sized` classes only a quarter of the words, so most walks meet one later (positions >= 3).
    n_classed = len(classed) // (4 if kind == "paper_sized" else 2)
    word_class = {t: i % N_CLASSES for i, t in enumerate(classed[:n_classed])}
    if family == "gpt2":
        return _gpt2_construction(kind, seed, succ, {t: 0 for t in order})

    always_on = {CONST: 2.0}  # post-norm CONST is CONST_VALUE / rms: gate ~ 4, silu ~ 3.9
    neurons: list[Neuron] = []
    mediators: list[Neuron] = []
    last = N_LAYERS - 1
    if kind in ("upstream_dependent", "mediated", "first_late_block"):
        # Early block 0 writes u at every position: u ~ 0.5 * silu(4) * 2 ~ 3.9.
        neurons.append(Neuron(0, 0, gate=always_on, up={CONST: 1.0}, down={U: 0.5}))
    if kind == "upstream_dependent":
        # Both late MLPs read u (gate) and the current word's class (up) and write toward the answer word.
        for layer in range(BOUNDARY, N_LAYERS):
            for j in range(N_CLASSES):
                neurons.append(Neuron(layer, j, gate={U: 1.5}, up={C[j]: 1.0}, down={K[j]: 0.6}))
    elif kind == "first_late_block":
        # The interaction sits in the first late block only (block 3); the final block is PT's.
        for j in range(N_CLASSES):
            neurons.append(Neuron(BOUNDARY, j, gate={U: 1.5}, up={C[j]: 1.0}, down={K[j]: 1.2}))
    elif kind == "mediated":
        # Only the final MLP, through one neuron per class with a distinct unit decoder direction.
        for j in range(N_CLASSES):
            direction = _unit({K[j]: 1.0, M[j]: 0.5})
            n = Neuron(
                last, j, gate={U: 1.5}, up={C[j]: 1.0}, down={i: 1.2 * v for i, v in direction.items()}
            )
            neurons.append(n)
            mediators.append(n)
        con = Construction(kind, family, seed, word_class, succ, neurons, mediators)
        con.word_group, con.group_value = _word_groups(classed, n_classed, seed)
        con.base_neurons = _background_neurons()
        return con
    elif kind == "self_contained":
        for j in range(N_CLASSES):
            neurons.append(Neuron(last, j, gate=always_on, up={C[j]: 1.0}, down={K[j]: 1.2}))
    elif kind == "upstream_only":
        for j in range(N_CLASSES):
            neurons.append(Neuron(1, j, gate=always_on, up={C[j]: 1.0}, down={K[j]: 1.2}))
    elif kind == "paper_sized":
        con = Construction(kind, family, seed, word_class, succ, _paper_sized_neurons(), mediators)
        con.strong_classes, con.beta_pt = PAPER_STRONG_CLASSES, SMALL_BETA_PT
        return con
    elif kind == "two_descendants":
        con = Construction(kind, family, seed, word_class, succ, _descendant_neurons(V_A), mediators)
        con.stages, con.beta_pt = {TWO_SECOND: _descendant_neurons(V_B)}, SMALL_BETA_PT
        return con
    elif kind == "lineage":
        stages = {name: _lineage_neurons(scale) for name, scale in LINEAGE_STAGES.items()}
        stages[LINEAGE_PORTABLE] = _lineage_neurons(0.0, portable=LINEAGE_PORTABLE_WEIGHT, write_u=False)
        con = Construction(kind, family, seed, word_class, succ, stages[LINEAGE_FINAL], mediators)
        con.stages, con.beta_pt = stages, SMALL_BETA_PT
        return con
    return Construction(kind, family, seed, word_class, succ, neurons, mediators)


def _word_groups(classed: list[int], n_classed: int, seed: int) -> tuple[dict[int, int], dict[int, float]]:
    """Word group of every cycle word, spread evenly over each class (and the unclassed words), and its
    indicator value, drawn independently per word."""
    groups = {t: (i // N_CLASSES) % N_BACKGROUND for i, t in enumerate(classed[:n_classed])}
    groups.update({t: i % N_BACKGROUND for i, t in enumerate(classed[n_classed:])})
    rng = random.Random(f"groups-{seed}")
    return groups, {t: rng.choice(GROUP_VALUES) for t in classed}


def _background_neurons() -> list[Neuron]:
    """Final-MLP neuron per word group: reads its group axis, writes back on it (no readout reads it)."""
    return [
        Neuron(
            N_LAYERS - 1,
            N_CLASSES + g,
            gate={BACKGROUND[g]: BACKGROUND_GATE},
            up={CONST: 1.0},
            down={BACKGROUND[g]: BACKGROUND_WRITE},
        )
        for g in range(N_BACKGROUND)
    ]


# `paper_sized`: effects of the size the method reports (interaction ~ +2, portable part ~ +0.8), later
# divergences, and two kinds of classed words. At a *strong* class (0, 1) IT's late stack adds an
# upstream-dependent push (neurons gated on u) on top of a portable one; at a *weak* class (2, 3) only the
# portable push acts. The prompt set puts every first divergence on a strong class; later disagreements in
# either rollout meet both kinds, so random local disagreements carry about half the interaction.
# Upstream, a class-gated block-1 neuron writes K[j] (weak for class 0, strong for class 1), so IT's boundary
# logit lens does not yet favour t_IT at class-0 events and already does at class-1 events.
SMALL_BETA_PT = 0.5
# A small u (~1) read by a steep gate: u barely changes the residual's norm, so the portable pushes act
# (almost) alike under either upstream and the interaction comes from the u-gated neurons alone.
SMALL_U_WRITE, SMALL_U_GATE = 0.13, 6.0
PAPER_STRONG_CLASSES: tuple[int, ...] = (0, 1)
PAPER_UPSTREAM_K: tuple[float, ...] = (0.15, 0.45, 0.15, 0.15)  # block-1 write on K[j], per class
PAPER_LATE_U = 0.065  # per late block, u-gated write on K[j] (strong classes)
PAPER_PORTABLE = 0.06  # block-4 always-on write on K[j] (every class)
PAPER_WEAK_LATE_U = 0.02  # weak classes: a small u-gated push
PAPER_WEAK_PORTABLE = 0.25  # weak classes get a larger portable push so IT still departs from PT there


def _paper_sized_neurons() -> list[Neuron]:
    """IT's neurons for `paper_sized` (see the constants above)."""
    always_on = {CONST: 2.0}
    neurons = [Neuron(0, 0, gate=always_on, up={CONST: 1.0}, down={U: SMALL_U_WRITE})]  # u ~ 1
    for j in range(N_CLASSES):
        neurons.append(Neuron(1, j, gate=always_on, up={C[j]: 1.0}, down={K[j]: PAPER_UPSTREAM_K[j]}))
        strong = j in PAPER_STRONG_CLASSES
        portable = PAPER_PORTABLE if strong else PAPER_WEAK_PORTABLE
        late_u = PAPER_LATE_U if strong else PAPER_WEAK_LATE_U
        neurons.append(Neuron(N_LAYERS - 1, 4 + j, gate=always_on, up={C[j]: 1.0}, down={K[j]: portable}))
        for layer in range(BOUNDARY, N_LAYERS):
            neurons.append(Neuron(layer, j, gate={U: SMALL_U_GATE}, up={C[j]: 1.0}, down={K[j]: late_u}))
    return neurons


# `lineage`: three cumulative descendants of one base (like SFT -> DPO -> final) whose u-gated late push
# grows by stage, plus a `portable` descendant (like a domain fine-tune) whose late push is always-on and
# whose upstream equals the base's: a large late effect from either upstream, interaction exactly 0.
LINEAGE_STAGES: dict[str, float] = {"sft": 0.3, "dpo": 0.7, "final": 1.0}  # scale of the u-gated push
LINEAGE_FINAL = "final"
LINEAGE_PORTABLE = "portable"
LINEAGE_LATE_U = 0.06  # per late block, u-gated write on K[j] at scale 1
LINEAGE_UPSTREAM_K = 0.25  # block-1 write on K[j] (every instruction stage)
LINEAGE_STAGE_PORTABLE = 0.06  # block-4 always-on write on K[j] (every instruction stage)
LINEAGE_PORTABLE_WEIGHT = 0.25  # the portable descendant's block-4 write on K[j]


def _lineage_neurons(
    scale: float, portable: float = LINEAGE_STAGE_PORTABLE, write_u: bool = True
) -> list[Neuron]:
    """One lineage descendant: u writer + block-1 K writer (if `write_u`), u-gated late push x `scale`, portable push."""
    always_on = {CONST: 2.0}
    neurons: list[Neuron] = []
    if write_u:
        neurons.append(Neuron(0, 0, gate=always_on, up={CONST: 1.0}, down={U: SMALL_U_WRITE}))
    for j in range(N_CLASSES):
        if write_u:
            neurons.append(Neuron(1, j, gate=always_on, up={C[j]: 1.0}, down={K[j]: LINEAGE_UPSTREAM_K}))
        neurons.append(Neuron(N_LAYERS - 1, 4 + j, gate=always_on, up={C[j]: 1.0}, down={K[j]: portable}))
        if scale > 0:
            for layer in range(BOUNDARY, N_LAYERS):
                neurons.append(
                    Neuron(
                        layer, j, gate={U: SMALL_U_GATE}, up={C[j]: 1.0}, down={K[j]: scale * LINEAGE_LATE_U}
                    )
                )
    return neurons


# `two_descendants`: two descendants of one base (descendant A = `it/`, B = `stages/b/`). Each writes, in
# block 0, one upstream shift with a shared part (u) and its own part (V_A or V_B) of equal size, and its late
# block 4 reads the sum linearly (per class j: gate on the class indicator, up on u + its own axis), so the
# PT-up late effect is exactly 0. B's boundary shift is one direction, (u + V_B) / sqrt(2): projecting A's
# shift (u + V_A) on it keeps half of A's u and none of V_A, so B's directions injected into A's hybrid
# close about a quarter of A's gap (`nominal_closure`: the exact noise-free value).
TWO_SECOND = "b"
TWO_WRITE = SMALL_U_WRITE  # block-0 write on u and on the own axis (each ~1)
TWO_GATE = 1.5  # late gate on the class indicator: silu(1.5 x 2) ~ 2.86
TWO_READ = 0.6  # late write on K[j] per unit of (u + own axis)


def _descendant_neurons(own: int) -> list[Neuron]:
    """One `two_descendants` descendant whose own upstream axis is `own` (V_A or V_B)."""
    neurons = [Neuron(0, 0, gate={CONST: 2.0}, up={CONST: 1.0}, down={U: TWO_WRITE, own: TWO_WRITE})]
    for j in range(N_CLASSES):
        neurons.append(
            Neuron(N_LAYERS - 1, j, gate={C[j]: TWO_GATE}, up={U: 1.0, own: 1.0}, down={K[j]: TWO_READ})
        )
    return neurons


def _gpt2_construction(
    kind: str, seed: int, succ: dict[int, int], word_class: dict[int, int]
) -> Construction:
    """GPT-2 variant: ungated gelu neurons, one answer word (class 0) for every word."""
    neurons: list[Neuron] = []
    if kind == "upstream_dependent":
        neurons.append(Neuron(0, 0, gate={CONST: 2.0}, up=None, down={U: 1.0}))  # u ~ gelu(4) ~ 4
        for layer in range(BOUNDARY, N_LAYERS):  # gelu(0) = 0: silent without u
            neurons.append(Neuron(layer, 0, gate={U: 1.5}, up=None, down={K[0]: 0.6}))
    elif kind == "self_contained":
        neurons.append(Neuron(N_LAYERS - 1, 0, gate={CONST: 2.0}, up=None, down={K[0]: 2.5}))
    elif kind == "upstream_only":
        neurons.append(Neuron(1, 0, gate={CONST: 2.0}, up=None, down={K[0]: 2.5}))
    return Construction(kind, "gpt2", seed, word_class, succ, neurons, [])


# ---- weights -----------------------------------------------------------------------------------------


def _copy_of(config, state: dict[str, torch.Tensor]) -> PreTrainedModel:
    """A fresh fp32 model of `config` holding the weights in `state` (IT starts as a copy of PT)."""
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    for name, param in model.named_parameters():
        _set(param, state[name])
    return model


def _identity_stop(family: str) -> int:
    """End of the identity subspace: GPT-2 keeps the last logical coordinate for the residual's mean."""
    return D_MODEL - 1 if family == "gpt2" else D_MODEL


def _token_directions(gen: torch.Generator, vocab_size: int, start: int, stop: int) -> torch.Tensor:
    """A random unit vector per token in the identity subspace: `[vocab, d_model]`, zero on reserved coords."""
    dirs = torch.zeros(vocab_size, D_MODEL, dtype=torch.float64)
    raw = torch.randn(vocab_size, stop - start, generator=gen, dtype=torch.float64)
    dirs[:, start:stop] = raw / raw.norm(dim=-1, keepdim=True)
    return dirs


def embedding_matrix(con: Construction, token_dirs: torch.Tensor) -> torch.Tensor:
    """`[vocab, d_model]`: CONST + class and group indicators + identity, every row of norm `EMBED_NORM`."""
    emb = torch.zeros_like(token_dirs)
    emb[:, CONST] = CONST_VALUE
    for t, j in con.word_class.items():
        emb[t, C[j]] = CLASS_VALUE
    for t, g in con.word_group.items():
        emb[t, BACKGROUND[g]] = con.group_value[t]
    used = (emb**2).sum(-1, keepdim=True)
    return emb + token_dirs * (EMBED_NORM**2 - used).sqrt()


def unembedding_matrix(con: Construction, token_dirs: torch.Tensor) -> torch.Tensor:
    """`[vocab, d_model]`: cycle word t reads the identity of its predecessor; answer j reads K[j]."""
    unemb = torch.zeros_like(token_dirs)
    for prev, nxt in con.succ.items():
        unemb[nxt] = con.beta_pt * token_dirs[prev]
    for j, t in enumerate(con.answer_ids):
        unemb[t, K[j]] = BETA_IT
    return unemb


def _noise(
    gen: torch.Generator,
    rows: int,
    cols: int,
    read_identity: bool,
    write_identity: bool,
    start: int = N_RESERVED,
    stop: int = D_MODEL,
) -> torch.Tensor:
    """Small random `[rows, cols]` weights confined to the identity subspace (coords start..stop-1)."""
    w = torch.randn(rows, cols, generator=gen, dtype=torch.float64) * NOISE_STD
    if read_identity:
        w[:, :start] = 0.0  # never read the planted coordinates
        w[:, stop:] = 0.0
    if write_identity:
        w[:start, :] = 0.0  # never write them
        w[stop:, :] = 0.0
    return w


def _set(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    assert param.shape == value.shape, (param.shape, value.shape)
    param.data.copy_(value.to(param.dtype))


def build_models(
    con: Construction, neurons: list[Neuron] | None = None
) -> tuple[PreTrainedModel, PreTrainedModel]:
    """The PT and IT models of `con` (fp32, eval mode): PT holds `con.base_neurons`, IT = PT plus `neurons`
    (default `con.it_neurons`)."""
    if con.family == "gpt2":
        return _build_gpt2(con)
    vocab_size = len(vocabulary())
    config = tiny_config(con.family, vocab_size=vocab_size, n_layers=N_LAYERS)
    assert config.hidden_size == D_MODEL
    gen = torch.Generator().manual_seed(10_000 + con.seed)
    start, slots = con.identity_start, con.plant_slots
    token_dirs = _token_directions(gen, vocab_size, start, D_MODEL)
    pt = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    for name, param in pt.named_parameters():
        if name.endswith("norm.weight"):  # every RMSNorm (incl. Qwen3 q/k norms) is the identity
            value = torch.ones_like(param, dtype=torch.float64)
        elif name.endswith("embed_tokens.weight"):
            value = embedding_matrix(con, token_dirs)
        elif name == "lm_head.weight":
            value = unembedding_matrix(con, token_dirs)
        elif name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            value = _noise(gen, *param.shape, read_identity=True, write_identity=False, start=start)
        elif name.endswith("o_proj.weight"):
            value = _noise(gen, *param.shape, read_identity=False, write_identity=True, start=start)
        elif name.endswith(("gate_proj.weight", "up_proj.weight")):
            value = _noise(gen, *param.shape, read_identity=True, write_identity=False, start=start)
            value[:slots] = 0.0
        elif name.endswith("down_proj.weight"):
            value = _noise(gen, *param.shape, read_identity=False, write_identity=True, start=start)
            value[:, :slots] = 0.0
        else:
            raise AssertionError(f"constructed organisms do not know parameter {name!r}")
        _set(param, value)
    _plant(pt, con.base_neurons)
    it = _copy_of(config, {name: param.data for name, param in pt.named_parameters()})
    _plant(it, con.it_neurons if neurons is None else neurons)
    return pt, it


def _plant(model: PreTrainedModel, neurons: list[Neuron]) -> None:
    """Write gated `neurons` into a Llama/Qwen3 model's MLP weights (their slots hold zeros before)."""
    for n in neurons:
        mlp = model.model.layers[n.layer].mlp
        for coord, w in n.gate.items():
            mlp.gate_proj.weight.data[n.index, coord] = w
        for coord, w in n.up.items():
            mlp.up_proj.weight.data[n.index, coord] = w
        for coord, w in n.down.items():
            mlp.down_proj.weight.data[coord, n.index] = w


def _mean_free_basis() -> torch.Tensor:
    """`[d_model, d_model]` orthogonal Q whose last column is the all-ones direction.

    GPT-2 weights live in physical coordinates `Q @ logical`: a logical vector with a zero last coordinate
    has zero mean, so LayerNorm (zero bias, unit gain) acts on it exactly as RMSNorm on the logical vector.
    """
    basis = torch.eye(D_MODEL, dtype=torch.float64)
    basis[:, -1] = 1.0
    q, _ = torch.linalg.qr(basis.roll(1, dims=1))  # ones first so QR keeps it, then rotate it to the end
    q = q.roll(-1, dims=1)
    q[:, -1] = q[:, -1].sign() * q[:, -1]  # +1/8 everywhere
    return q


def _build_gpt2(con: Construction) -> tuple[PreTrainedModel, PreTrainedModel]:
    """GPT-2 PT and IT: the same logical construction, written in the mean-free basis."""
    vocab_size = len(vocabulary())
    config = tiny_config("gpt2", vocab_size=vocab_size, n_layers=N_LAYERS)
    config.tie_word_embeddings = False
    assert config.n_embd == D_MODEL
    stop = _identity_stop("gpt2")
    q = _mean_free_basis()
    gen = torch.Generator().manual_seed(10_000 + con.seed)
    token_dirs = _token_directions(gen, vocab_size, N_RESERVED, stop)
    state: dict[str, torch.Tensor] = {}
    pt = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    for name, param in pt.named_parameters():
        if name.endswith(".bias") or name.endswith("wpe.weight"):
            value = torch.zeros_like(param, dtype=torch.float64)  # no biases, no position signal
        elif name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            value = torch.ones_like(param, dtype=torch.float64)
        elif name.endswith("wte.weight"):
            value = embedding_matrix(con, token_dirs) @ q.T  # rows: physical = Q @ logical
        elif name == "lm_head.weight":
            value = unembedding_matrix(con, token_dirs) @ q.T
        elif name.endswith(("attn.c_attn.weight", "mlp.c_fc.weight")):  # Conv1D [in, out]: reads
            out_dim = param.shape[1]
            value = (_noise(gen, out_dim, D_MODEL, True, False, stop=stop) @ q.T).T
            if "c_fc" in name:
                value[:, :N_PLANT_SLOTS] = 0.0
        elif name.endswith(("attn.c_proj.weight", "mlp.c_proj.weight")):  # Conv1D [in, out]: writes
            in_dim = param.shape[0]
            value = (q @ _noise(gen, D_MODEL, in_dim, False, True, stop=stop)).T
            if "mlp" in name:
                value[:N_PLANT_SLOTS, :] = 0.0
        else:
            raise AssertionError(f"constructed organisms do not know parameter {name!r}")
        state[name] = value
        _set(param, value)
    it = _copy_of(config, state)
    for n in con.it_neurons:
        mlp = it.transformer.h[n.layer].mlp
        gate = torch.zeros(D_MODEL, dtype=torch.float64)
        down = torch.zeros(D_MODEL, dtype=torch.float64)
        for coord, w in n.gate.items():
            gate[coord] = w
        for coord, w in n.down.items():
            down[coord] = w
        mlp.c_fc.weight.data[:, n.index] = (q @ gate).float()  # reads gate . (Q^T x)
        mlp.c_proj.weight.data[n.index, :] = (q @ down).float()  # writes Q @ down
    return pt, it


# ---- what the construction implies -------------------------------------------------------------------


def _rms_norm(h: list[float], eps: float) -> list[float]:
    scale = 1.0 / math.sqrt(sum(v * v for v in h) / len(h) + eps)
    return [v * scale for v in h]


def _run_planted(h: list[float], neurons: list[Neuron], layers: range, eps: float) -> list[float]:
    """Blocks `layers` with noise weights at zero: attention writes nothing, only planted neurons act."""
    h = h[:]
    for layer in layers:
        x = _rms_norm(h, eps)
        acts = [(n, _activation(n, x)) for n in neurons if n.layer == layer]
        for n, a in acts:
            for i, w in n.down.items():
                h[i] += a * w
    return h


def _start_residual(con: Construction, word_class: int, word: int | None = None) -> list[float]:
    """The embedding of `word` (of class `word_class`; default: any word of that class) on the coordinates the
    nominal values track.

    Its identity direction is put on the first identity coordinate (only PT's logit of t_PT reads it). With
    word groups, `word`'s own group and value; by default group 0 with the median value stands for every word
    of the class (the construction is the same for each group).
    """
    h0 = [0.0] * D_MODEL
    h0[CONST], h0[C[word_class]] = CONST_VALUE, CLASS_VALUE
    if con.word_group:
        group, value = (
            (0, statistics.median(GROUP_VALUES))
            if word is None
            else (con.word_group[word], con.group_value[word])
        )
        h0[BACKGROUND[group]] = value
    h0[con.identity_start] = math.sqrt(EMBED_NORM**2 - sum(v * v for v in h0))
    return h0


def nominal_cells(
    con: Construction,
    word_class: int = 0,
    ablate_mediators: bool = False,
    neurons: list[Neuron] | None = None,
    word: int | None = None,
) -> dict[str, float]:
    """Noise-free 2x2 at a step whose current word has class `word_class`, or is `word` (float64).

    The residual is tracked on the planted coordinates plus the identity part, whose direction only enters
    PT's logit of t_PT; the common-IT readout equals PT's (the constructions never change the readout).
    """
    eps = NORM_EPS[con.family]
    word_class = con.word_class[word] if word is not None else word_class
    h0 = _start_residual(con, word_class, word)
    base = con.base_neurons
    it_neurons = con.it_neurons if neurons is None else neurons
    it_late_neurons = [n for n in it_neurons if not (ablate_mediators and n in con.mediators)]
    upstream = {
        "pt": _run_planted(h0, base, range(BOUNDARY), eps),
        "it": _run_planted(h0, base + it_neurons, range(BOUNDARY), eps),
    }
    late = {"pt": base, "it": base + it_late_neurons}
    cells: dict[str, float] = {}
    for up_name, h_up in upstream.items():
        for late_name, neurons in late.items():
            x = _rms_norm(_run_planted(h_up, neurons, range(BOUNDARY, N_LAYERS), eps), eps)
            logit_it = BETA_IT * x[K[word_class]]
            # t_PT's row is the identity direction of the current word
            logit_pt = con.beta_pt * x[con.identity_start]
            cells[f"y_{up_name}up_{late_name}late"] = logit_it - logit_pt
    cells["pt_late_effect"] = cells["y_ptup_itlate"] - cells["y_ptup_ptlate"]
    cells["it_late_effect"] = cells["y_itup_itlate"] - cells["y_itup_ptlate"]
    cells["interaction"] = cells["it_late_effect"] - cells["pt_late_effect"]
    return cells


def nominal_boundary_margin(
    con: Construction, word_class: int = 0, neurons: list[Neuron] | None = None
) -> float:
    """Noise-free IT logit-lens margin Y at the boundary (IT's residual entering block `BOUNDARY`, IT readout)."""
    eps = NORM_EPS[con.family]
    h0 = _start_residual(con, word_class)
    h = _run_planted(h0, con.it_neurons if neurons is None else neurons, range(BOUNDARY), eps)
    x = _rms_norm(h, eps)
    return BETA_IT * x[K[word_class]] - con.beta_pt * x[con.identity_start]


def nominal_closure(con: Construction, fit: list[Neuron], word_class: int = 0) -> float:
    """Noise-free rank-1 boundary-state closure of `con`'s IT hybrid with the direction fitted on the
    descendant `fit`'s shift (its shift is one direction at every event): the projection of IT's shift on it
    is added to PT's boundary state at the scored position, IT's late stack reads it out (method 5.6)."""
    eps = NORM_EPS[con.family]
    h0 = _start_residual(con, word_class)
    base = _run_planted(h0, [], range(BOUNDARY), eps)
    shift = [a - p for a, p in zip(_run_planted(h0, con.it_neurons, range(BOUNDARY), eps), base, strict=True)]
    fitted = [a - p for a, p in zip(_run_planted(h0, fit, range(BOUNDARY), eps), base, strict=True)]
    norm = math.sqrt(sum(v * v for v in fitted))
    direction = [v / norm for v in fitted]
    coeff = sum(s * d for s, d in zip(shift, direction, strict=True))

    def y(h: list[float]) -> float:
        x = _rms_norm(_run_planted(h, con.base_neurons + con.it_neurons, range(BOUNDARY, N_LAYERS), eps), eps)
        return BETA_IT * x[K[word_class]] - con.beta_pt * x[con.identity_start]

    floor = y(base)
    injected = y([b + coeff * d for b, d in zip(base, direction, strict=True)])
    native = y([b + s for b, s in zip(base, shift, strict=True)])
    return (injected - floor) / (native - floor)
