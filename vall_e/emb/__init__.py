"""Tokenizers: text -> phones (g2p); audio <-> EnCodec codes (codec), and the corpus batch job over it (qnt)."""
