"""IndexTTS2 inference in plain PyTorch."""
