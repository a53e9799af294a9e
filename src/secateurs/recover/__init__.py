"""Recovery after pruning: LoRA that keeps the sparsity (``lora``), LoRAPrune (``loraprune``) and
iterative prune + fine-tune (``iterative``). See each module's docstring for the paper it follows."""
