"""PEFT tuners: how each adapter type's keys become planned steps on base tensors.

``lora`` (LoRA, DoRA, ``lora_bias``, Conv and Embedding LoRA), ``experts`` (``target_parameters`` on fused MoE
experts), ``tokens`` (trainable tokens).
"""
