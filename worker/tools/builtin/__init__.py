"""The built-in model's training pieces: the stdlib corpus, the MTP head trained beside transformers'
Qwen3-Next, held-out metrics and the export to the published HF layout (`worker/tools/train_builtin.py`
puts them together)."""
