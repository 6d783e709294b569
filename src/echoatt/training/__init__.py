"""Distillation: the step and its loop, the pure loss functions, the teacher's outputs kept on disk, checkpoints,
the memory a batch needs and the precision the work runs in."""
