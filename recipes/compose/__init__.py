"""recipes/compose: a Spanish LoRA and a math LoRA fused by LoRA-Flow (run.py)."""
