"""Training stages: SFT (:mod:`uniref.train.sft`) and MSGRPO (:mod:`uniref.train.msgrpo`), thin loops over
shared parts (batches, data, runtime, checkpoints, observation, LoRA, GRPO math)."""
