"""The data: local files as shipped (`files`), the corpus and its tokenization (`corpus`), streams
(`streaming`), pre-tokenized folders (`pretokenize`), the plans that order examples into steps
(`plans`), and what one run reads (`run`, above the others)."""
