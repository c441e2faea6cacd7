"""streammerge: fold PEFT LoRA adapters into safetensors checkpoints, streaming."""
