"""Training after (or while) pruning, all on the one loop of :mod:`.train`: LoRA that keeps the sparsity
(``lora``, adapters in ``adapters``), LoRAPrune (``loraprune``), iterative prune + fine-tune
(``iterative``) and the continued pretraining of shearing (``dynamic_batch``). See each module's
docstring for the paper it follows."""
