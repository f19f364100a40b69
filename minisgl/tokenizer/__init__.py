"""The tokenizer and detokenizer workers: text in, token ids out, and back (chapter 03)."""
