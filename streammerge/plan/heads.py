"""Full tensors an adapter carries: saved heads (``modules_to_save``, task heads), saved layers, resized
vocabularies, and what they do to ties and to the config. Pure.
"""

from __future__ import annotations

from streammerge import naming
from streammerge.formats.safetensors import TensorInfo
from streammerge.plan.draft import AdapterInput, Draft, PlanContext


def _is_saved_module(cfg_modules: tuple[str, ...], module: str) -> bool:
    """PEFT's ``_set_trainable`` matching for modules_to_save: plain ``endswith``."""
    return any(module.endswith(m) for m in cfg_modules)


def plan_replacement(ctx: PlanContext, src: AdapterInput, draft: Draft, k: naming.AdapterKey) -> None:
    """A full tensor in the adapter (``modules_to_save``, a task head, a saved ``base_layer``, a resized
    vocabulary): it replaces the base tensor, is added as a new head, or unties a tied head."""
    cfg = src.adapter.config
    info = src.infos[k.key]
    ref = src.ref(info)
    ckpt, located, aliases = ctx.ckpt, ctx.located, ctx.aliases
    targets, added, config_updates, problems = draft.targets, draft.added, draft.config_updates, draft.problems
    head_modules = cfg.modules_to_save + task_heads(cfg.task_type)
    saved_head = _is_saved_module(head_modules, k.module)
    tied_head = k.target in aliases and ".base_layer." not in k.key.removeprefix(naming.PEFT_PREFIX)
    if saved_head and tied_head:
        # modules_to_save on a tied head unties it: PEFT writes lm_head.weight and sets the flag false.
        added[k.target] = ref
        config_updates["tie_word_embeddings"] = False
        return
    target = naming.resolve(k.target, located.keys(), aliases)
    if target is None:
        if saved_head:  # a new head (SEQ_CLS score, classifier) that the base does not have
            added[k.target] = ref
            _retarget_task(cfg, ckpt, k.target, located, info, draft)
            return
        problems.append(
            f"{src.where}: adapter tensor {k.key!r} names {k.target!r}, which is not in the base "
            f"checkpoint{naming.suggest(k.target, located.keys(), aliases)}; is this adapter for a different base "
            "model?"
        )
        return
    base = located[target][1]
    if base.shape != info.shape and not _resized_vocab(k, target, base, info, aliases, config_updates, problems):
        problems.append(
            f"{src.where}: adapter tensor {k.key!r} has shape {info.shape} but base tensor {target!r} "
            f"has shape {base.shape}; the adapter was trained on a different base (or a resized vocabulary)"
        )
        return
    if saved_head and target in aliases.values() and any(h for h, e in aliases.items() if e == target):
        # modules_to_save on the input embedding of a tied model: the head keeps the old embedding.
        for head, emb in aliases.items():
            if emb == target and head not in added:
                added[head] = ctx.ref(target)
        config_updates["tie_word_embeddings"] = False
    slot = targets[target]
    order = naming.module_order(k.module)
    if slot.replacement is None or order >= slot.replacement_order:
        slot.replacement, slot.replacement_order = ref, order


def _resized_vocab(k, target, base: TensorInfo, info: TensorInfo, aliases, config_updates, problems) -> bool:
    """A full embedding or output head with a different vocabulary size (spec §6.2): accept it as
    the new tensor and set ``vocab_size``. False when the tensor is not a vocabulary matrix."""
    vocab_tensor = target.endswith(naming.INPUT_EMBEDDINGS) or target.removesuffix(".weight").rpartition(".")[2] in (
        "lm_head", "embed_out", "output") or target in aliases.values()
    if not vocab_tensor or len(info.shape) != 2 or info.shape[1:] != base.shape[1:]:
        return False
    previous = config_updates.get("vocab_size")
    if previous is not None and previous != info.shape[0]:
        problems.append(
            f"adapter tensor {k.key!r} has a vocabulary of {info.shape[0]} rows but another resized tensor has "
            f"{previous}; embed_tokens and lm_head must be resized alike"
        )
    config_updates["vocab_size"] = info.shape[0]
    return True


def check_resized(ctx: PlanContext, draft: Draft) -> None:
    """A resized vocabulary must resize every vocabulary tensor on disk (spec §6.2): an embedding of
    the new size beside a head of the old one is not a model (PEFT: size mismatch at load)."""
    new = draft.config_updates.get("vocab_size")
    if new is None:
        return
    targets, added, problems = draft.targets, draft.added, draft.problems
    for name, (_, info) in ctx.located.items():
        slot = targets.get(name)
        shape = slot.replacement.shape if slot is not None and slot.replacement is not None else info.shape
        vocab_tensor = name.endswith(naming.INPUT_EMBEDDINGS) or name.removesuffix(".weight").rpartition(".")[2] in (
            "lm_head", "embed_out", "output")
        if vocab_tensor and len(shape) == 2 and shape[0] != new and name not in added:
            problems.append(
                f"the adapter resizes the vocabulary to {new} rows but carries no resized {name!r} (still {shape[0]} "
                "rows); save the adapter with save_embedding_layers=True so both embed_tokens and lm_head are included"
            )


def task_heads(task_type: str | None) -> tuple[str, ...]:
    """Heads PEFT appends to ``modules_to_save`` for a task type (``peft_model.py``)."""
    if task_type in ("SEQ_CLS", "TOKEN_CLS"):
        return ("classifier", "score")
    if task_type == "QUESTION_ANS":
        return ("qa_outputs",)
    return ()


_TASK_CLASSES = {"SEQ_CLS": "ForSequenceClassification", "TOKEN_CLS": "ForTokenClassification",
                 "QUESTION_ANS": "ForQuestionAnswering"}


def _retarget_task(cfg, ckpt, head, located, info, draft: Draft) -> None:
    """A task head (score/classifier) turns a CausalLM checkpoint into ``*For<Task>``: drop lm_head."""
    suffix = _TASK_CLASSES.get(cfg.task_type or "")
    if suffix is None:
        return
    config_updates, drop, warnings = draft.config_updates, draft.drop, draft.warnings
    for name in ("lm_head.weight", "lm_head.bias"):
        if name in located:
            drop.add(name)
    archs = ckpt.config.get("architectures") or []
    if isinstance(archs, list) and archs:
        new = [a.replace("ForCausalLM", suffix) if "ForCausalLM" in a else a for a in archs]
        config_updates["architectures"] = new
    if suffix != "ForQuestionAnswering" and info.shape:
        labels = info.shape[0]
        config_updates["id2label"] = {str(i): f"LABEL_{i}" for i in range(labels)}
        config_updates["label2id"] = {f"LABEL_{i}": i for i in range(labels)}
    warnings.append(
        f"task head {head!r} from the adapter makes this a {suffix[3:]} model: lm_head dropped, "
        "architectures and labels updated in config.json; set id2label names and pad_token_id as you need"
    )
