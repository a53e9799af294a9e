"""The one training loop (:mod:`.loop`) and its resumable checkpoints (:mod:`.checkpoint`).

It sits below the method families so that every method that trains (LoRA recovery, LoRAPrune and
iterative pruning in :mod:`secateurs.recover`, both phases of LLM-Shearing in
:mod:`secateurs.structured.shearing`) runs the same loop without one family importing another.
"""
