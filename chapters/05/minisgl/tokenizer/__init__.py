"""The tokenizer and detokenizer workers: text in, token ids out, and back (introduced in chapter 03)."""
