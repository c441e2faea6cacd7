"""Pure string functions: parse PEFT adapter keys, and map module paths to base tensor names.

Key grammar (peft-merge-spec §2.3): a key holding ``.lora_`` or ``token_adapter.`` is adapter
math; any other key is a full tensor that replaces ``key.replace(".base_layer.", ".")``.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass

from streammerge import model_rules, renames

PEFT_PREFIX = "base_model.model."

# role -> suffix after the module path. Order matters: longer, more specific suffixes first.
_LORA_SUFFIXES: tuple[tuple[str, str], ...] = (
    ("lora_A", ".lora_A.weight"),
    ("lora_B", ".lora_B.weight"),
    ("lora_B_bias", ".lora_B.bias"),
    ("emb_A", ".lora_embedding_A"),
    ("emb_B", ".lora_embedding_B"),
    ("magnitude", ".lora_magnitude_vector"),
    ("magnitude", ".lora_magnitude_vector.weight"),
)

#: Output-layer module names: PEFT walks ``named_modules`` and these come after the backbone.
HEAD_NAMES = frozenset({"lm_head", "score", "classifier", "qa_outputs", "embed_out", "output"})

#: Suffixes of input-embedding tensors, used to find what a tied ``lm_head`` aliases.
INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
                    "tok_embeddings.weight", "shared.weight")

#: ``base_model_prefix`` values: an adapter trained on ``XForCausalLM`` names ``model.layers…``
#: while a checkpoint saved from the bare ``XModel`` has ``layers…``, and the reverse.
BASE_PREFIXES = ("model.", "transformer.", "bert.", "roberta.", "gpt_neox.", "language_model.")

#: Architectures whose linear layers are HF ``Conv1D`` (weight stored (in, out)); PEFT forces
#: ``fan_in_fan_out=True`` for these whatever the config says (spec §3.2, ``dispatch_default``).
CONV1D_MODULES: Mapping[str, frozenset[str]] = {
    "gpt2": frozenset({"c_attn", "c_proj", "c_fc", "q_attn"}),
    "openai-gpt": frozenset({"c_attn", "c_proj", "c_fc"}),
    "imagegpt": frozenset({"c_attn", "c_proj", "c_fc", "q_attn"}),
    "decision_transformer": frozenset({"c_attn", "c_proj", "c_fc", "q_attn"}),
}


@dataclass(frozen=True, slots=True)
class AdapterKey:
    """One on-disk adapter key, classified."""

    key: str
    module: str  # module path relative to the wrapped HF model, e.g. "model.layers.0.self_attn.q_proj"
    role: str  # lora_A | lora_B | lora_B_bias | emb_A | emb_B | magnitude | token_delta | other_lora | tensor |
    #            original_module
    target: str  # for role "tensor": the base tensor it replaces; "" otherwise


def parse_key(key: str) -> AdapterKey:
    """Classify one adapter key (``base_model.model.`` prefix optional: ``save_peft_format=False``)."""
    stem = key.removeprefix(PEFT_PREFIX)
    for role, suffix in _LORA_SUFFIXES:
        if stem.endswith(suffix):
            return AdapterKey(key, stem[: -len(suffix)], role, "")
    if ".token_adapter." in stem:
        return AdapterKey(key, stem.split(".token_adapter.")[0], "token_delta", "")
    if ".lora_" in stem:
        return AdapterKey(key, stem.split(".lora_")[0], "other_lora", "")
    target = stem.replace(".base_layer.", ".")
    if ".original_module." in target:
        # bias="all" on a modules_to_save module also saves the wrapper's untouched original: PEFT's merge drops it
        return AdapterKey(key, target.split(".original_module.")[0], "original_module", "")
    # ... and its trained copy under ``modules_to_save.`` (the same tensor PEFT saves as ``<module>.<param>``)
    target = target.replace(".modules_to_save.", ".")
    return AdapterKey(key, target.rpartition(".")[0], "tensor", target)


def module_order(module: str) -> tuple[int, str]:
    """Sort key approximating ``named_modules`` order: the backbone first, output heads last."""
    return (1 if module.rpartition(".")[2] in HEAD_NAMES else 0, module)


def input_embedding(names: Collection[str]) -> str | None:
    """The input-embedding tensor of a checkpoint (shortest name with a known suffix), if any."""
    found = [n for n in names if n.endswith(INPUT_EMBEDDINGS) and "vision" not in n]
    return min(found, key=lambda n: (n.count("."), n)) if found else None


def tied_aliases(names: Collection[str], config: Mapping[str, object]) -> Aliases:
    """Tensor names that exist in memory but not on disk because they are tied (spec §6.1).

    transformers drops the tied targets from the checkpoints it saves. The common case (``lm_head.weight`` of a
    model with ``tie_word_embeddings``, which defaults to true, *is* the input embedding) is known without
    transformers; every other tie (T5/BART ``shared``, Whisper ``proj_out``, RoBERTa ``lm_head.decoder``, ...)
    comes from the model's own rules, read lazily (``Aliases``).
    """
    text = config.get("text_config")
    tie = config.get("tie_word_embeddings", text.get("tie_word_embeddings", True) if isinstance(text, dict) else True)
    emb = input_embedding(names)
    common: dict[str, str] = {}
    if tie and emb is not None:
        # The head sits beside the backbone: Llava-style checkpoints nest both under "language_model.".
        head = "language_model.lm_head.weight" if emb.startswith("language_model.") else "lm_head.weight"
        if head not in names:
            common[head] = emb
    return Aliases(names, config, common)


class Aliases(Mapping[str, str]):
    """In-memory name -> the disk tensor it is tied to, for names absent from the checkpoint.

    The common lm_head tie is known up front; the model's rules (``model_rules.rules_for``: transformers' tied
    keys and v5 renames, or the table) are read the first time a name misses, never for a merge whose names all
    resolve directly. Iterating lists the common tie plus, once read, every rule tie that lands on disk.
    """

    def __init__(self, names: Collection[str], config: Mapping[str, object], common: Mapping[str, str]) -> None:
        self._names = names
        self._config = config
        self._common = dict(common)
        self._rules: model_rules.ModelRules | None = None
        self._table: model_rules.ModelRules | None = None

    @property
    def rules(self) -> model_rules.ModelRules:
        if self._rules is None:
            self._rules = model_rules.rules_for(self._config)
        return self._rules

    def face_order(self, order: tuple[int, str]) -> tuple[int, int, str]:
        """Sort key of a LoRA step from ``module_order``: when the model's rules have been read (a tie other than
        the common one was resolved), modules owning a tie sort in ``named_modules`` order, as PEFT merges them."""
        rank = self._rules.rank(order[1]) if self._rules is not None else None
        return (0, rank, "") if rank is not None else (1, order[0], order[1])

    def kept_in_fp32(self, name: str, dtype: str) -> bool:
        """Does transformers load this merged tensor in fp32 (so PEFT merges and saves it in fp32)? The model's
        rules when already read, else the generated table alone: asked of every merged tensor, it never imports
        transformers."""
        if self._rules is None and self._table is None:
            self._table = model_rules.from_table(self._config)
        return (self._rules or self._table).kept_in_fp32(name, dtype)

    def renamed(self, name: str) -> str | None:
        """The disk name the model's rules give the in-memory ``name``, when it is on disk."""
        disk = self.rules.renames.get(name)
        return disk if disk in self._names else None

    def _tied(self, name: str) -> str | None:
        if name in self._common:
            return self._common[name]
        if name in self._names:
            return None
        source = self.rules.tied.get(name)
        if source is None:
            return None
        return source if source in self._names else self.renamed(source)

    def __getitem__(self, name: str) -> str:
        found = self._tied(name)
        if found is None:
            raise KeyError(name)
        return found

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._tied(name) is not None

    def _all(self) -> dict[str, str]:
        out = dict(self._common)
        if self._rules is not None:
            for target in self._rules.tied:
                found = None if "*" in target else self._tied(target)
                if found is not None:
                    out.setdefault(target, found)
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


def resolve(name: str, names: Collection[str], aliases: Mapping[str, str]) -> str | None:
    """Map an in-memory tensor name to the checkpoint tensor holding it, or None (spec §2.4).

    Exact name, tied alias, ``base_model_prefix`` change; then the model's own v5 rename (``Aliases.renamed``:
    transformers' conversion mapping); then the same for each hand-listed rename of the name
    (``renames.RENAMES``: Llava ``model.language_model.*``, the Mixtral router, legacy ``LayerNorm.gamma``).
    """
    found = _resolve_direct(name, names, aliases)
    if found is None and isinstance(aliases, Aliases):
        found = aliases.renamed(name)
    for cand in () if found is not None else renames.disk_candidates(name):
        found = _resolve_direct(cand, names, aliases)
        if found is not None:
            break
    return found


def _resolve_direct(name: str, names: Collection[str], aliases: Mapping[str, str]) -> str | None:
    if name in names:
        return name
    if name in aliases:
        return aliases[name]
    for prefix in BASE_PREFIXES:
        if name.startswith(prefix) and name[len(prefix) :] in names:
            return name[len(prefix) :]
        if prefix + name in names:
            return prefix + name
    return None


def candidates(name: str, aliases: Mapping[str, str] | None = None) -> list[str]:
    """Every disk spelling ``resolve`` tries for the in-memory ``name``, in its order (for error messages)."""
    out = [name]
    for cand in (name, *renames.disk_candidates(name)):
        out += [cand[len(p):] for p in BASE_PREFIXES if cand.startswith(p)] + [p + cand for p in BASE_PREFIXES]
        if cand == name and isinstance(aliases, Aliases):
            rules = aliases.rules
            for mapped in (rules.tied.get(name), rules.renames.get(name)):
                if mapped is not None:
                    out.append(mapped)
        out.append(cand)
    return list(dict.fromkeys(out))


def suggest(name: str, names: Collection[str], aliases: Mapping[str, str] | None = None) -> str:
    """The names tried and the closest base tensors, as a parenthesised clause for an unknown ``name``."""
    tried = candidates(name, aliases)
    shown = ", ".join(repr(c) for c in tried[:6]) + (f" and {len(tried) - 6} more" if len(tried) > 6 else "")
    close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.6)
    nearest = f"closest base tensors: {', '.join(repr(c) for c in close)}" if close else "no base tensor is close"
    source = f" with the rules of {aliases.rules.source}" if isinstance(aliases, Aliases) else ""
    return f" (tried {shown}{source}; {nearest})"


def is_conv1d(module: str, model_type: object) -> bool:
    """True when ``module`` is an HF ``Conv1D`` in this architecture (weight stored transposed)."""
    return module.rpartition(".")[2] in CONV1D_MODULES.get(str(model_type), frozenset())
