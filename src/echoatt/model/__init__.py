"""The student model: its config and modeling files (copied beside every checkpoint), its place in transformers'
Auto classes, and the model shapes `--arch` builds."""
