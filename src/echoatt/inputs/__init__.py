"""What every command starts from: a teacher (a folder, a hub id, a GGUF file, the offline default) and text."""
