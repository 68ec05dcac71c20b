"""Fine-tuning: LoRA-MoE, plain LoRA (PEFT) or full; training data, checkpoints, run folders, data parallelism."""
