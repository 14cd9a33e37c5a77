"""recipes/compose3: a Spanish, a French and a math LoRA fused by one LoRA-Flow gate (run.py)."""
