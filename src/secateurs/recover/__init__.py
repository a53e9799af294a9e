"""Training after (or while) pruning, all on the one loop of :mod:`secateurs.training.loop`: LoRA that
keeps the sparsity (``lora``, adapters in ``adapters``), LoRAPrune (``loraprune``) and iterative prune +
fine-tune (``iterative``). See each module's docstring for the paper it follows."""
